"""Every ready config in configs/ parses and its plans fit its model (no training, no checkpoints read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from admmcompress.models import create_model
from admmcompress.train.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_ready_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_ready_config_validates_and_its_plans_resolve(path):
    config = RunConfig.from_yaml(path)
    model = create_model(**config.model)
    for stage in config.stages:
        if stage.coupling == "none":
            assert stage.plan.resolve(model), f"{path.name}: a stage's plan selects nothing"
    if config.teacher is not None:
        assert Path(config.teacher).name.endswith(".safetensors")

"""benchmarks/lenet5_dense_seeds.py: the per-seed table, its mean and spread, and the ensemble row."""

import importlib
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("lenet5_dense_seeds")
    monkeypatch.setattr(module, "BUNDLED", tmp_path / "bundled.safetensors")
    monkeypatch.setattr(module, "OUT_ROOT", tmp_path)
    yield module
    sys.modules.pop("lenet5_dense_seeds", None)


def test_summary_lists_every_finished_seed_with_mean_spread_and_ensemble(bench):
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        path = bench.checkpoint_of(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.save_tensors(path, create_model(name="lenet5").state_dict())
    (bench.OUT_ROOT / "dense_s4").mkdir()  # an unfinished run (no model yet) is not listed
    text = bench.summarize(limit=500)
    rows = re.findall(r"^\| (\d)[^|]* \| ([\d.]+) \|$", text, flags=re.M)
    assert [int(s) for s, _ in rows] == [0, 1, 2]
    values = [float(a) for _, a in rows]
    assert f"3 seeds: mean {statistics.mean(values):.3f}%" in text
    assert "logit ensemble of seeds 0..2:" in text

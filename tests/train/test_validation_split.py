"""``data.validation``: the run measures on held-out training samples; the test set is evaluated once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from admmcompress.cli import main
from admmcompress.data import load_dataset
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.loop import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import tiny_spec, write_config  # noqa: E402


def test_run_on_a_validation_split_reports_the_test_accuracy_once(tmp_path):
    spec = tiny_spec(data={"dataset": "mnist", "batch_size": 64, "train_limit": 600, "test_limit": 300,
                           "validation": 100})
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, spec)), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["evaluated_on"] == "validation: 100 held-out training samples"
    model = create_model("lenet300100")
    ckpt.load_weights(model, out / "model.safetensors")
    train = load_dataset("mnist", "train", limit=600)
    _, held = train.hold_out(100)
    test = load_dataset("mnist", "test", limit=300)
    # 'accuracy_after' is the held-out samples' accuracy, 'test_accuracy' the test set's, both of the final model
    assert metrics["accuracy_after"] == pytest.approx(evaluate(model, held), abs=1e-9)
    assert metrics["test_accuracy"] == pytest.approx(evaluate(model, test), abs=1e-9)
    report = (out / "report.md").read_text()
    assert "Top-1 accuracy (validation: 100 held-out training samples)" in report
    assert f"measured once at the end: **{metrics['test_accuracy']:.2f}%**" in report


def test_hold_out_is_the_same_draw_whatever_the_run_seed():
    split = load_dataset("mnist", "train", limit=200)
    a_rest, a_held = split.hold_out(50)
    torch.manual_seed(123)
    b_rest, b_held = split.hold_out(50)
    assert torch.equal(a_held.y, b_held.y) and torch.equal(a_rest.x, b_rest.x)
    assert len(a_rest) == 150 and len(set(a_held.y.tolist())) > 5  # a random draw, not the first 50


@pytest.mark.parametrize(
    "data,message",
    [
        ({"dataset": "mnist", "validation": 0}, "validation"),
        ({"dataset": {"import": "toy:Data"}, "validation": 10}, "give an imported dataset its own validation"),
    ],
)
def test_bad_validation_settings_are_one_line(data, message):
    spec = tiny_spec(data=data)
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(spec)))


def test_more_held_out_than_training_samples_is_one_line():
    split = load_dataset("mnist", "train", limit=20)
    with pytest.raises(ValueError, match="validation=20: hold out between 1 and 19 of the 20 training samples"):
        split.hold_out(20)

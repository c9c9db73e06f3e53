"""Weight averaging at the end of a phase: the mean itself, BatchNorm re-estimation, masks, resume, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.models import LeNet300100
from admmcompress.report.render import render_markdown
from admmcompress.train import WeightAverage
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import STATE_FILE, Runner

PLAN = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]}


def test_mean_of_snapshots_and_state_round_trip():
    model = nn.Linear(3, 2)
    average = WeightAverage()
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(-value)
        average.update(model)
    restored = WeightAverage()
    restored.load_state_dict(average.state_dict())
    restored.apply(model)
    assert restored.count == 3
    assert torch.allclose(model.weight, torch.full((2, 3), 3.0))
    assert torch.allclose(model.bias, torch.full((2,), -3.0))


def test_apply_without_snapshots_is_an_error():
    with pytest.raises(RuntimeError, match="no snapshot"):
        WeightAverage().apply(nn.Linear(2, 2))


def test_batchnorm_statistics_are_re_estimated_on_the_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    average = WeightAverage()
    average.update(model)
    x = torch.randn(256, 4) * 3 + 1
    loader = [(x[i : i + 64], torch.zeros(64)) for i in range(0, 256, 64)]
    model[1].running_mean.fill_(100.0)
    model.eval()
    average.apply(model, loader)
    with torch.no_grad():
        expected = model[0](x).mean(0)
    assert torch.allclose(model[1].running_mean, expected, atol=1e-4)
    assert not model.training  # the caller's mode is kept


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", "train", limit=512), load_dataset("mnist", "test", limit=200)


def averaged_config(average_from_epoch: int = 2) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 1,
            "model": {"name": "lenet300100"},
            "pretrain": {"epochs": 1},
            "stages": [
                {
                    "plan": PLAN,
                    "method": "magnitude",
                    "admm": {"epochs": 0},
                    "retrain": {
                        "epochs": 3,
                        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                        "average_from_epoch": average_from_epoch,
                    },
                }
            ],
        }
    )


def fresh_model(seed: int = 0) -> LeNet300100:
    torch.manual_seed(seed)
    return LeNet300100()


def test_retrain_ends_on_the_mean_of_its_last_epochs_and_keeps_the_mask(data, monkeypatch):
    seen: list[torch.Tensor] = []
    original = Runner._record

    def record(self, phase, *args, **kwargs):
        if phase.kind == "retrain":
            seen.append(self.model.fc1.weight.detach().clone())
        return original(self, phase, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)
    runner = Runner(averaged_config(), fresh_model(), *data, progress=False)
    metrics = runner.run()
    assert len(seen) == 3
    weight = runner.model.fc1.weight.detach()
    assert torch.allclose(weight, (seen[1] + seen[2]) / 2, atol=1e-6)
    assert not torch.equal(weight, seen[2])
    assert (weight == 0).sum().item() == weight.numel() // 2  # the average is as sparse as the plan
    assert torch.equal(weight == 0, runner.masks.masks["fc1.weight"] == 0)
    summary = metrics["weight_average"]["stage1/retrain"]
    assert summary["snapshots"] == 2
    assert summary["accuracy_averaged"] == metrics["stages"][0]["accuracy_after_retrain"]
    report = render_markdown(metrics)
    assert "stage1/retrain ended on the mean of its last 2 epochs' weights" in report


def test_resume_mid_average_is_bit_identical(tmp_path, data, monkeypatch):
    config = averaged_config()
    full = Runner(config, fresh_model(), *data, out_dir=tmp_path / "full", progress=False)
    full.run()

    class Crash(Exception):
        pass

    original = Runner._record
    calls = {"n": 0}

    def record(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # pretrain 1, retrain 1, 2 (first snapshot, checkpointed), crash in 3
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)
    with pytest.raises(Crash):
        Runner(config, fresh_model(), *data, out_dir=tmp_path / "crashed", progress=False).run()
    monkeypatch.undo()
    assert (tmp_path / "crashed" / STATE_FILE).is_file()
    resumed = Runner(config, fresh_model(seed=99), *data, out_dir=tmp_path / "crashed", progress=False)
    resumed.run(resume=True)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


@pytest.mark.parametrize(
    ("phase", "extra", "message"),
    [
        ("retrain", {"epochs": 3, "average_from_epoch": 4}, r"past the phase's last epoch \(epochs=3\)"),
        ("retrain", {"epochs": 3, "average_from_epoch": 0}, "must be a positive integer"),
        ("retrain", {"epochs": 3, "average_from_epoch": 2, "quantized_weights": "ste"}, "off their levels"),
        ("admm", {"epochs": 3, "average_from_epoch": 2}, "move it to the stage's retrain phase"),
    ],
)
def test_wrong_average_settings_are_named(phase, extra, message):
    stage = {"plan": PLAN, phase: extra}
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"model": {"name": "lenet300100"}, "pretrain": {"epochs": 1}, "stages": [stage]})

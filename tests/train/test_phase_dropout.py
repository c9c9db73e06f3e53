"""Per-phase dropout (SPEC P12: off during ADMM, back on for retraining), restored after the run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.models import LeNet5
from admmcompress.train.config import ConfigError, RunConfig
from admmcompress.train.loop import dropout_rates, set_dropout
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", "train", limit=128), load_dataset("mnist", "test", limit=64)


def config(admm_dropout=0.0, retrain_dropout=0.25) -> RunConfig:
    stage = {
        "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]},
        "admm": {"epochs": 2, "dropout": admm_dropout},
        "retrain": {"epochs": 2, "dropout": retrain_dropout},
    }
    return RunConfig.from_dict(
        {"model": {"name": "lenet5", "dropout": 0.5}, "pretrain": {"epochs": 1}, "stages": [stage], "seed": 0}
    )


def spy_dropout(monkeypatch) -> list[tuple[str, float]]:
    seen: list[tuple[str, float]] = []
    original = Runner._train_one_epoch

    def train_one_epoch(self, phase, steps):
        seen.append((phase.kind, self.model.dropout.p))
        return original(self, phase, steps)

    monkeypatch.setattr(Runner, "_train_one_epoch", train_one_epoch)
    return seen


def test_each_phase_trains_with_its_own_dropout_and_the_model_gets_its_own_back(data, monkeypatch):
    seen = spy_dropout(monkeypatch)
    torch.manual_seed(0)
    model = LeNet5(dropout=0.5)
    Runner(config(), model, *data, progress=False).run()
    assert seen == [("pretrain", 0.5), ("prune", 0.0), ("prune", 0.0), ("retrain", 0.25), ("retrain", 0.25)]
    assert model.dropout.p == 0.5


def test_phases_without_a_dropout_use_the_models(data, monkeypatch):
    seen = spy_dropout(monkeypatch)
    torch.manual_seed(0)
    Runner(config(admm_dropout=None, retrain_dropout=None), LeNet5(dropout=0.5), *data, progress=False).run()
    assert {p for _, p in seen} == {0.5}


def test_resume_in_the_retrain_phase_trains_with_the_retrain_dropout(data, monkeypatch, tmp_path):
    cfg = config()
    calls = {"n": 0}
    original = Runner._record

    def crash_after_fourth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # pretrain 1 + ADMM 2 + retrain 1 checkpointed, then killed
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", crash_after_fourth)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, LeNet5(dropout=0.5), *data, out_dir=tmp_path, progress=False).run()
    monkeypatch.undo()
    seen = spy_dropout(monkeypatch)
    Runner(cfg, LeNet5(dropout=0.5), *data, out_dir=tmp_path, progress=False).run(resume=True)
    assert seen == [("retrain", 0.25)]


def test_set_dropout_reaches_recurrent_layers_and_restores_by_name():
    model = nn.Sequential(nn.GRU(4, 8, num_layers=2, dropout=0.2), nn.Dropout(0.1), nn.GRU(8, 8))
    before = dropout_rates(model)
    assert before == {"0": 0.2, "1": 0.1, "2": 0.0}
    set_dropout(model, 0.0)
    assert dropout_rates(model) == {"0": 0.0, "1": 0.0, "2": 0.0}
    set_dropout(model, before)
    assert dropout_rates(model) == before


@pytest.mark.parametrize("value", [1.0, -0.1, "0.5"])
def test_dropout_outside_zero_one_is_refused(value):
    stage = {
        "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]},
        "retrain": {"dropout": value},
    }
    with pytest.raises(ConfigError, match=r"stages\[0\].*dropout"):
        RunConfig.from_dict({"model": {"name": "lenet5"}, "pretrain": {"epochs": 1}, "stages": [stage]})

"""benchmarks/quantization_cifar.py: one setting end to end on a few random images (seconds, not minutes)."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from admmcompress.data.datasets import Split
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports structured_common as a sibling
    module = importlib.import_module("quantization_cifar")
    yield module
    sys.modules.pop("quantization_cifar", None)


@pytest.mark.filterwarnings("ignore:ADMM residual")
@pytest.mark.parametrize("setting", ["fp2", "prune70_binary"])
def test_setting_runs_and_holds_levels(bench, setting, tmp_path):
    torch.manual_seed(0)
    dense = tmp_path / "dense.safetensors"
    ckpt.save_tensors(dense, create_model("resnet20").state_dict())
    data = Split(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    args = argparse.Namespace(
        dense=str(dense), out=str(tmp_path), rho=1.0, admm_epochs=1, retrain_epochs=1,
        prune_sparsity=0.7, prune_admm_epochs=1, prune_retrain_epochs=1, no_cache=True,
    )
    record = bench.run_setting(setting, args, data, data, 10.0, lambda msg: None)
    assert record["held_unchanged"]
    bits = {"fp2": 2, "prune70_binary": 1}[setting]
    assert all(1 <= k <= 2**bits for k in record["levels"].values())  # every Conv2d/Linear, conv1 and linear too
    assert set(record["levels"]) >= {"conv1.weight", "linear.weight"}
    if setting.startswith("prune70_"):
        assert record["pruning"]["accuracy"] >= 0
        assert 2.5 < record["weight_reduction"] < 3.4  # 70% of all but conv1 / linear
    else:
        assert record["weight_reduction"] == 1.0
    assert record["paper_storage"] >= record["honest_storage"] > 1


@pytest.mark.filterwarnings("ignore:ADMM residual")
def test_equal_budget_gives_both_arms_the_same_training_and_summarizes_per_protocol(bench, tmp_path, monkeypatch):
    """``--equal-budget``: the unpruned arm trains the dense model on the pruning stage's schedule first, so both
    arms take the same phases (epochs, schedules, data orders); seeds change every phase's data order."""
    torch.manual_seed(0)
    dense = tmp_path / "dense.safetensors"
    ckpt.save_tensors(dense, create_model("resnet20").state_dict())
    data = Split(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    phases: list[tuple] = []
    real = bench.cifar_sgd

    def counted(model, train, epochs, **kw):
        phases.append((epochs, kw["schedule"], kw["seed"]))
        return real(model, train, epochs, **kw)

    monkeypatch.setattr(bench, "cifar_sgd", counted)

    def args(seed: int, **kw) -> argparse.Namespace:
        return argparse.Namespace(
            dense=str(dense), out=str(tmp_path), rho=1.0, admm_epochs=1, retrain_epochs=1, prune_sparsity=0.7,
            prune_admm_epochs=2, prune_retrain_epochs=1, no_cache=False, seed=seed, equal_budget=True, **kw)

    records = []
    for seed, setting in ((0, "fp4"), (0, "prune70_fp4"), (1, "fp4")):
        phases.clear()
        records.append(bench.run_setting(setting, args(seed), data, data, 10.0, lambda msg: None))
        records[-1]["phases"] = list(phases)
    unpruned, pruned, other_seed = (r["phases"] for r in records)
    assert unpruned == pruned == [(2, "constant", 0), (1, "cosine", 1), (1, "constant", 0), (1, "cosine", 1)]
    assert [seed for *_, seed in other_seed] == [100, 101, 100, 101]
    assert records[0]["protocol"]["tag"] == records[2]["protocol"]["tag"]  # the seed is not part of the protocol
    changed = bench.protocol(args(0, fast=True))
    assert changed["tag"] != records[0]["protocol"]["tag"]  # another schedule: another cache and another table
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write("\n".join(json.dumps({k: v for k, v in r.items() if k != "phases"}) for r in records) + "\n")
    table = bench.summary(tmp_path)
    assert table.count("Protocol ") == 1 and "| fp4 |" in table and "(2)" in table  # fp4: seeds 0 and 1

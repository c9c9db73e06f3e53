"""benchmarks/ss_auto.py --retime: the saved runs are compacted and timed again, and the table shows it."""

from __future__ import annotations

import json

import pytest
import torch

from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter
from admmcompress.train import checkpoint as ckpt


@pytest.fixture()
def ss_auto(load_benchmark):
    return load_benchmark("ss_auto")


def test_retime_compacts_the_saved_run_and_adds_a_quiet_column(ss_auto, tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet5", dropout=0.0).eval()
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="conv2")]).resolve(model))
    record = {"model": "lenet5", "method": "uniform", "reduction": 2.0, "seed": 0, "accuracy": 99.0,
              "macs_dense": 2, "macs_compacted": 1, "wall_seconds": 1.0, "latency_ms": 0.5}
    weights_file, masks_file = ss_auto.model_files(tmp_path / "lenet5", record)
    weights_file.parent.mkdir(parents=True)
    ckpt.save_tensors(weights_file, model.state_dict())
    ckpt.save_tensors(masks_file, masks.state_dict())
    (tmp_path / "results.jsonl").write_text(json.dumps(record) + "\n")
    small = ss_auto.compacted("lenet5", model.state_dict(), masks, torch.randn(1, 1, 28, 28))
    assert small.conv2.out_channels == 25
    ss_auto.retime(tmp_path, rounds=3)
    timed = json.loads((tmp_path / "retimed.jsonl").read_text())
    assert timed["method"] == "uniform" and timed["latency_ms"] > 0 and timed["dense_latency_ms"] > 0
    row = next(line for line in ss_auto.summarize(tmp_path).splitlines() if "| uniform |" in line)
    assert f"{timed['latency_ms']:.3f} ({timed['dense_latency_ms']:.3f})" in row

"""The rates plan SS-Auto writes reruns to the same kept rows and columns (configs/lenet5_ss_auto.yaml's plan, where
column targets overlap coupled filter targets)."""

from __future__ import annotations

import copy

import pytest
import torch

from admmcompress.drivers.allocation import rates_plan, write_rates_plan
from admmcompress.drivers.budget import kept_rows_cols
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan

PLAN = {"rules": [
    {"match": "conv*", "structure": "filter", "sparsity": 0.9},
    {"match": "fc1", "structure": "filter", "sparsity": 0.95},
    {"match": "conv2", "structure": "column", "sparsity": 0.95},
    {"match": "fc*", "structure": "column", "sparsity": 0.95},
]}
LAYERS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def kept(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    params = dict(model.named_parameters())
    return {n: kept_rows_cols(params[n].detach()) for n in LAYERS}


def test_the_written_plan_reruns_to_the_rows_and_columns_ss_auto_kept(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    model = create_model("lenet5")
    with torch.no_grad():  # rows of unequal importance, as after training
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand(p.shape[0], *([1] * (p.dim() - 1))) ** 2 * 3)
    dense = copy.deepcopy(model)
    targets = Plan.from_dict(PLAN).resolve_coupled(model, x, "strict")
    soft = SoftThreshold(model, targets, SoftConfig(budget={"kind": "macs", "reduction": 8}), example=x)
    soft.step()
    soft.finalize()
    path = write_rates_plan(tmp_path / "rates.yaml", rates_plan(model, targets))
    hard_prune(dense, Plan.from_yaml(str(path)).resolve_coupled(dense, x, "strict"))  # the documented rerun
    assert kept(dense) == kept(model)  # before masks_of ranked columns on the row-masked weight: 7 fc2 columns, not 69

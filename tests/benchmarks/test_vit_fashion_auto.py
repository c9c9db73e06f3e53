"""The ViT benchmark's SS-Auto row gets the uniform plan's MACs as its budget, counted as compaction removes them."""

from __future__ import annotations

import pytest
import torch

from admmcompress.executors.compact import compact
from admmcompress.executors.compact_run import count_macs
from admmcompress.finalize import hard_prune

pytest.importorskip("transformers")


def test_the_auto_budget_is_the_uniform_plans_compacted_macs(load_benchmark):
    vit = load_benchmark("vit_fashion")
    torch.manual_seed(0)
    model = vit.ViT(width=16, layers=2, heads=4).eval()
    x = torch.randn(2, 1, 28, 28)
    targets = vit.plan().resolve_coupled(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = vit.uniform_macs(model, targets, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # counted on a copy
    dense = count_macs(model, x[:1])
    small = compact(model, x, hard_prune(model, targets)).model
    assert budget == count_macs(small, x[:1]) < dense  # the uniform plan's compacted Linear/Conv MACs
    bounds = vit.auto_bounds().resolve_coupled(model, x)
    assert [t.structure.target_sparsity for t in bounds] == [0.75, 0.75, 0.9, 0.9]

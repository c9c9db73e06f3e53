"""The sensitivity allocation meets its budget without overshooting it by whole grid steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.drivers.allocation import cost_at_rates, sensitivity_plan
from admmcompress.drivers.budget import gemm_shapes, structured_cost
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# monotone curves: layer 0 robust (a flat curve: every drop tiny), layer 2 sensitive
CURVES = {"0.weight:filter": {r: 0.99 - 0.02 * r for r in GRID},
          "2.weight:filter": {r: 0.99 - 0.5 * r * r for r in GRID}}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("reduction", [1.25, 1.5, 2, 3])
def test_no_layer_could_keep_one_grid_step_more_within_the_budget(reduction):
    model = mlp()
    plan = Plan([Rule(Filter(sparsity=0.9), match="[02]")])
    targets = plan.resolve(model)
    shapes = gemm_shapes(model, None)
    budget = structured_cost(shapes, {}, "params") / reduction
    found = sensitivity_plan(model, plan, {"kind": "params", "reduction": reduction}, CURVES)
    rates = {f"{r.match}.weight:filter": r.structure.target_sparsity for r in found.rules}
    assert cost_at_rates(model, targets, rates, shapes, "params") <= budget
    for key, rate in rates.items():
        lower = max((r for r in GRID if r < rate - 0.01), default=0.0)  # the grid step below (rates are exact shares)
        assert cost_at_rates(model, targets, {**rates, key: lower}, shapes, "params") > budget, (key, rate)


def test_the_flat_layer_gives_back_what_the_budget_does_not_need():
    model = mlp()
    plan = Plan([Rule(Filter(sparsity=0.9), match="[02]")])
    found = sensitivity_plan(model, plan, {"kind": "params", "reduction": 1.5}, CURVES)
    rates = {r.match: round(r.structure.target_sparsity, 3) for r in found.rules}
    cost = cost_at_rates(model, plan.resolve(model), {f"{k}.weight:filter": v for k, v in rates.items()},
                         gemm_shapes(model, None), "params")
    assert rates == {"0": 0.703, "2": 0.203} and cost == 4512  # before: layer 0 at 0.906, 4096 of 4523 allowed

"""Budgets (counts against compaction), the latency table's cache, and rate allocations as plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import Residual

from admmcompress.drivers import ADMM
from admmcompress.drivers.allocation import (
    rates_plan,
    sensitivity_curves,
    sensitivity_plan,
    torch_pruning_plan,
    uniform_plan,
    write_rates_plan,
)
from admmcompress.drivers.budget import (
    Budget,
    BudgetError,
    LatencyTable,
    drop_unread_channels,
    gemm_shapes,
    structured_cost,
)
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.executors.compact import CompactConfig, compact
from admmcompress.executors.compact_run import count_macs
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Column, Filter
from admmcompress.timing import LatencyCache

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


X = torch.randn(2, 3, 8, 8)


def test_mac_and_parameter_counts_equal_the_compacted_models():
    model = Residual().eval()
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]).resolve_coupled(model, X))
    shapes = gemm_shapes(model, X)
    patterns = {n: p != 0 for n, p in model.named_parameters() if n in shapes}
    small = compact(model, X, masks).model
    assert structured_cost(shapes, patterns, "macs") == count_macs(small, X)
    weights = sum(m.weight.numel() for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert structured_cost(shapes, patterns, "params") == weights
    assert structured_cost(shapes, {}, "macs") == count_macs(model, X)  # no pattern: dense


def test_channels_nobody_reads_are_counted_as_compaction_removes_them():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(2, 1, 8, 8)
    plan = Plan([Rule(Filter(sparsity=0.5), match="0"), Rule(Column(sparsity=0.5), match="2")])
    targets = plan.resolve_coupled(model, x)
    masks = hard_prune(model, targets)
    kept = int(torch.nonzero(masks["0.weight"].flatten(1).any(1))[0])
    with torch.no_grad():  # every column of conv 2 that reads a kept channel of conv 0 is zero
        model[2].weight[:, kept] = 0
    masks.intersect("2.weight", model[2].weight != 0)
    shapes = gemm_shapes(model, x)
    patterns = {n: p != 0 for n, p in model.named_parameters()}
    small = compact(model, x, masks, CompactConfig(columns="on")).model
    assert structured_cost(shapes, drop_unread_channels(targets, patterns), "macs") == count_macs(small, x)
    assert structured_cost(shapes, patterns, "macs") > count_macs(small, x)  # without it: overcounted


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "macs"}, "exactly one of value, fraction or reduction"),
        ({"kind": "macs", "fraction": 0}, r"fraction=0 must be in \(0, 1\]"),
        ({"kind": "macs", "value": float("nan")}, "must be a finite number"),
        ({"kind": "macs", "reduction": 2, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
    ],
)
def test_budget_mistakes_are_one_clear_line(spec, message):
    with pytest.raises(BudgetError, match=message) as err:
        Budget.from_any(spec)
    assert "\n" not in str(err.value)


def test_budget_resolution():
    assert Budget(kind="macs", reduction=4).resolve(1000.0) == 250.0
    assert Budget(kind="params", fraction=0.3).resolve(1000.0) == 300.0
    assert Budget(kind="params", value=10).resolve(1000.0) == 10.0
    with pytest.raises(BudgetError, match="above the dense model's 1000"):
        Budget(kind="params", value=2000).resolve(1000.0)


def test_latency_table_is_measured_once_per_machine_and_interpolates(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    shapes = gemm_shapes(model, torch.zeros(1, 16))
    table = LatencyTable(shapes, grid=(0.5, 1.0), cache=LatencyCache("t", folder=tmp_path), rounds=1)
    assert len(table.cache) == 8  # 2 layers x 2 x 2 grid points

    def fail():
        raise AssertionError("measured again")

    cache = LatencyCache("t", folder=tmp_path)
    cache.get_or_measure = lambda key, measure: LatencyCache.get_or_measure(cache, key, fail)
    again = LatencyTable(shapes, grid=(0.5, 1.0), cache=cache, rounds=1)  # read back, not timed
    full = again.ms("0.weight", 32, 16)
    assert full == table.ms("0.weight", 32, 16) == cache.get("linear-16x32-in16")
    half_rows = again.ms("0.weight", 16, 16)
    assert again.ms("0.weight", 24, 16) == pytest.approx((full + half_rows) / 2)  # linear in between
    assert structured_cost(shapes, {}, "latency", again) == pytest.approx(full + again.ms("2.weight", 8, 32))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_found_rates_write_a_plan_that_reruns_with_another_driver(tmp_path):
    model = mlp()
    plan = Plan([Rule(Filter(sparsity=0.9), type="Linear"), Rule(Column(sparsity=0.9), type="Linear")])
    soft = SoftThreshold(model, plan, SoftConfig(budget={"kind": "params", "reduction": 3}))
    soft.step()
    soft.finalize()
    found = rates_plan(model, plan.resolve(model))
    path = write_rates_plan(tmp_path / "rates.yaml", found, comment="rates found by method soft")
    assert path.read_text().startswith("# rates found by method soft\n")
    again = Plan.from_yaml(str(path))
    rerun = mlp()
    targets = again.resolve(rerun)
    hard_prune(rerun, ADMM(rerun, targets).targets)
    for name in ("0.weight", "2.weight", "4.weight"):  # same kept rows and columns per layer
        a, b = dict(model.named_parameters())[name] != 0, dict(rerun.named_parameters())[name] != 0
        assert (int(a.any(1).sum()), int(a.any(0).sum())) == (int(b.any(1).sum()), int(b.any(0).sum())), name


def kept_params(model: nn.Module, shapes, plan: Plan) -> float:
    hard_prune(model, plan.resolve(model))
    return structured_cost(shapes, {n: p != 0 for n, p in model.named_parameters() if n in shapes}, "params")


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.8])
def test_allocation_cost_reads_the_hard_prune_masks_without_touching_the_model(rate):
    import copy

    from admmcompress.drivers.allocation import cost_at_rates

    model = Residual().eval()
    with torch.no_grad():
        model.conv1.weight[:2] = 0  # zeros from an earlier stage count as pruned in both
    targets = Plan([Rule(Filter(sparsity=0.9), type="Conv2d"), Rule(Column(sparsity=0.9), type="Conv2d")]
                   ).resolve_coupled(model, X)
    shapes = gemm_shapes(model, X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = {t.key: rate * (i % 2 + 1) / 2 for i, t in enumerate(targets)}
    for kind in ("params", "macs"):
        trial = copy.deepcopy(model)  # the reference: hard-prune a copy and count what is left
        hard_prune(trial, [t.with_structure(t.structure.with_sparsity(r)) for t in targets if (r := rates[t.key])])
        expected = structured_cost(shapes, drop_unread_channels(targets, {n: p != 0 for n, p in
                                                                          trial.named_parameters()}), kind)
        assert cost_at_rates(model, targets, rates, shapes, kind) == expected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_allocation_baselines_refuse_quantization_rules_in_one_line():
    from admmcompress.structures import FixedPoint

    plan = Plan([Rule(Filter(sparsity=0.9), match="0"), Rule(FixedPoint(bits=4), match="2")])
    with pytest.raises(BudgetError, match=r"choose pruning rates; \['2.weight:fixed_point'\] quantize") as err:
        uniform_plan(mlp(), plan, {"kind": "params", "reduction": 2})
    assert "\n" not in str(err.value)


def test_uniform_and_sensitivity_allocations_meet_the_budget():
    model = mlp()
    shapes = gemm_shapes(model, None)
    dense = structured_cost(shapes, {}, "params")
    plan = Plan([Rule(Filter(sparsity=0.9), type="Linear")])
    uniform = uniform_plan(model, plan, {"kind": "params", "reduction": 2})
    assert len({r.structure.target_sparsity for r in uniform.rules}) == 1
    assert kept_params(mlp(), shapes, uniform) <= dense / 2
    assert kept_params(mlp(), shapes, uniform) >= 0.95 * dense / 2  # the smallest rate that meets it, not any
    x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))

    def accuracy(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    curves = sensitivity_curves(model, plan.resolve(model), accuracy, grid=(0.25, 0.5, 0.75))
    assert set(curves) == {"0.weight:filter", "2.weight:filter", "4.weight:filter"}
    scan = sensitivity_plan(model, plan, {"kind": "params", "reduction": 2}, curves)
    assert kept_params(mlp(), shapes, scan) <= dense / 2


def test_torch_pruning_global_allocation_meets_a_mac_budget():
    model = Residual().eval()
    plan = Plan([Rule(Filter(sparsity=0.9), type="Conv2d")])
    tp_plan = torch_pruning_plan(model, plan, {"kind": "macs", "reduction": 2}, X)
    trial = Residual().eval()
    trial.load_state_dict(model.state_dict())
    masks = hard_prune(trial, tp_plan.resolve_coupled(trial, X))  # reruns through the library's plan
    assert count_macs(compact(trial, X, masks).model, X) <= count_macs(model, X) / 2


def test_allocation_baselines_refuse_a_latency_budget_in_one_line():
    with pytest.raises(BudgetError, match="the allocation baselines take params or macs budgets, got latency"):
        uniform_plan(mlp(), Plan([Rule(Filter(sparsity=0.9), type="Linear")]), {"kind": "latency", "reduction": 2})
    with pytest.raises(BudgetError, match="a macs budget needs example="):  # not counted as params instead
        uniform_plan(mlp(), Plan([Rule(Filter(sparsity=0.9), type="Linear")]), {"kind": "macs", "reduction": 2})


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1), nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(nn.functional.max_pool1d(torch.relu(self.c2(torch.relu(self.c1(x)))), 4).flatten(1))


def test_conv1d_layers_are_counted_by_the_budget_and_unreached_layers_are_refused():
    model, x = Conv1dNet(), torch.randn(2, 4, 16)
    shapes = gemm_shapes(model, x)
    assert set(shapes) == {"c1.weight", "c2.weight", "fc.weight"}
    assert structured_cost(shapes, {}, "macs") == 16 * 12 * 16 + 16 * 48 * 16 + 4 * 64
    assert structured_cost(gemm_shapes(model, None), {}, "params") == sum(
        m.weight.numel() for m in (model.c1, model.c2, model.fc))
    plan = Plan([Rule(Filter(sparsity=0.9), type="Conv1d")])
    SoftThreshold(model, plan, SoftConfig(budget={"kind": "macs", "reduction": 2}), example=x)  # accepted
    model.unused = nn.Linear(4, 4)  # a layer the forward never reaches: pruning it would be free
    with pytest.raises(BudgetError, match=r"layers \['unused'\] did not run on the example input"):
        SoftThreshold(model, Plan([Rule(Filter(sparsity=0.9), type="Linear")]),
                      SoftConfig(budget={"kind": "macs", "reduction": 1.01}), example=x)


def test_the_torch_pruning_ratio_search_survives_a_cost_that_rises_again_at_high_ratios():
    """Torch-Pruning's global ranking can leave a model larger at ratio 0.95 than at 0.8 (it keeps some layers
    whole): the search takes the smallest ratio on a grid that meets the budget, then bisects below it."""
    from admmcompress.drivers.allocation import _smallest_feasible

    def cost(x: float) -> float:  # falls to 10 at x = 0.8, then rises to 60 at x = 0.95
        return 100 - 112.5 * x if x <= 0.8 else 10 + (x - 0.8) * 333.3

    found = _smallest_feasible(cost, 19.0, step=0.05, top=0.95, steps=20)
    assert abs(found - 0.72) < 1e-4 and cost(found) <= 19.0
    with pytest.raises(BudgetError, match="cannot be met at any rate up to 0.95"):
        _smallest_feasible(cost, 5.0, step=0.05, top=0.95, steps=20)

"""SS-Auto soft-constraint driver: exact group prox, penalty, budgets met, pins/bounds, compaction, resume."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from toy_models import Residual

from admmcompress.data import load_dataset
from admmcompress.drivers import get_driver
from admmcompress.drivers.budget import BudgetError
from admmcompress.drivers.soft import SoftConfig, SoftThreshold, group_soft_threshold
from admmcompress.executors.compact import compact
from admmcompress.models import LeNet300100
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.report.render import save_report
from admmcompress.structures import Column, Filter, Unstructured
from admmcompress.structures.groups import as_matrix, column_ids, row_ids
from admmcompress.train.config import ConfigError, RunConfig
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def objective(z: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, n: int, t: float) -> float:
    norms = torch.zeros(n, dtype=torch.float64).index_add_(0, ids.reshape(-1), z.reshape(-1).double() ** 2).sqrt()
    return float(0.5 * ((z - v).double() ** 2).sum() + t * norms.sum())


def test_group_soft_threshold_matches_the_closed_form_and_the_optimality_conditions():
    v = torch.randn(6, 5, dtype=torch.float64)
    ids, t = row_ids(6, 5), 1.7
    z = group_soft_threshold(v, ids, 6, t)
    for r in range(6):
        norm = float(v[r].norm())
        expected = v[r] * max(0.0, 1 - t / norm)
        assert torch.allclose(z[r], expected, atol=1e-12)
        if norm <= t:  # zero group: the subgradient condition ||V_g|| <= t holds
            assert torch.equal(z[r], torch.zeros(5, dtype=torch.float64))
        else:  # nonzero group: Z_g - V_g + t Z_g / ||Z_g|| = 0
            assert torch.allclose(z[r] - v[r] + t * z[r] / z[r].norm(), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_group_soft_threshold_is_the_minimizer_found_by_brute_force():
    # Two groups of two entries: a grid search over all of R^4 near the data finds no better point.
    v = torch.tensor([[1.2, -0.4, 0.3, 0.2]], dtype=torch.float64)
    ids, t = torch.tensor([[0, 0, 1, 1]]), 0.5
    z = group_soft_threshold(v, ids, 2, t)
    best = objective(z, v, ids, 2, t)
    grid = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64)
    values = [objective(torch.tensor([list(p)], dtype=torch.float64), v, ids, 2, t)
              for p in itertools.product(grid[::2], grid[::2], grid[10:21], grid[10:21])]
    assert best <= min(values) + 1e-12
    assert torch.equal(z[0, 2:], torch.zeros(2, dtype=torch.float64))  # ||(0.3, 0.2)|| < 0.5: zeroed
    # and random perturbations (the objective is convex: a local check is a global one)
    for _ in range(200):
        assert best <= objective(z + 0.05 * torch.randn_like(z), v, ids, 2, t) + 1e-12


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def row_col_plan(bound: float = 0.95) -> Plan:
    return Plan([Rule(Filter(sparsity=bound), type="Linear"), Rule(Column(sparsity=bound), type="Linear")])


def test_the_z_step_is_rows_then_columns_with_the_exact_threshold():
    model = nn.Linear(8, 6)
    with torch.no_grad():  # one weak row and one weak column, so both passes zero a group
        model.weight[0] *= 0.1
        model.weight[:, 3] *= 0.1
    cfg = SoftConfig(strength=0.005, rho=0.1, weighting="sqrt")
    soft = SoftThreshold(model, Plan([Rule(Column(sparsity=0.9), match=""), Rule(Filter(sparsity=0.9), match="")]),
                         cfg)
    w = model.weight.detach().clone()
    soft.step()
    t = cfg.strength / cfg.rho
    by_rows = group_soft_threshold(w, row_ids(6, 8), 6, t * 8 ** 0.5)  # rows first, sqrt(8 entries) each
    expected = group_soft_threshold(by_rows, column_ids(6, 8), 8, t * 6 ** 0.5)
    assert torch.allclose(soft.Z["weight"], expected, atol=1e-6)
    assert (expected[0] == 0).all() and (expected[:, 3] == 0).all() and (expected != 0).sum() == 5 * 7
    assert torch.equal(soft.U["weight"], w - soft.Z["weight"])  # U += W - Z from U = 0


def test_a_bound_caps_the_layers_strength_and_keeps_the_groups_in_order():
    """At most half the columns may go, the strength would zero three of four: the layer is thresholded at the
    largest strength that keeps its bound, so the kept columns keep their order (until 2026-12-07 the largest
    column below the threshold was kept unshrunk while a larger one above it was shrunk to 0.1)."""
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.1, 0.9, 0.5, 0.3]]))
    soft = SoftThreshold(model, Plan([Rule(Column(sparsity=0.5), match="")]),
                         SoftConfig(strength=1.0, rho=1.0, weighting="none"))
    soft.step()
    z = soft.Z["weight"][0].double()
    # the capped strength is 0.5, the largest column norm among the two zeroed: each kept column shrinks by it
    assert torch.allclose(z, torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    exact = group_soft_threshold(model.weight.detach().double(), column_ids(1, 4), 4, 0.5)[0]
    assert torch.allclose(z, exact, atol=1e-7)  # the exact prox at the capped strength
    out = (soft.finalize(), soft.summary()["soft"])[1]
    assert (out["targets"], out["targets_at_bound"], out["zeroed_at_bound"]) == (1, 1, 2)
    # a strength within the bound is not capped: 0.4 zeroes one column (0.3) and shrinks the rest by 0.4
    soft = SoftThreshold(nn.Linear(4, 1, bias=False), Plan([Rule(Column(sparsity=0.5), match="")]),
                         SoftConfig(strength=0.4, rho=1.0, weighting="none"))
    with torch.no_grad():
        soft._params["weight"].copy_(torch.tensor([[1.1, 0.9, 0.5, 0.3]]))
    soft.step()
    assert torch.allclose(soft.Z["weight"][0], torch.tensor([0.7, 0.5, 0.1, 0.0]), atol=1e-6)
    assert soft.summary()["soft"]["history"][-1]["strength"] == 0.4


def test_penalty_gradient_is_rho_times_w_minus_z_plus_u_and_finite_at_the_start():
    model = mlp()
    soft = SoftThreshold(model, row_col_plan(), SoftConfig(strength=1e-3, rho=0.3))
    model.zero_grad()
    soft.penalty().backward()  # Z = W, U = 0: zero penalty, zero (finite) gradient
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in (model[0].weight, model[2].weight))
    soft.step()
    with torch.no_grad():
        model[0].weight.add_(0.01)
    model.zero_grad()
    soft.penalty().backward()
    expected = 0.3 * (model[0].weight - soft.Z["0.weight"] + soft.U["0.weight"])
    assert torch.allclose(model[0].weight.grad, expected, atol=1e-6)


def structured_params(model: nn.Module) -> int:
    """Independent count: kept rows x kept columns of every Linear/Conv2d weight (nonzero in the model)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = as_matrix(m.weight.detach()) != 0
            total += int(w.any(1).sum()) * int(w.any(0).sum())
    return total


def structured_macs(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(m, _i, out):
        nonlocal total
        w = as_matrix(m.weight.detach()) != 0
        total += int(w.any(1).sum()) * int(w.any(0).sum()) * (out[0].numel() // m.weight.shape[0])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def train_a_little(model, driver, x, y, steps=6, every=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + driver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % every == 0:
            driver.step()


@pytest.mark.parametrize("budget", [{"kind": "params", "reduction": 3}, {"kind": "params", "value": 2000},
                                    {"kind": "params", "fraction": 0.5}])
def test_parameter_budgets_are_met_within_one_percent(budget):
    model, x, y = mlp(), torch.randn(64, 32), torch.randint(0, 10, (64,))
    dense = structured_params(model)
    soft = SoftThreshold(model, row_col_plan(), SoftConfig(rho=0.1, budget=budget, ramp=0.5), updates=3)
    train_a_little(model, soft, x, y)
    soft.finalize()
    target = budget.get("value") or dense * budget.get("fraction", 1) / budget.get("reduction", 1)
    assert 0.99 * target <= structured_params(model) <= target
    assert soft.final_cost == structured_params(model)
    out = soft.summary()["soft"]
    assert out["cut_by_final_topk"] == 0 and out["zeroed_by_soft_threshold"] > 0  # the threshold did it all


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("weighting", ["cost", "sqrt"])
def test_mac_budgets_are_met_within_one_percent(weighting):
    model, x, y = SmallCNN(), torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    dense = structured_macs(model, x)
    plan = Plan([Rule(Filter(sparsity=0.9), type="Conv2d"), Rule(Column(sparsity=0.9), type="Conv2d"),
                 Rule(Column(sparsity=0.9), type="Linear")])
    cfg = SoftConfig(rho=0.1, budget={"kind": "macs", "reduction": 4}, weighting=weighting)
    soft = SoftThreshold(model, plan, cfg, example=x[:2], updates=2)
    train_a_little(model, soft, x, y, steps=4)
    soft.finalize()
    assert 0.99 * dense / 4 <= structured_macs(model, x) <= dense / 4


def test_latency_budget_is_met_on_the_table_and_the_result_compacts(tmp_path, monkeypatch):
    from admmcompress.drivers import budget as budget_module
    from admmcompress.drivers.budget import LatencyTable, gemm_shapes, structured_cost
    from admmcompress.timing import LatencyCache

    # Deterministic "measurements" (a unit test never times): a fixed overhead plus the layer's MACs.
    def fake_time(build, rounds):
        layer, x = build()
        with torch.no_grad():
            return 0.01 + 1e-6 * layer.weight.numel() * layer(x)[0, 0].numel()

    monkeypatch.setattr(budget_module, "_time", fake_time)
    model, x, y = SmallCNN(), torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    plan = Plan([Rule(Filter(sparsity=0.9), type="Conv2d"), Rule(Column(sparsity=0.9), type="Conv2d"),
                 Rule(Column(sparsity=0.9), type="Linear")])
    table = LatencyTable(gemm_shapes(model, x[:2]), cache=LatencyCache("test", folder=tmp_path))
    again = LatencyTable(gemm_shapes(model, x[:2]), cache=LatencyCache("test", folder=tmp_path))
    assert len(again.cache) == len(table.cache) > 0  # measured once per machine: the second table read the cache
    cfg = SoftConfig(rho=0.1, budget={"kind": "latency", "reduction": 2})
    soft = SoftThreshold(model, plan, cfg, example=x[:2], updates=2, latency=table)
    train_a_little(model, soft, x, y, steps=4)
    soft.finalize()
    dense_ms = structured_cost(gemm_shapes(SmallCNN(), x[:2]), {}, "latency", table)
    assert soft.dense_cost == pytest.approx(dense_ms)
    assert 0.99 * dense_ms / 2 <= soft.final_cost <= dense_ms / 2
    small = compact(copy.deepcopy(model).eval(), x[:2]).model
    with torch.no_grad():
        assert torch.allclose(small(x), model.eval()(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in SmallCNN().parameters())


def test_a_phase_cut_short_meets_the_budget_by_the_final_cut_and_says_so():
    model = mlp()
    soft = SoftThreshold(model, row_col_plan(), SoftConfig(budget={"kind": "params", "reduction": 2}), updates=10)
    soft.finalize()  # no update ran: every pruned group comes from the final top-k cut
    out = soft.summary()["soft"]
    assert out["zeroed_by_soft_threshold"] == 0 and out["cut_by_final_topk"] > 0
    assert out["share_soft_threshold"] == 0.0
    assert soft.final_cost <= soft.target_cost


def test_pins_bounds_and_excluded_layers_are_respected():
    model = mlp()
    fc3 = model[4].weight.detach().clone()
    plan = Plan([Rule(Filter(sparsity=0.3), match="0"), Rule(Filter(sparsity=0.95), match="2"),
                 Rule(Column(sparsity=0.95), match="2")])  # layer 4 has no rule: excluded
    soft = SoftThreshold(model, plan, SoftConfig(budget={"kind": "params", "reduction": 1.4}, pin={"2": 0.25}))
    soft.step()
    soft.finalize()
    rows0 = int((model[0].weight != 0).any(1).sum())
    assert rows0 >= 64 - round(0.3 * 64)  # bound: at most 30% of layer 0's rows go
    w2 = model[2].weight != 0
    assert int(w2.any(1).sum()) == 48 and int(w2.any(0).sum()) == 48  # pinned at 25% rows and 25% columns
    assert torch.equal(model[4].weight.detach(), fc3)


def test_pins_hold_when_finalize_comes_before_any_update():
    model = mlp()
    soft = SoftThreshold(model, row_col_plan(), SoftConfig(pin={"2": 0.25}))
    soft.finalize()
    w2 = model[2].weight != 0
    assert int(w2.any(1).sum()) == 48 and int(w2.any(0).sum()) == 48  # 25% of rows and columns, as pinned
    assert bool((model[0].weight != 0).all())  # no update: nothing else is pruned


def test_coupled_result_compacts_exactly_on_a_residual_model():
    model, x = Residual().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
    plan = Plan([Rule(Filter(sparsity=0.8), type="Conv2d"), Rule(Column(sparsity=0.8), match="conv2")])
    targets = plan.resolve_coupled(model, x, "strict")
    soft = SoftThreshold(model, targets, SoftConfig(rho=0.1, budget={"kind": "macs", "reduction": 2}), example=x)
    # the coupled Z-step shrinks each channel group as one: its virtual rows get the row-wise exact prox
    first = targets[0]
    rows = first.value(dict(model.named_parameters())).detach()
    t = float(rows.norm(dim=1).median())  # zeroes about half the channel groups
    alone = SoftThreshold(copy.deepcopy(model), [first], SoftConfig(strength=0.1 * t, rho=0.1, weighting="none"))
    alone.step()
    expected = group_soft_threshold(rows, row_ids(*rows.shape), rows.shape[0], t)
    assert torch.allclose(first.value(alone.Z), expected, atol=1e-6)
    assert 0 < int((expected.abs().sum(1) == 0).sum()) < rows.shape[0]  # the threshold zeroed some groups
    soft.step()
    masks = soft.finalize()
    assert soft.final_cost <= soft.target_cost
    result = compact(model, x, masks)
    fresh = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert (result.model(fresh) - model(fresh)).abs().max() <= 1e-5
    assert result.params_after < result.params_before


class ReadsItsOwnChannels(nn.Module):
    """``mix`` writes and reads the same residual channels: its weight is in one coupled group twice."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.mix(torch.relu(h))
        return self.head(h)


def test_an_entry_in_two_groups_of_a_coupled_target_takes_both_factors_and_the_budget_holds():
    model, x = ReadsItsOwnChannels(), torch.randn(4, 6)
    plan = Plan([Rule(Filter(sparsity=0.9), match="stem"), Rule(Filter(sparsity=0.9), match="mix")])
    targets = plan.resolve_coupled(model, x, "strict")
    soft = SoftThreshold(model, targets, SoftConfig(rho=0.1, budget={"kind": "params", "reduction": 1.5}))
    soft.step()
    dead = (soft.Z["stem.weight"] == 0).all(1)  # the channel groups the threshold zeroed
    z = soft.Z["mix.weight"]
    assert 0 < int(dead.sum()) < 8 and bool((z[dead] == 0).all()) and bool((z[:, dead] == 0).all())
    kept = 8 - int(dead.sum())
    assert soft.history[-1]["cost"] == kept * 6 + kept * kept + 3 * kept  # stem, mix, head: counted as Z holds it
    masks = soft.finalize()
    assert soft.final_cost <= soft.target_cost
    assert structured_params(model) == soft.final_cost  # what the driver counted is what the model holds
    mix = model.mix.weight.detach()
    dead = (mix == 0).all(1)  # channels whose mix row was zeroed: their mix column must be zero too
    assert 0 < int(dead.sum()) < 8 and bool((mix[:, dead] == 0).all())
    assert bool((masks["mix.weight"] == (mix != 0)).all())


def test_state_dict_resume_is_exact():
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    model = mlp()
    cfg = SoftConfig(rho=0.1, rho_growth=1.5, budget={"kind": "params", "reduction": 3})  # rho is state too
    soft = SoftThreshold(model, row_col_plan(), cfg, updates=4)
    train_a_little(model, soft, x, y, steps=4)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(soft.state_dict())
    train_a_little(model, soft, x, y, steps=4)
    soft.finalize()
    other = mlp()
    other.load_state_dict(saved_model)
    again = SoftThreshold(other, row_col_plan(), cfg, updates=4)
    again.load_state_dict(saved_state)
    train_a_little(other, again, x, y, steps=4)
    again.finalize()
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    assert again.strength == soft.strength and again.history == soft.history and again.rho == soft.rho


def test_rho_grows_per_update_up_to_its_cap_and_the_penalty_and_threshold_use_it():
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    model = mlp()
    soft = SoftThreshold(model, row_col_plan(), SoftConfig(strength=1e-3, rho=0.1, rho_growth=2.0, rho_max=0.5))
    train_a_little(model, soft, x, y, steps=8, every=2)
    assert [e["rho"] for e in soft.history] == [0.1, 0.2, 0.4, 0.5] and soft.rho == 0.5
    model.zero_grad()
    soft.penalty().backward()
    expected = 0.5 * (model[0].weight - soft.Z["0.weight"] + soft.U["0.weight"])
    assert torch.allclose(model[0].weight.grad, expected, atol=1e-6)
    # the Z-step thresholds at lambda w_g / rho with the rho of that update: a larger rho zeroes fewer groups
    v = {n: p.detach() for n, p in model.named_parameters() if n in soft.names}
    zeroed = {}
    for rho in (0.1, 0.5):
        soft.rho = rho
        zeroed[rho] = sum(int(z.sum()) for z in soft._prox(v, 3e-2)[1].values())
    assert 0 < zeroed[0.5] < zeroed[0.1]
    with pytest.raises(ValueError, match=r"rho_growth=0.5 must be >= 1"):
        SoftConfig(rho_growth=0.5)


def test_rescale_dual_scales_u_by_the_rho_ratio_at_each_growth():
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    model = mlp()
    cfg = SoftConfig(strength=1e-3, rho=0.1, rho_growth=2.0, rho_max=0.5, rescale_dual=True)
    twin = copy.deepcopy(model)
    soft = SoftThreshold(model, row_col_plan(), cfg)
    plain = SoftThreshold(twin, row_col_plan(), SoftConfig(strength=1e-3, rho=0.1, rho_growth=2.0, rho_max=0.5))
    train_a_little(model, soft, x, y, steps=2, every=2)
    train_a_little(twin, plain, x, y, steps=2, every=2)
    # same data and weights up to the first update: U differs by the factor rho_old / rho_new only
    for n in soft.names:
        torch.testing.assert_close(soft.U[n], plain.U[n] * 0.5)
    assert soft.rho == plain.rho == 0.2
    model.zero_grad()
    soft.penalty().backward()  # the penalty after the update pulls toward Z - U with the rescaled U, at the new rho
    expected = 0.2 * (model[0].weight - soft.Z["0.weight"] + soft.U["0.weight"])
    torch.testing.assert_close(model[0].weight.grad, expected)
    resumed = SoftThreshold(copy.deepcopy(model), row_col_plan(), cfg)
    resumed.load_state_dict(soft.state_dict())
    assert resumed.rho == 0.2 and all(torch.equal(resumed.U[n], soft.U[n]) for n in soft.names)
    train_a_little(model, soft, x, y, steps=6, every=2)  # up to the cap: no rescaling once rho stops growing
    assert [e["rho"] for e in soft.history] == [0.1, 0.2, 0.4, 0.5] and soft.schedule.dual_scale(0.5) == 1.0


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"kind": "params", "fraction": -0.5}, r"fraction=-0.5 must be in \(0, 1\]"),
        ({"kind": "params", "value": -10}, r"value=-10 must be > 0"),
        ({"kind": "params", "value": 1e9}, r"value=1e\+09 params is above the dense model's"),
        ({"kind": "params", "reduction": 0.5}, r"reduction=0.5 must be >= 1"),
        ({"kind": "flops", "reduction": 2}, r"budget kind='flops'; choose one of"),
        ({"kind": "params", "reduction": 2, "fraction": 0.5}, r"exactly one of value, fraction or reduction"),
        ({"kind": "params", "reduction": 1000}, r"below the least this plan allows"),
    ],
)
def test_bad_budgets_are_refused_with_one_line(budget, message):
    with pytest.raises(ValueError, match=message) as err:
        SoftThreshold(mlp(), row_col_plan(), SoftConfig(budget=budget))
    assert "\n" not in str(err.value)


def test_mac_budget_without_an_input_and_other_structures_are_refused():
    with pytest.raises(BudgetError, match="needs example="):
        SoftThreshold(SmallCNN(), Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]),
                      SoftConfig(budget={"kind": "macs", "reduction": 2}))
    with pytest.raises(PlanError, match="method soft prunes rows and columns"):
        SoftThreshold(mlp(), Plan([Rule(Unstructured(sparsity=0.5), type="Linear")]))


def soft_run_config(**options):
    return RunConfig.from_dict({
        "model": {"name": "lenet300100"},
        "pretrained": "<in-memory>",
        "data": {"batch_size": 64},
        "stages": [{
            "plan": {"rules": [{"type": "Linear", "structure": "filter", "sparsity": 0.95},
                               {"type": "Linear", "structure": "column", "sparsity": 0.95}]},
            "method": "soft",
            "options": {"rho": 0.01, "budget": {"kind": "params", "reduction": 4}, **options},
            "admm": {"epochs": 2, "update_every_steps": 2},
            "retrain": {"epochs": 1},
        }],
    })


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", "train", limit=256), load_dataset("mnist", "test", limit=64)


def test_runner_stage_meets_the_budget_and_resumes_bit_identically(mnist, monkeypatch, tmp_path):
    cfg = soft_run_config()
    assert get_driver("soft").cls is SoftThreshold
    torch.manual_seed(0)
    full = Runner(cfg, LeNet300100(), *mnist, progress=False, train_dense=False)
    metrics = full.run()
    dense = 784 * 300 + 300 * 100 + 100 * 10
    assert 0.99 * dense / 4 <= structured_params(full.model) <= dense / 4
    record = metrics["stages"][0]["soft"]
    assert record["budget"]["final"] == structured_params(full.model) and record["rates"]["fc1"]["rows"] == 300
    calls = {"n": 0}
    original = Runner._record

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second driving epoch dies: resumes mid-phase
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", crash)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, LeNet300100(), *mnist, out_dir=tmp_path, progress=False, train_dense=False).run()
    monkeypatch.undo()
    torch.manual_seed(5)
    resumed = Runner(cfg, LeNet300100(), *mnist, out_dir=tmp_path, progress=False, train_dense=False)
    resumed.run(resume=True)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    text = save_report(tmp_path / "report", metrics, full.history, "soft")  # report.md: the rates table + plot
    assert "## Rates found (SS-Auto)" in text and "| fc1 | " in text and (tmp_path / "report" / "rates.png").is_file()


def test_run_config_refuses_bad_options_with_one_line():
    with pytest.raises(ConfigError, match=r"soft weighting='flat'; choose one of") as err:
        soft_run_config(weighting="flat")
    assert "\n" not in str(err.value)


def test_a_budget_the_plan_cannot_meet_is_refused_by_dry_run_before_training(tmp_path, capsys):
    import yaml

    from admmcompress.cli import main

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "lenet5_ss_auto.yaml").read_text())
    config["pretrained"] = str(Path(__file__).resolve().parents[2] / "checkpoints" / "lenet5_mnist_dense.safetensors")
    config["stages"][0]["options"]["budget"] = {"kind": "macs", "reduction": 1e6}
    path = tmp_path / "too_small.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages[0]:" in err[0] and "below the least this plan allows" in err[0]


def test_a_pin_that_matches_no_target_is_one_line():
    with pytest.raises(PlanError, match=r"soft pin \['fc_9'\] matches no target layer"):
        SoftThreshold(mlp(), row_col_plan(), SoftConfig(pin={"fc_9": 0.5}))
    with pytest.raises(PlanError, match=r"soft pin above its rule's sparsity.*pin 0.5 > 0.3"):
        SoftThreshold(mlp(), row_col_plan(bound=0.3), SoftConfig(pin={"0": 0.5}))

"""Tucker-2 convs (1x1 -> k x k -> 1x1), the ADMM route to them, and rank search from a latency table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from admmcompress.drivers import ADMM
from admmcompress.drivers.factorize import FactorizeTransform
from admmcompress.executors import ExecutorError, get_executor
from admmcompress.executors import rank_search as rs
from admmcompress.executors.tucker import Tucker2Conv, factorize_tucker2
from admmcompress.plan import Plan, PlanError
from admmcompress.structures import Filter, Tucker2, Unstructured
from admmcompress.timing import LatencyCache

pytest.importorskip("tensorly")


def seeded_conv(*args, seed: int = 0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(*args, **kwargs)


@pytest.mark.parametrize("ranks", [(5, 3), (2, 2), (8, 6)])
@pytest.mark.parametrize("geometry", [{"padding": 1}, {"stride": 2, "padding": 1, "bias": False}, {"dilation": 2}])
def test_factorized_module_equals_the_conv_of_the_projected_weight(ranks, geometry):
    conv = seeded_conv(6, 8, 3, **geometry)
    block = Tucker2Conv.from_conv(conv, ranks)
    x = torch.randn(2, 6, 9, 9)
    projected = Tucker2(ranks=ranks).project(conv.weight.detach())
    expected = F.conv2d(x, projected, conv.bias, conv.stride, conv.padding, conv.dilation)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)
    assert block.ranks == ranks and torch.allclose(block.weight, projected, atol=1e-5)


def test_full_rank_factorization_reproduces_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2)).eval()
    x = torch.randn(2, 3, 10, 10)
    small = get_executor("tucker").convert(model, ranks={"0": (8, 3), "2": (4, 8)})
    assert isinstance(model[0], nn.Conv2d), "convert must leave its input unchanged"
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_factorization_errors_name_the_problem():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"ranks \(9, 3\) must be within the conv's \(out=8, in=3\)"):
        factorize_tucker2(model, {"0": (9, 3)})
    with pytest.raises(ValueError, match="layer '1' is ReLU"):
        factorize_tucker2(model, {"1": (1, 1)})


@pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")  # three steps are too few to converge
def test_admm_with_tucker2_ends_in_factorized_convs_and_composes_with_filter_pruning():
    """One plan: Tucker-2 on one conv, filter pruning on another; ADMM's finalize factors one, masks the other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    plan = Plan({"0": Tucker2(ranks=(4, 2)), "2": Filter(sparsity=0.5)})
    admm = ADMM(model, plan, rho=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        loss = model(x).pow(2).mean() + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        admm.step()
    projected = Tucker2(ranks=(4, 2)).project(model[0].weight.detach())
    outcome = admm.finalize()
    assert isinstance(outcome, FactorizeTransform)
    assert set(outcome.masks.masks) == {"2.weight"}
    outcome.apply(model)
    assert isinstance(model[0], Tucker2Conv) and torch.allclose(model[0].weight, projected, atol=1e-5)
    assert int(model[2].weight.detach().flatten(1).norm(dim=1).ne(0).sum()) == 4
    # --resume / report rebuild the same module structure from the recorded spec.
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    ADMM.rebuild(fresh, outcome.spec())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_factorized_layer_takes_no_other_target():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    plan = Plan({"0": Tucker2(ranks=(2, 2))})
    plan.rules.append(Plan({"0": Unstructured(sparsity=0.5)}).rules[0])
    with pytest.raises(PlanError, match="factorized"):
        ADMM.check_targets(plan.resolve(model))


# --- rank search -------------------------------------------------------------------------------------------


def random_tables(seed: int, layers: int = 3, options: int = 3):
    g = torch.Generator().manual_seed(seed)
    costs, losses = {}, {}
    for n in range(layers):
        cands = [None] + [(k + 1, k + 1) for k in range(options - 1)]
        costs[f"l{n}"] = {c: float(torch.rand((), generator=g)) + 0.1 for c in cands}
        losses[f"l{n}"] = {c: 0.0 if c is None else float(torch.rand((), generator=g)) for c in cands}
    return costs, losses


@pytest.mark.parametrize("seed", range(5))
def test_rank_choice_is_the_brute_force_optimum_and_deterministic(seed):
    costs, losses = random_tables(seed)
    budget = 0.7 * sum(max(c.values()) for c in costs.values())
    chosen = rs.choose_ranks(costs, losses, budget, quantum=1e-4)
    assert chosen == rs.choose_ranks(costs, losses, budget, quantum=1e-4)
    assert rs.total(costs, chosen) <= budget
    names = list(costs)
    feasible = [dict(zip(names, pick, strict=True)) for pick in itertools.product(*(list(costs[n]) for n in names))
                if sum(costs[n][r] for n, r in zip(names, pick, strict=True)) <= budget - 1e-3]
    best = min(sum(losses[n][r] for n, r in f.items()) for f in feasible)
    assert sum(losses[n][r] for n, r in chosen.items()) <= best + 1e-12


def test_rank_choice_errors_when_the_budget_is_too_small():
    costs, losses = random_tables(0)
    with pytest.raises(ValueError, match="below the cheapest choice"):
        rs.choose_ranks(costs, losses, 0.01)


def test_latency_table_is_cached_per_shape(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    shapes = rs.layer_shapes(model, torch.randn(1, 3, 6, 6), ["0", "1"])
    assert shapes["1"].macs(None) == 36 * 8 * 8 * 9
    cache = LatencyCache("test", folder=tmp_path)
    first = rs.latency_table(shapes, fractions=(0.5, 1.0), cache=cache, rounds=1)
    assert set(first["0"]) == {None, (4, 2), (8, 3)}

    def no_timing(*_a, **_k):
        raise AssertionError("a cached shape was timed again")

    monkeypatch.setattr(rs, "time_interleaved", no_timing)
    again = rs.latency_table(shapes, fractions=(0.5, 1.0), cache=LatencyCache("test", folder=tmp_path), rounds=1)
    assert again == first
    losses = rs.reconstruction_losses(model, first)
    assert losses["1"][None] == 0.0 and math.isclose(losses["1"][(8, 8)], 0.0, abs_tol=1e-10)


def test_reconstruction_losses_equal_the_truncated_hosvd_of_each_candidate():
    """One SVD per mode, sliced per candidate: the same loss as TensorLy's HOSVD at those ranks."""
    from admmcompress.structures.lowrank import tucker2_factors, tucker2_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 10, 3))
    table = {"0": {None: 1.0, (10, 12): 1.0, (5, 7): 0.5, (1, 1): 0.1, (3, 12): 0.3}}
    losses = rs.reconstruction_losses(model, table)["0"]
    weight = model[0].weight.detach().double()
    for ranks in [(10, 12), (5, 7), (1, 1), (3, 12)]:
        approx = tucker2_weight(*tucker2_factors(weight, ranks))
        assert math.isclose(losses[ranks], float((weight - approx).pow(2).sum() / weight.pow(2).sum()),
                            rel_tol=1e-9, abs_tol=1e-12)
    assert losses[None] == 0.0 and losses[(1, 1)] > losses[(5, 7)] > losses[(10, 12)]
    with pytest.raises(ValueError, match="Tucker2 ranks \\(11, 2\\) must be within"):
        rs.reconstruction_losses(model, {"0": {(11, 2): 1.0}})
    # an expanding 1x1 conv: mode 0's unfolding has only 16 singular vectors, yet ranks up to 32 are valid
    wide = nn.Sequential(nn.Conv2d(16, 32, 1))
    full = rs.reconstruction_losses(wide, {"0": {(32, 16): 1.0, (20, 10): 0.5}})["0"]
    assert math.isclose(full[(32, 16)], 0.0, abs_tol=1e-12) and full[(20, 10)] > 0


def test_onnx_export_of_a_tucker_model_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from admmcompress.executors.onnx_export import export_onnx, run_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    small = get_executor("tucker").convert(model, ranks={"0": (4, 2), "2": (2, 4)}).eval()
    x = torch.randn(2, 3, 8, 8)
    export_onnx(small, (x,), tmp_path / "tucker.onnx")
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(run_onnx(tmp_path / "tucker.onnx", x)[0]), small(x), atol=1e-5)


@pytest.mark.parametrize("ranks", [np.array([4, 4]), torch.tensor([4, 4]), [np.int64(4), 4]])
def test_integer_ranks_from_arrays_are_accepted(ranks):
    converted = get_executor("tucker").convert(nn.Sequential(nn.Conv2d(8, 8, 3)), ranks={"0": ranks})
    assert isinstance(converted[0], Tucker2Conv)


@pytest.mark.parametrize("ranks", [4, (4,), (3.9, 7.99), "42", (0, 2), (True, 2), np.array([4.5, 4.0])])
def test_malformed_ranks_are_refused_never_truncated(ranks):
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    with pytest.raises(ExecutorError, match=r"tucker: layer '0': Tucker2: ranks=.* must be two positive integers"):
        get_executor("tucker").convert(model, ranks={"0": ranks})


def test_rank_choice_refuses_an_infinite_budget_and_a_layer_without_candidates():
    costs, losses = random_tables(0)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        rs.choose_ranks(costs, losses, math.inf)
    name = next(iter(costs))
    with pytest.raises(ValueError, match=f"layer '{name}' has no candidate"):
        rs.choose_ranks({**costs, name: {}}, losses, 1.0)


def test_layer_shape_keeps_text_padding_and_the_padding_mode():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Conv2d(4, 4, 3, padding="valid"))
    shapes = rs.layer_shapes(model, torch.randn(1, 4, 8, 8), ["0", "1", "2", "3"])
    assert shapes["0"].out_hw() == (8, 8) and shapes["3"].out_hw() == (6, 6)
    assert rs.flop_table(shapes)["0"][None] == shapes["1"].macs(None)
    assert shapes["1"].key(None, 1) != shapes["2"].key(None, 1)
    assert shapes["2"].conv().padding_mode == "circular"
    assert shapes["1"].key(None, 1) == "4x4 k(3, 3) s(1, 1) p(1, 1) d(1, 1) b1 in8x8 | dense | batch 1"  # cached keys

"""N:M semi-structured sparsity: exact projection, plans, ADMM and gradual drivers, clear errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM, GradualMagnitude
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.structures import NM, structure_from_dict


def runs_keep(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every run of m consecutive GEMM-row entries has at most n nonzeros."""
    rows = weight.reshape(weight.shape[0], -1)
    return bool(((rows.reshape(-1, m) != 0).sum(1) <= n).all())


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4)])
def test_projection_is_the_closest_point_with_n_of_every_m(n, m):
    w = torch.randn(1, 2 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    projected = NM(n=n, m=m).project(w)
    best = None
    for first, second in itertools.product(itertools.combinations(range(m), n), repeat=2):
        mask = torch.zeros(2 * m, dtype=torch.bool)
        mask[list(first)] = True
        mask[[m + i for i in second]] = True
        cost = float(((w[0] - w[0] * mask) ** 2).sum())
        best = cost if best is None else min(best, cost)
    assert float(((w - projected) ** 2).sum()) == pytest.approx(best, abs=1e-12)
    assert runs_keep(projected, n, m) and ((projected != 0).sum() == 2 * n)


def test_conv_weights_are_cut_along_the_gemm_row():
    w = torch.randn(3, 2, 2, 2)  # 8 GEMM columns per filter
    assert runs_keep(NM(n=2, m=4).project(w), 2, 4)


def test_plan_yaml_and_sparsity():
    plan = Plan.from_yaml("rules:\n  - {type: Linear, exclude: [head], structure: nm, n: 2, m: 4}\n")
    structure = plan.rules[0].structure
    assert structure == NM(n=2, m=4) and structure.target_sparsity == 0.5
    assert structure_from_dict({"structure": "2:4"} | {"structure": "n:m", "n": 4, "m": 8}) == NM(n=4, m=8)
    assert NM(n=2, m=4).runs_on_hardware and not NM(n=1, m=3).runs_on_hardware


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n": 4, "m": 4}, "must be integers with 0 < n < m"),
        ({"n": 0, "m": 4}, "must be integers with 0 < n < m"),
        ({"n": 2, "m": 4, "sparsity": 0.9}, "would keep fewer than n=2 of every 4"),
    ],
)
def test_bad_patterns_are_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NM(**kwargs)


def test_a_layer_whose_rows_do_not_split_into_runs_is_refused_naming_the_fix():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 2))
    with pytest.raises(PlanError, match=r"layer '3': its GEMM rows have 3 weights, not a multiple of m=4"):
        Plan([Rule(NM(), type="Linear")]).resolve(model)
    assert len(Plan([Rule(NM(), type="Linear", exclude="3")]).resolve(model)) == 2


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.filterwarnings("ignore:ADMM residual")  # 20 steps are too few to converge; the masks are the point
def test_admm_ends_in_n_of_m_masks():
    model = mlp()
    admm = ADMM(model, Plan([Rule(NM(n=2, m=4), type="Linear")]), rho=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for step in range(20):
        loss = nn.functional.cross_entropy(model(x), y) + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4:
            admm.step()
    masks = admm.finalize()
    for layer in ("0", "2"):
        weight = model.get_submodule(layer).weight
        assert runs_keep(weight, 2, 4) and int((weight != 0).sum()) == weight.numel() // 2
    assert masks is not None


def test_gradual_ramps_each_run_down_to_n():
    model = mlp()
    gradual = GradualMagnitude(model, Plan([Rule(NM(n=1, m=4), type="Linear")]), updates=3)
    kept = []
    for _ in range(3):
        gradual.step()
        kept.append(int((model[0].weight != 0).sum()))
    assert kept == sorted(kept, reverse=True) and kept[-1] == model[0].weight.numel() // 4
    assert runs_keep(model[0].weight, 1, 4) and runs_keep(model[2].weight, 1, 4)

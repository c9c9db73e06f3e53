"""The ADMM driver: penalty and gradient (SPEC P1), Z/U updates, rho schedule, state, finalize (P4)."""

import copy
import io
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.finalize import MaskSet
from admmcompress.plan import Plan
from admmcompress.structures import Column, Filter, SparsityStructure, Unstructured

STRUCTURES = [Unstructured(sparsity=0.75), Filter(sparsity=0.5), Column(sparsity=0.5)]


def regression_problem(seed=0, n=256, d_in=16, d_out=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w_true = torch.randn(d_out, d_in, generator=g)
    y = x @ w_true.T + 0.1 * torch.randn(n, d_out, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out)
    return model, x, y


def fit(model, x, y, steps, admm=None, lr=0.2):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        if admm is not None:
            loss = loss + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return nn.functional.mse_loss(model(x), y).item()


def pretrained(seed=0):
    model, x, y = regression_problem(seed)
    fit(model, x, y, 100)
    return model, x, y


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def cnn_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)


def cnn_plan():
    return Plan.from_dict(
        [
            {"match": "0", "structure": "filter", "sparsity": 0.5},
            {"match": "0", "structure": "column", "sparsity": 0.5},
            {"match": "3", "structure": "unstructured", "compression": 8},
        ]
    )


def cnn_train(model, admm, steps, seed=0, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(steps):
        x, y = cnn_batch(seed * 1000 + i)
        loss = nn.functional.cross_entropy(model(x), y) + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_feasible(structure, z):
    """Z lies in the structure's set: projecting it changes nothing and at most k groups are nonzero."""
    assert torch.equal(structure.project(z), z)
    ids, n = structure.group_ids(z)
    nonzero_groups = torch.zeros(n, dtype=torch.bool)
    nonzero_groups[ids[(z != 0).reshape(ids.shape)]] = True
    assert int(nonzero_groups.sum()) <= structure.kept_groups(z)


# --- the penalty (SPEC P1) ---------------------------------------------------------------------


def test_penalty_and_gradient_finite_at_w_equals_z_and_u_zero():
    model = nn.Linear(6, 4)
    with torch.no_grad():  # W already has the structure, so Z = project(W) = W and U = 0
        model.weight.mul_(Filter(sparsity=0.5).support(model.weight))
    admm = ADMM(model, Plan({"": Filter(sparsity=0.5)}), rho=1e-3)
    s = admm.state["weight:filter"]
    assert torch.equal(s["Z"], model.weight.detach()) and not s["U"].any()
    penalty = admm.penalty()
    assert penalty.item() == 0.0
    penalty.backward()
    assert torch.isfinite(model.weight.grad).all()
    assert not model.weight.grad.any()


def test_penalty_finite_at_all_zero_weights():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.zero_()
    admm = ADMM(model, Plan({"": Unstructured(sparsity=0.5)}))
    admm.penalty().backward()
    assert torch.isfinite(model.weight.grad).all() and not model.weight.grad.any()


def test_penalty_value_and_gradient_formula_after_steps():
    model, x, y = pretrained()
    admm = ADMM(model, Plan({"": Column(sparsity=0.5)}), rho=RhoSchedule(0.3, 1.3, 1.0))
    for _ in range(2):
        fit(model, x, y, 10, admm)
        admm.step()
    s = admm.state["weight:column"]
    assert s["U"].abs().sum() > 0
    w = model.weight.detach()
    model.zero_grad()
    penalty = admm.penalty()
    expected_value = 0.5 * s["rho"] * ((w - s["Z"] + s["U"]) ** 2).sum()
    torch.testing.assert_close(penalty.detach(), expected_value, rtol=1e-5, atol=0)
    penalty.backward()
    torch.testing.assert_close(model.weight.grad, s["rho"] * (w - s["Z"] + s["U"]), rtol=1e-5, atol=1e-7)
    assert model.bias.grad is None or not model.bias.grad.any()


def test_penalty_sums_every_target_on_a_parameter():
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=0.1)
    cnn_train(model, admm, 3)
    admm.step()
    cnn_train(model, admm, 3, seed=1)
    model.zero_grad()
    admm.penalty().backward()
    w = model[0].weight.detach()
    expected = sum(
        admm.state[k]["rho"] * (w - admm.state[k]["Z"] + admm.state[k]["U"])
        for k in ("0.weight:filter", "0.weight:column")
    )
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-5, atol=1e-7)


def test_no_targets_gives_a_zero_penalty():
    admm = ADMM(nn.Linear(2, 2), [])
    assert torch.equal(admm.penalty(), torch.zeros(()))
    assert admm.step()["residual"] == {}


# --- Z- and U-steps ----------------------------------------------------------------------------


def test_initial_state_is_projection_of_pretrained_weights():
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=1e-2)
    params = dict(model.named_parameters())
    for t in admm.targets:
        s = admm.state[t.key]
        assert torch.equal(s["Z"], t.structure.project(params[t.param_name].detach()))
        assert torch.equal(s["U"], torch.zeros_like(params[t.param_name]))
        assert s["rho"] == 1e-2


def test_z_and_u_updates_are_exact_and_z_feasible_every_step():
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=RhoSchedule(0.05, 1.5, 1.0))
    params = dict(model.named_parameters())
    for it in range(5):
        cnn_train(model, admm, 4, seed=it)
        before = {k: (s["Z"].clone(), s["U"].clone()) for k, s in admm.state.items()}
        entry = admm.step()
        assert entry["iteration"] == it + 1 == admm.iteration
        for t in admm.targets:
            s = admm.state[t.key]
            w = params[t.param_name].detach()
            z_old, u_old = before[t.key]
            # Z-step: the exact projection of W + U_old.
            assert torch.equal(s["Z"], t.structure.project(w + u_old))
            assert_feasible(t.structure, s["Z"])
            # U-step: U_new = U_old + (W - Z_new), bit for bit ...
            assert torch.equal(s["U"], u_old + (w - s["Z"]))
            # ... so U_new - U_old is W - Z_new up to the rounding of one addition.
            if it == 0:
                assert torch.equal(s["U"] - u_old, w - s["Z"])
            torch.testing.assert_close(s["U"] - u_old, w - s["Z"], rtol=0, atol=4 * torch.finfo(w.dtype).eps)
            # Log entries are the relative primal residual and the relative Z change.
            assert entry["residual"][t.key] == pytest.approx(
                ((w - s["Z"]).norm() / w.norm()).item(), rel=1e-6
            )
            assert entry["dual"][t.key] == pytest.approx(
                ((s["Z"] - z_old).norm() / w.norm()).item(), rel=1e-6
            )
        assert admm.residuals() == pytest.approx(entry["residual"], rel=1e-6)
    assert len(admm.history) == 5


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.kind)
def test_residual_decreases_over_admm_iterations(structure):
    model, x, y = pretrained()
    admm = ADMM(model, Plan({"": structure}), rho=RhoSchedule(0.5, growth=1.0))
    residuals = []
    for _ in range(10):
        fit(model, x, y, 30, admm)
        residuals.append(admm.step()["residual"][f"weight:{structure.kind}"])
    assert all(b < a for a, b in zip(residuals, residuals[1:], strict=False)), residuals
    assert residuals[-1] < 0.01 * residuals[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converging run must not warn
        admm.finalize()


@pytest.mark.parametrize(
    "structure", [Unstructured(sparsity=0.75), Column(sparsity=0.5)], ids=lambda s: s.kind
)
def test_admm_then_hard_prune_beats_one_shot_pruning(structure):
    # The point of ADMM: with correlated inputs, magnitude pruning of the dense optimum is not the best
    # sparse fit; ADMM finds a better support before hard pruning (no retraining on either side).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) @ (torch.eye(16) + 0.5 * torch.randn(16, 16, generator=g)) / 1.5
    y = x @ torch.randn(8, 16, generator=g).T + 0.1 * torch.randn(256, 8, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    dense_loss = fit(model, x, y, 300, lr=0.05)
    one_shot = copy.deepcopy(model)
    with torch.no_grad():
        one_shot.weight.mul_(structure.support(one_shot.weight))
    one_shot_loss = nn.functional.mse_loss(one_shot(x), y).item()
    admm = ADMM(model, Plan({"": structure}), rho=RhoSchedule(0.1, growth=1.3, maximum=1.0))
    for _ in range(10):
        fit(model, x, y, 30, admm, lr=0.05)
        admm.step()
    admm.finalize()
    admm_loss = nn.functional.mse_loss(model(x), y).item()
    assert dense_loss < admm_loss < 0.75 * one_shot_loss


def test_finalize_warns_when_residual_does_not_drop():
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [1.0]]))
    admm = ADMM(model, Plan({"": Filter(sparsity=0.5)}))
    first = admm.step()["residual"]["weight:filter"]
    second = admm.step()["residual"]["weight:filter"]  # W never trained: Z flips rows, residual grows
    assert first == pytest.approx(2**-0.5) and second == pytest.approx(1.0)
    expected = (r"^ADMM residual: W came no closer to its structure for \['weight:filter'\] "
                r"\(\|\|W - proj\(W\)\|\|/\|\|W\|\| at the first update and now: weight:filter 0.707 -> 0.707\)"
                r".*raise rho")
    with pytest.warns(RuntimeWarning, match=expected):
        admm.finalize()


def test_no_warning_when_the_residual_rose_first_but_w_ends_closer_to_its_structure():
    """||W - Z|| rises while Z and U move early on, then falls: its last value above its first is no reason to warn
    when the hard prune now moves W less than pruning the starting weights would have."""
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [1.0]]))
    admm = ADMM(model, Plan({"": Filter(sparsity=0.5)}))
    admm.step()  # Z keeps row 0 (ties to the first), residual 0.707
    admm.step()  # W untrained: Z flips to row 1, the residual rises to 1.0
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.05], [1.0]]))  # training then moved W close to a one-row weight
    assert admm.history[-1]["residual"]["weight:filter"] > admm.history[0]["residual"]["weight:filter"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        admm.finalize()


# --- rho schedule ------------------------------------------------------------------------------


def test_rho_grows_geometrically_and_is_capped():
    model = small_cnn()
    schedule = RhoSchedule(initial=1e-3, growth=2.0, maximum=1e-2)
    admm = ADMM(model, cnn_plan(), rho=schedule)
    used = [admm.step()["rho"]["3.weight:unstructured"] for _ in range(6)]
    assert used == [1e-3, 2e-3, 4e-3, 8e-3, 1e-2, 1e-2]
    assert all(s["rho"] == 1e-2 for s in admm.state.values())
    assert schedule.next(0.004) == 0.008 and schedule.next(0.009) == 0.01


def test_constant_rho_and_default_schedule():
    assert RhoSchedule(1e-4, growth=1.0).next(1e-4) == 1e-4
    default = RhoSchedule()
    assert (default.initial, default.growth, default.maximum) == (1e-3, 1.3, 1.0)
    admm = ADMM(nn.Linear(3, 3), Plan({"": Unstructured(sparsity=0.5)}), rho=0.02)
    assert admm.schedule == RhoSchedule(initial=0.02)
    admm.step()
    assert admm.state["weight:unstructured"]["rho"] == pytest.approx(0.026, rel=1e-12)


@pytest.mark.parametrize("initial", [0.0, -1e-3, float("nan"), float("inf")])
def test_rho_must_be_positive_and_finite(initial):
    with pytest.raises(ValueError, match="must be a positive number"):
        RhoSchedule(initial=initial)


@pytest.mark.parametrize("growth", [0.9, 0.0, -1.0, float("nan")])
def test_rho_growth_must_not_shrink(growth):
    with pytest.raises(ValueError, match=r"rho_growth=.* must be >= 1"):
        RhoSchedule(growth=growth)


def test_rescale_dual_keeps_the_multiplier_rho_u_across_growth():
    """With rescale_dual the unscaled multiplier Y = rho U changes only by rho (W - Z) per update (Boyd 3.4.1)."""
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=RhoSchedule(0.05, 2.0, 0.3, rescale_dual=True))
    plain = ADMM(copy.deepcopy(model), cnn_plan(), rho=RhoSchedule(0.05, 2.0, 0.3))
    params = dict(model.named_parameters())
    for it in range(4):
        cnn_train(model, admm, 3, seed=it)
        before = {k: (s["rho"], s["U"].clone()) for k, s in admm.state.items()}
        admm.step()
        for t in admm.targets:
            s, (rho, u_old) = admm.state[t.key], before[t.key]
            y_expected = rho * (u_old + params[t.param_name].detach() - s["Z"])
            torch.testing.assert_close(s["rho"] * s["U"], y_expected, rtol=1e-5, atol=1e-7)
    assert [e["rho"]["3.weight:unstructured"] for e in admm.history] == [0.05, 0.1, 0.2, 0.3]
    # at the cap rho stops growing, and so does the rescaling
    assert admm.schedule.dual_scale(0.3) == 1.0 and admm.schedule.dual_scale(0.2) == pytest.approx(2 / 3)
    assert plain.schedule.dual_scale(0.05) == 1.0
    with pytest.raises(ValueError, match=r"rescale_dual='yes' must be true or false"):
        RhoSchedule(rescale_dual="yes")
    numpy = pytest.importorskip("numpy")
    assert RhoSchedule(rescale_dual=numpy.bool_(True)).rescale_dual is True  # numpy's bool: the value it holds


def test_rho_maximum_below_initial():
    with pytest.raises(ValueError, match=r"rho_max=0.001 must be >= rho=0.01"):
        RhoSchedule(initial=1e-2, maximum=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"initial": 1e300}, "rho=1e\\+300"), ({"maximum": 1e39}, "rho_max=1e\\+39")]
)
def test_rho_beyond_float32_is_refused(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} is beyond float32's range"):
        RhoSchedule(**kwargs)


# --- state round trip --------------------------------------------------------------------------


def test_state_dict_round_trip_gives_identical_subsequent_penalties():
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=RhoSchedule(0.05, 1.3, 1.0))
    for it in range(2):
        cnn_train(model, admm, 3, seed=it)
        admm.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "admm": admm.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    twin = small_cnn()
    twin.load_state_dict(saved["model"])
    restored = ADMM(twin, cnn_plan(), rho=RhoSchedule(0.05, 1.3, 1.0))
    assert not torch.equal(restored.penalty(), admm.penalty())  # fresh state differs ...
    restored.load_state_dict(saved["admm"])
    assert torch.equal(restored.penalty(), admm.penalty())  # ... restored state is identical
    assert restored.iteration == admm.iteration == 2
    assert restored.history == admm.history
    for it in range(2, 4):
        cnn_train(model, admm, 3, seed=it)
        cnn_train(twin, restored, 3, seed=it)
        assert torch.equal(restored.penalty(), admm.penalty())
        assert restored.step() == admm.step()
    for k, s in admm.state.items():
        assert torch.equal(restored.state[k]["Z"], s["Z"]) and torch.equal(restored.state[k]["U"], s["U"])
        assert restored.state[k]["rho"] == s["rho"]


def test_state_dict_is_a_snapshot():
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=0.05)
    cnn_train(model, admm, 2)
    admm.step()
    state = admm.state_dict()
    z = state["state"]["0.weight:filter"]["Z"].clone()
    cnn_train(model, admm, 2, seed=1)
    admm.step()
    assert state["iteration"] == 1
    assert len(state["history"]) == 1  # later steps must not leak into a saved snapshot
    assert torch.equal(state["state"]["0.weight:filter"]["Z"], z)


def test_load_state_dict_rejects_another_plan():
    model = small_cnn()
    state = ADMM(model, cnn_plan()).state_dict()
    other = ADMM(model, Plan({"3": Filter(sparsity=0.5)}))
    with pytest.raises(
        ValueError, match=r"does not match the plan: missing \['3.weight:filter'\], unexpected"
    ):
        other.load_state_dict(state)


# --- finalize ----------------------------------------------------------------------------------


def test_finalize_hard_prunes_w_itself_with_exact_counts():
    model = small_cnn()
    admm = ADMM(model, cnn_plan(), rho=0.05)
    for it in range(3):
        cnn_train(model, admm, 3, seed=it)
        admm.step()
    w_conv = model[0].weight.detach().clone()
    w_fc = model[3].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convergence is not the point here
        masks = admm.finalize()
    assert set(masks.masks) == {"0.weight", "3.weight"}
    # Masks come from W (SPEC P4), filter and column intersected on conv 0; the columns ranked on W with the
    # pruned filters zeroed (rows, then columns: finalize.masks_of).
    rows = Filter(sparsity=0.5).support(w_conv)
    expected_conv = rows & Column(sparsity=0.5).support(w_conv * rows)
    assert torch.equal(masks["0.weight"], expected_conv)
    assert torch.equal(masks["3.weight"], Unstructured(compression=8).support(w_fc))
    assert int(masks["3.weight"].sum()) == round(w_fc.numel() / 8)
    assert int(masks["0.weight"].reshape(6, -1).any(1).sum()) == 3
    assert int(masks["0.weight"].reshape(6, -1).any(0).sum()) == 9
    # The model is zeroed off the masks and unchanged on them.
    assert torch.equal(model[0].weight.detach(), w_conv * expected_conv)
    assert torch.equal(model[3].weight.detach(), w_fc * masks["3.weight"])


def test_finalize_merges_frozen_masks():
    model = small_cnn()
    frozen_fc = torch.rand(5, 96, generator=torch.Generator().manual_seed(0)) > 0.3
    frozen_conv = torch.ones(6, 2, 3, 3, dtype=torch.bool)
    frozen_conv[5] = False
    frozen = MaskSet({"3.weight": frozen_fc, "0.weight": frozen_conv})
    admm = ADMM(model, Plan({"0": Column(sparsity=0.5)}), rho=0.05, frozen=frozen)
    masks = admm.finalize()
    assert torch.equal(masks["3.weight"], frozen_fc)
    assert not masks["0.weight"][5].any()
    assert torch.count_nonzero(model[3].weight.detach()[~frozen_fc]) == 0
    assert torch.count_nonzero(model[0].weight.detach()[5]) == 0


# --- the driver only calls structure.project (a test double structure) --------------------------


@dataclass(frozen=True)
class Halves(SparsityStructure):
    """A toy partition: the first and second half of the rows; keep one half."""

    kind: ClassVar[str] = "halves"

    def group_ids(self, weight):
        rows, cols = weight.reshape(weight.shape[0], -1).shape
        ids = (torch.arange(rows) >= rows // 2).long().view(rows, 1).expand(rows, cols)
        return ids, 2


def test_admm_drives_any_structure():
    model, x, y = pretrained()
    structure = Halves(sparsity=0.5)
    admm = ADMM(model, Plan({"": structure}), rho=RhoSchedule(0.5, growth=1.0))
    for _ in range(4):
        fit(model, x, y, 20, admm)
        admm.step()
        assert_feasible(structure, admm.state["weight:halves"]["Z"])
    masks = admm.finalize()
    rows_kept = masks["weight"].any(dim=1)
    assert rows_kept.tolist() in ([True] * 4 + [False] * 4, [False] * 4 + [True] * 4)


def _levels(t):
    return sorted({round(v, 6) for v in t[t != 0].abs().tolist()})


@pytest.mark.parametrize("coupled", [False, True])
def test_pruning_and_quantizing_one_weight_fits_the_levels_on_the_kept_weights(coupled):
    """SPEC 2.1: the levels are for the nonzero weights. In one stage the quantization Z was the projection of all
    of W + U, so its levels were fit to the whole distribution (not those hard_prune ends with) and the weights
    about to be pruned were pulled toward +-q instead of 0 (a review's finding)."""
    from admmcompress.finalize import hard_prune
    from admmcompress.plan import Rule
    from admmcompress.structures import FixedPoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    prune = Filter(sparsity=0.5) if coupled else Unstructured(sparsity=0.9)
    plan = Plan([Rule(prune, match="0"), Rule(FixedPoint(bits=2), match="0")])
    targets = plan.resolve_coupled(model, torch.randn(2, 20)) if coupled else plan.resolve(model)
    admm = ADMM(model, targets, rho=1e-2)
    for _ in range(2):  # W unchanged: each Z-step projects W + U with U = W - Z
        zq = next(s["Z"] for k, s in admm.state.items() if k.endswith("fixed_point"))
        zp = next(s["Z"] for k, s in admm.state.items() if not k.endswith("fixed_point"))
        kept = (zp != 0).any(dim=1, keepdim=True).expand(-1, 20)[:16] if coupled else zp != 0
        assert not bool(zq[~kept].any())  # the pruned weights' quantization target is 0
        admm.step()
    expected = copy.deepcopy(model)
    hard_prune(expected, targets)  # from W itself, as the first Z-step (U = 0): the same levels
    first = next(s["Z"] for k, s in ADMM(model, targets, rho=1e-2).state.items() if k.endswith("fixed_point"))
    assert _levels(first) == _levels(expected[0].weight.detach())

"""Drivers and masks on inputs a review found failing: float16 group norms, a model cast or reloaded after the
driver was built, frozen parameters, one rule per recurrent layer, and wrong inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from admmcompress import ADMM, Plan, PlanError, Reweighted, Unstructured
from admmcompress.drivers.allocation import BudgetError, plan_from_rates, rates_plan
from admmcompress.drivers.magnitude import OneShotMagnitude
from admmcompress.drivers.reweighted import group_norms
from admmcompress.finalize import hard_prune
from admmcompress.structures import Filter, Tucker2


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norms_of_zero_and_tiny_groups_have_finite_gradients_in_half_precision(dtype):
    w = torch.zeros(3, 4, dtype=dtype)
    w[1] = 1e-4  # its squares round to 0 in float16
    w[2] = 1.0
    w.requires_grad_(True)
    group_norms(w, torch.arange(3).view(3, 1).expand(3, 4), 3, power=1).sum().backward()
    assert bool(torch.isfinite(w.grad).all()) and w.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_attached_masks_follow_a_model_cast_after_attaching(dtype):
    model = mlp()
    masks = hard_prune(model, Plan({"0": Unstructured(sparsity=0.5)}))
    masks.attach(model)
    model.to(dtype)
    model(torch.randn(2, 8, dtype=dtype)).sum().backward()
    assert bool((model[0].weight.grad[~masks["0.weight"].bool()] == 0).all())


def test_masks_attach_to_a_model_whose_pruned_layer_is_frozen():
    model = mlp()
    masks = hard_prune(model, Plan({"0": Unstructured(sparsity=0.5), "2": Unstructured(sparsity=0.5)}))
    model[0].weight.requires_grad_(False)  # fine-tune the head only
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    masks.attach(model, opt)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert bool((model[2].weight[~masks["2.weight"].bool()] == 0).all())


def test_admm_built_directly_refuses_targets_the_runner_refuses():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    plan = Plan([*Plan({"0": Tucker2(ranks=(2, 2))}).rules, *Plan({"0": Unstructured(sparsity=0.9)}).rules])
    with pytest.raises(PlanError, match="factorized .* and also carry other targets"):
        ADMM(model, plan)


@pytest.mark.parametrize("make", [lambda m: ADMM(m, Plan({"0": Unstructured(sparsity=0.5)}), rho=10.0),
                                  lambda m: Reweighted(m, Plan({"0": Filter(sparsity=0.5)}), penalty=1.0)],
                         ids=["admm", "reweighted"])
def test_the_penalty_follows_parameters_replaced_after_the_driver_was_built(make):
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    driver = make(model)
    driver.step()
    model.load_state_dict(state, assign=True)  # new parameter objects
    driver.penalty().backward()
    assert model[0].weight.grad is not None and float(model[0].weight.grad.abs().sum()) > 0


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.fc = nn.GRU(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.gru(x)[0])


def test_a_rates_plan_gives_a_recurrent_layer_one_rule_that_resolves():
    torch.manual_seed(0)
    model = Tagger()
    targets = Plan({"gru": Unstructured(sparsity=0.5)}).resolve(model)
    assert len(targets) == 2  # weight_ih_l0 and weight_hh_l0
    hard_prune(model, targets)
    plan = rates_plan(model, targets)
    assert [r.match for r in plan.rules] == ["gru"]
    assert len(plan.resolve(model)) == 2
    with pytest.raises(BudgetError, match="layer 'gru' has 2 targets at different unstructured rates"):
        plan_from_rates(targets, {targets[0].key: 0.5, targets[1].key: 0.25})


def test_wrong_driver_inputs_are_one_line():
    with pytest.raises(ValueError, match=r"rho=None must be a positive number"):
        ADMM(mlp(), Plan({"0": Unstructured(sparsity=0.5)}), rho=None)
    masks = OneShotMagnitude(mlp(), Plan({"0": Unstructured(sparsity=0.5)})).finalize()
    assert float(masks["0.weight"].float().mean()) == 0.5


# --- an ADMM state that does not fit the model is one line, not a KeyError or a broadcast error later ------------


def test_admm_load_state_dict_names_a_foreign_or_misshapen_state():
    def driver(width: int) -> ADMM:
        torch.manual_seed(0)
        return ADMM(nn.Sequential(nn.Linear(8, width)), Plan({"0": Unstructured(sparsity=0.5)}), rho=1e-3)

    narrow, wide = driver(4), driver(6)
    with pytest.raises(ValueError, match="not an ADMM driver state .* pass what ADMM.state_dict"):
        narrow.load_state_dict({"Z": {}})
    misshapen = r"ADMM state of '0.weight:unstructured': Z \(6, 8\), U \(6, 8\) .* shape \(4, 8\)"
    with pytest.raises(ValueError, match=misshapen):
        narrow.load_state_dict(wide.state_dict())
    broken = narrow.state_dict()
    broken["state"]["0.weight:unstructured"]["rho"] = "high"
    with pytest.raises(ValueError, match="a number rho expected"):
        narrow.load_state_dict(broken)
    narrow.load_state_dict(driver(4).state_dict())  # a state of the same model and plan loads

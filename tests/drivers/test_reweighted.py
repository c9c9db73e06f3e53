"""Reweighted group lasso: penalty and gradient vs the formula, reweighting, finalize, state, Runner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers.reweighted import Reweighted, ReweightedConfig, group_norms
from admmcompress.finalize import MaskSet
from admmcompress.models import LeNet300100
from admmcompress.plan import Plan
from admmcompress.structures import Block, Column, Unstructured
from admmcompress.train.config import ConfigError, RunConfig
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def block_columns(w: torch.Tensor, r: int) -> list[torch.Tensor]:
    """The block-columns of a 2-D weight, written out by hand (groups of ``Block(block=(r, .))``)."""
    return [w[i : i + r, j] for i in range(0, w.shape[0], r) for j in range(w.shape[1])]


@pytest.mark.parametrize("power", [1, 2])
def test_penalty_and_gradient_match_the_formula(power):
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    with torch.no_grad():
        model.weight[:2, 1] = 0.0  # one block-column exactly zero
    cfg = ReweightedConfig(penalty=0.3, power=power, eps=1e-3)
    rew = Reweighted(model, Plan({"": Block(sparsity=0.5, block=(2, 3))}), penalty=cfg)
    w = model.weight.detach().clone()
    groups = block_columns(w, 2)
    weights = [1.0 / (g.norm() ** power + cfg.eps) for g in groups]  # P from the initial weights
    expected = cfg.penalty * sum(p * g.norm() ** power for p, g in zip(weights, groups, strict=True))
    value = rew.penalty()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    value.backward()
    grad = torch.zeros_like(w)
    for n, (i, j) in enumerate((i, j) for i in range(0, 4, 2) for j in range(6)):
        g = w[i : i + 2, j]
        if power == 2:
            grad[i : i + 2, j] = cfg.penalty * weights[n] * 2 * g
        elif g.norm() > 0:
            grad[i : i + 2, j] = cfg.penalty * weights[n] * g / g.norm()
    assert torch.isfinite(model.weight.grad).all()
    assert torch.equal(model.weight.grad[:2, 1], torch.zeros(2))  # zero group: subgradient 0, never NaN
    torch.testing.assert_close(model.weight.grad, grad, rtol=1e-5, atol=1e-7)


def test_step_reweights_from_the_current_weights_and_uses_abs():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1e-3, 2.0, -0.5]]))  # negative near -eps: P11
    rew = Reweighted(model, Plan({"": Unstructured(sparsity=0.5)}), penalty=ReweightedConfig(eps=1e-3))
    (key,) = rew.state
    torch.testing.assert_close(rew.state[key]["P"], 1.0 / (torch.tensor([1e-3, 2.0, 0.5]) + 1e-3))
    with torch.no_grad():
        model.weight.mul_(2.0)
    entry = rew.step()
    torch.testing.assert_close(rew.state[key]["P"], 1.0 / (torch.tensor([2e-3, 4.0, 1.0]) + 1e-3))
    assert entry["iteration"] == 1 and rew.iteration == 1 and set(entry["residual"]) == {key}


def test_group_norms_power_two_is_the_squared_norm():
    w = torch.tensor([[3.0, 1.0], [4.0, 1.0]])
    ids = torch.tensor([[0, 1], [0, 1]])
    assert group_norms(w, ids, 2, power=2).tolist() == [25.0, 2.0]
    assert group_norms(w, ids, 2, power=1).tolist() == pytest.approx([5.0, 2**0.5])


def test_training_with_the_penalty_shrinks_small_groups_then_finalize_hits_the_rate():
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    rew = Reweighted(model, Plan({"": Column(sparsity=0.75)}), penalty=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms_before = model.weight.detach().norm(dim=0)
    for i in range(60):
        opt.zero_grad()
        rew.penalty().backward()
        opt.step()
        if i % 20 == 19:
            rew.step()
    norms_after = model.weight.detach().norm(dim=0)
    small = norms_before.argsort()[:2]
    large = norms_before.argsort()[-2:]
    # Reweighting shrinks the smallest columns relatively more than the largest ones.
    shrink = norms_after / norms_before
    assert float(shrink[small].max()) < float(shrink[large].min())
    masks = rew.finalize()
    assert masks.sparsity() == {"weight": 0.75}
    assert int((model.weight.detach().abs().sum(0) > 0).sum()) == 2


def test_finalize_keeps_frozen_masks():
    model = nn.Linear(4, 2, bias=False)
    frozen = MaskSet({"weight": torch.tensor([[True, True, True, False], [True, True, True, False]])})
    with torch.no_grad():
        model.weight.mul_(frozen["weight"])
    rew = Reweighted(model, Plan({"": Unstructured(sparsity=0.5)}), frozen=frozen)
    masks = rew.finalize()
    assert not masks["weight"][:, 3].any() and int(masks["weight"].sum()) == 4


def test_state_dict_round_trip_and_mismatch():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    plan = Plan({"": Block(sparsity=0.5, block=(2, 2))})
    rew = Reweighted(model, plan)
    with torch.no_grad():
        model.weight.mul_(0.5)
    rew.step()
    state = rew.state_dict()
    other = Reweighted(model, plan)
    other.load_state_dict(state)
    assert other.iteration == 1 and other.history == rew.history
    torch.testing.assert_close(other.penalty(), rew.penalty())
    (key,) = state["state"]
    with pytest.raises(ValueError, match=rf"missing \['{key}'\], unexpected \['other'\]"):
        other.load_state_dict({**state, "state": {"other": state["state"][key]}})
    bad = {**state, "state": {key: {"P": torch.ones(3)}}}
    with pytest.raises(ValueError, match="3 group weights, the plan gives 8 groups"):
        other.load_state_dict(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"penalty": -1.0}, r"penalty=-1.0 must be a finite number >= 0"),
        ({"power": 3}, r"power=3 must be 1 \(group norm\) or 2"),
        ({"eps": 0.0}, r"eps=0.0 must be a finite number > 0"),
        ({"eps": float("nan")}, r"eps=nan must be a finite number > 0"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReweightedConfig(**kwargs)


def test_runner_drives_a_reweighted_stage():
    torch.manual_seed(0)
    train, test = load_dataset("mnist", "train", limit=256), load_dataset("mnist", "test", limit=100)
    config = RunConfig.from_dict(
        {
            "model": {"name": "lenet300100"},
            "pretrained": "<in-memory>",
            "data": {"batch_size": 64},
            "stages": [
                {
                    "plan": {
                        "rules": [
                            {"match": "fc1", "structure": "block", "compression": 10, "block": [10, 16]}
                        ]
                    },
                    "method": "reweighted",
                    "reweighted": {"penalty": 1.0e-4, "power": 1},
                    "admm": {"epochs": 2, "update_every_steps": 2, "lr_schedule": "cosine"},
                    "retrain": {"epochs": 1},
                }
            ],
        }
    )
    assert config.stages[0].options == ReweightedConfig(penalty=1e-4)
    runner = Runner(config, LeNet300100(), train, test, progress=False, train_dense=False)
    metrics = runner.run()
    assert metrics["stages"][0]["overall_compression"] == pytest.approx(10.0, rel=1e-3)
    nonzero_per_block_column = (runner.model.fc1.weight.reshape(30, 10, 784) != 0).sum(1)
    assert set(nonzero_per_block_column.unique().tolist()) <= {0, 10}  # whole block-columns only
    assert int((nonzero_per_block_column > 0).sum()) == 2352  # 10% of 30 x 784 block-columns
    with pytest.raises(ConfigError, match=r"options: reweighted power=3 must be 1"):
        stages = [{"plan": {"rules": []}, "method": "reweighted", "options": {"power": 3}}]
        RunConfig.from_dict({**config.to_dict(), "stages": stages})


def test_compress_api_runs_the_reweighted_method():
    from admmcompress import compress

    torch.manual_seed(0)
    train, test = load_dataset("mnist", "train", limit=128), load_dataset("mnist", "test", limit=64)
    plan = Plan({"fc2": Block(compression=4, block=(10, 20))})
    result = compress(
        LeNet300100(),
        plan,
        train,
        test,
        method="reweighted",
        options={"penalty": 1e-3},
        admm={"epochs": 1, "lr_schedule": "cosine"},
        retrain={"epochs": 1},
    )
    assert result.metrics["stages"][0]["overall_compression"] == pytest.approx(4.0)

"""Method ``penni``: decomposition, L1 on coefficients, alternating training, std pruning, masked fine-tune."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers import DriverContext, Penni, PenniConfig, get_driver
from admmcompress.drivers.factorize import FactorizeTransform
from admmcompress.executors.penni import SharedKernelConv
from admmcompress.finalize import QuantizedMaskSet
from admmcompress.models import LeNet5
from admmcompress.plan import Plan, PlanError
from admmcompress.structures import FixedPoint, SharedKernels
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner, rebuild_transforms


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


PLAN = Plan({"0": SharedKernels(bases=4), "2": SharedKernels(bases=4)})


def decomposed(seed: int = 0) -> tuple[nn.Sequential, list]:
    model = small_model(seed)
    targets = PLAN.resolve(model)
    Penni(model, targets).finalize().apply(model)
    return model, targets


def test_first_phase_decomposes_and_the_spec_rebuilds_the_modules():
    model = small_model()
    reference = small_model()
    outcome = Penni(model, PLAN.resolve(model)).finalize()
    assert isinstance(outcome, FactorizeTransform) and len(outcome.masks) == 0
    outcome.apply(model)
    assert isinstance(model[0], SharedKernelConv) and model[0].basis.shape == (4, 3, 3)
    projected = SharedKernels(bases=4).project(reference[0].weight.detach())
    assert torch.allclose(model[0].weight, projected, atol=1e-5)
    fresh = small_model(seed=5)
    rebuild_transforms(fresh, [{"method": "penni", "spec": outcome.spec()}])
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("bases", [20, 21, 25])  # conv1 has 20 kernels (20 filters x 1 input) of 25 positions
def test_more_bases_than_kernels_decompose_exactly_with_the_bases_asked_for(bases):
    """The SVD of 20 kernels has 20 components; before, bases 21-25 passed the plan check and then failed."""
    torch.manual_seed(0)
    model, x = LeNet5(), torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    Penni(model, Plan({"conv1": SharedKernels(bases=bases)}).resolve(model)).finalize().apply(model)
    assert isinstance(model.conv1, SharedKernelConv) and model.conv1.basis.shape[0] == bases
    basis = model.conv1.basis.detach().flatten(1).double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(bases, dtype=torch.float64), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_l1_penalty_and_alternation():
    model, targets = decomposed()
    driver = Penni(model, targets, PenniConfig(l1=1e-3))
    driver.prepare(model)
    expected = 1e-3 * (model[0].coefs.abs().sum() + model[2].coefs.abs().sum())
    assert torch.allclose(driver.penalty(), expected)
    assert model[0].coefs.requires_grad and not model[0].basis.requires_grad
    driver.step()
    assert not model[2].coefs.requires_grad and model[2].basis.requires_grad
    state = driver.state_dict()
    again = Penni(model, targets, PenniConfig(l1=1e-3))
    again.load_state_dict(state)
    again.prepare(model)
    assert again.training == "basis" and model[0].basis.requires_grad and not model[0].coefs.requires_grad
    again.close()
    assert all(p.requires_grad for p in model.parameters())


def test_std_pruning_and_masks_that_hold_while_fine_tuning():
    model, targets = decomposed()
    coefs = model[0].coefs.detach().clone()
    masks = Penni(model, targets, PenniConfig(prune_std=1.0)).finalize()
    assert torch.equal(masks["0.coefs"], coefs.abs() >= coefs.std())
    assert torch.equal(model[0].coefs.detach() == 0, ~masks["0.coefs"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    masks.attach(model, opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
        opt.step()
    assert torch.all(model[0].coefs[~masks["0.coefs"]] == 0)


def test_pointwise_option_regularizes_and_prunes_1x1_weights_too():
    model, targets = decomposed()
    pointwise = model[4].weight.detach().clone()
    driver = Penni(model, targets, PenniConfig(l1=1e-3, pointwise=True))
    expected = 1e-3 * (model[0].coefs.abs().sum() + model[2].coefs.abs().sum() + pointwise.abs().sum())
    assert torch.allclose(driver.penalty(), expected)
    masks = driver.finalize()
    assert set(masks.masks) == {"0.coefs", "2.coefs", "4.weight"}
    assert torch.equal(masks["4.weight"], pointwise.abs() >= pointwise.std())
    assert torch.equal(model[4].weight.detach() == 0, ~masks["4.weight"])
    assert driver.summary()["penni_pointwise_kept"] == {"4": int(masks["4.weight"].sum())}
    plain, _ = decomposed()
    assert set(Penni(plain, targets).finalize().masks) == {"0.coefs", "2.coefs"}  # off by default
    with pytest.raises(ValueError, match="pointwise"):
        PenniConfig(pointwise="yes")


def test_quantized_coefficients_in_the_same_plan():
    model, _ = decomposed()
    plan = Plan({"0": SharedKernels(bases=4), "2": SharedKernels(bases=4)})
    plan.rules += Plan({"0": FixedPoint(bits=3)}).rules
    targets = plan.resolve(small_model())
    masks = Penni(model, targets, PenniConfig(prune_std=0.5)).finalize()
    assert isinstance(masks, QuantizedMaskSet) and set(masks.held) == {"0.coefs"}
    kept = model[0].coefs.detach()[masks["0.coefs"]]
    assert kept.unique().numel() <= 2**3 and torch.all(kept != 0)


def test_plans_penni_cannot_drive_are_refused():
    model = small_model()
    with pytest.raises(PlanError, match="method 'penni' takes shared_kernels rules"):
        get_driver("penni").cls.check_targets(Plan({"0": FixedPoint(bits=3)}).resolve(model))
    with pytest.raises(PlanError, match="coefficients are quantized after decomposition"):
        plan = Plan({"0": SharedKernels(bases=4)})
        plan.rules += Plan({"0": FixedPoint(bits=3)}).rules
        Penni.from_config(model, plan.resolve(model), PenniConfig(), DriverContext())
    with pytest.raises(ValueError, match="start='bias' must be one of"):
        PenniConfig(start="bias")


def test_two_stage_run_decomposes_then_sparsifies_lenet5():
    """Stage 1 decomposes (0 epochs), stage 2 trains with L1 + alternation, prunes, fine-tunes with masks."""
    train, test = load_dataset("mnist", "train", limit=256), load_dataset("mnist", "test", limit=100)
    plan = {"rules": [{"match": "conv*", "structure": "shared_kernels", "bases": 5}]}
    stage = {"plan": plan, "method": "penni"}
    config = RunConfig.from_dict({
        "model": {"name": "lenet5"}, "seed": 0, "pretrain": {"epochs": 1}, "data": {"batch_size": 64},
        "stages": [
            {**stage, "admm": {"epochs": 0}, "retrain": {"epochs": 0}},
            {**stage, "options": {"l1": 1e-3, "prune_std": 1.0}, "admm": {"epochs": 2, "update_every_epochs": 1},
             "retrain": {"epochs": 1}},
        ],
    })
    torch.manual_seed(0)
    model = LeNet5()
    runner = Runner(config, model, train, test, progress=False)
    metrics = runner.run()
    assert isinstance(model.conv1, SharedKernelConv) and isinstance(model.conv2, SharedKernelConv)
    assert [t["method"] for t in metrics["transforms"]] == ["penni"]
    assert float((model.conv2.coefs == 0).float().mean()) > 0.3
    assert runner.masks["conv2.coefs"].logical_not().sum() == (model.conv2.coefs == 0).sum()


def test_penni_is_refused_under_torchrun_before_training():
    """Its steps swap which parameters train, which DDP's reducer would not follow."""
    from admmcompress.train.distributed import Distributed

    config = RunConfig.from_dict({
        "model": {"name": "lenet5"}, "pretrained": "<in-memory>", "data": {"batch_size": 32},
        "stages": [{"plan": {"rules": [{"match": "conv*", "structure": "shared_kernels", "bases": 4}]},
                    "method": "penni", "admm": {"epochs": 0}, "retrain": {"epochs": 0}}],
    })
    train = load_dataset("mnist", "train", limit=32)
    with pytest.raises(ValueError, match="method 'penni' cannot run under torchrun"):
        Runner(config, LeNet5(), train, train, dist=Distributed(rank=0, world_size=2))


def test_pointwise_1x1_convs_are_in_the_run_s_layer_table_and_compression():
    """The 1x1 convs ``pointwise: true`` prunes are no plan target, yet the run's stats count them."""
    from admmcompress.data.datasets import Split

    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 2, (32,), generator=g))
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2))
    stage = {"plan": {"rules": [{"match": "0", "structure": "shared_kernels", "bases": 4}]}, "method": "penni",
             "options": {"pointwise": True, "prune_std": 1.0}, "admm": {"epochs": 1, "update_every_epochs": 1},
             "retrain": {"epochs": 0}}
    decompose = {"plan": stage["plan"], "method": "penni", "admm": {"epochs": 0}, "retrain": {"epochs": 0}}
    config = RunConfig.from_dict({"model": {"name": "lenet5"}, "seed": 0, "pretrain": {"epochs": 0},
                                  "data": {"batch_size": 16}, "stages": [decompose, stage]})
    with pytest.warns(UserWarning, match="pruning at initialisation"):
        runner = Runner(config, model, data, data, progress=False)
    metrics = runner.run()
    rows = {row["name"]: row for row in metrics["stats"]["layers"]}
    assert set(rows) == {"0", "2"}
    assert rows["2"]["kept"] == int(model[2].weight.count_nonzero()) < model[2].weight.numel()
    assert set(metrics["stages"][1]["layers"]) == {"0", "2"}

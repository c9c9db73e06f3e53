"""Library inputs: numpy and torch scalars are the numbers they hold; MaskSet.attach never un-masks a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from admmcompress import ADMM, Plan, Unstructured
from admmcompress.drivers.admm import ADMMConfig, RhoSchedule
from admmcompress.drivers.reweighted import ReweightedConfig
from admmcompress.finalize import MaskSet
from admmcompress.finalize.quantized import hard_quantize
from admmcompress.models import LeNet300100
from admmcompress.structures.block import Block
from admmcompress.structures.quantization import Clustering, FixedPoint, PowerOfTwo
from admmcompress.structures.scalars import plain_number
from admmcompress.structures.sparsity import Column, Filter
from admmcompress.train.config import (
    ADMMPhaseConfig,
    CompactRunConfig,
    DataConfig,
    DistillConfig,
    OptimizerConfig,
    PhaseConfig,
    RunConfig,
)

FLOATS = [
    pytest.param(np.float32(0.9), id="np.float32"),
    pytest.param(np.float64(0.9), id="np.float64"),
    pytest.param(np.float16(0.9), id="np.float16"),
    pytest.param(torch.tensor(0.9), id="torch-0d"),
    pytest.param(torch.tensor(0.9, dtype=torch.float64), id="torch-0d-f64"),
    pytest.param(np.array(0.9), id="np-0d-array"),
]
INTS = [
    pytest.param(np.int64(3), id="np.int64"),
    pytest.param(np.int32(3), id="np.int32"),
    pytest.param(np.uint8(3), id="np.uint8"),
    pytest.param(torch.tensor(3), id="torch-0d"),
]
BOOLS = [
    pytest.param(True, id="bool"),
    pytest.param(np.bool_(True), id="np.bool_"),
    pytest.param(torch.tensor(True), id="torch-bool"),
]


# --- plain_number ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", FLOATS)
def test_float_scalars_become_the_decimal_the_caller_wrote(value):
    plain = plain_number(value)
    assert type(plain) is float
    assert plain == 0.9 if value.dtype not in (np.float16, torch.float16) else abs(plain - 0.9) < 1e-3


@pytest.mark.parametrize("value", INTS)
def test_integer_scalars_become_python_ints(value):
    assert type(plain_number(value)) is int and plain_number(value) == 3


@pytest.mark.parametrize("value", [True, np.bool_(False), torch.tensor(True), "0.9", None, [0.5],
                                   torch.tensor([0.5]), np.array([1, 2]), torch.tensor(1 + 2j)])
def test_everything_else_is_returned_unchanged(value):
    assert plain_number(value) is value


def test_python_numbers_are_untouched():
    for value in (0, 3, 0.5, float("inf"), 1e-3):
        assert plain_number(value) is value


def test_bfloat16_and_non_finite_scalars():
    assert plain_number(torch.tensor(0.5, dtype=torch.bfloat16)) == 0.5
    assert plain_number(np.float32("inf")) == float("inf")
    assert plain_number(np.float32("nan")) != plain_number(np.float32("nan"))


# --- structures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", FLOATS)
def test_sparsity_accepts_numpy_and_torch_scalars(value):
    structure = Unstructured(sparsity=value)
    expected = 0.9 if value.dtype not in (np.float16,) else structure.sparsity
    assert structure.sparsity == expected and type(structure.sparsity) is float
    assert structure.to_dict() == {"structure": "unstructured", "sparsity": expected}
    yaml.safe_dump(structure.to_dict())  # a plain number: writable to a config


@pytest.mark.parametrize("value", INTS)
def test_compression_and_integer_options_accept_numpy_and_torch_integers(value):
    assert Filter(compression=value).target_sparsity == pytest.approx(2 / 3)
    assert FixedPoint(bits=value) == FixedPoint(bits=3)
    assert PowerOfTwo(bits=value) == PowerOfTwo(bits=3)
    assert Clustering(clusters=value + 1) == Clustering(clusters=4)
    assert Clustering(bits=value).k == 8
    block = Block(sparsity=np.float32(0.5), block=[value + 1, value - 1], gates=value)
    assert block.block == (4, 2) and block.gates == 3 and type(block.gates) is int
    assert Block(sparsity=0.5, block=value + 1).block == (4, 4)


@pytest.mark.parametrize("value", BOOLS)
def test_booleans_are_still_refused(value):
    with pytest.raises(ValueError, match="sparsity"):
        Unstructured(sparsity=value)
    with pytest.raises(ValueError, match="compression"):
        Column(compression=value)
    with pytest.raises(ValueError, match="bits"):
        FixedPoint(bits=value)
    with pytest.raises(ValueError, match="clusters"):
        Clustering(clusters=value)
    with pytest.raises(ValueError, match="block"):
        Block(sparsity=0.5, block=(value, 2))
    with pytest.raises(ValueError, match="rho"):
        ADMMConfig(rho=value)
    with pytest.raises(ValueError, match="lr"):
        OptimizerConfig(lr=value)
    with pytest.raises(ValueError, match="epochs"):
        PhaseConfig(epochs=value)


def test_out_of_range_scalars_are_refused_with_the_plain_value():
    with pytest.raises(ValueError, match=r"sparsity=1\.5 is outside \(0, 1\)"):
        Unstructured(sparsity=np.float32(1.5))
    with pytest.raises(ValueError, match="bits=0 must be an integer"):
        FixedPoint(bits=np.int64(0))
    with pytest.raises(ValueError, match="outside"):
        Unstructured(sparsity=torch.tensor([0.5]))  # not a scalar: refused as before


def test_a_plan_from_numpy_values_resolves_and_projects():
    model = LeNet300100()
    plan = Plan({"fc1": Unstructured(sparsity=np.float32(0.9)), "fc2": Filter(compression=torch.tensor(2))})
    targets = plan.resolve(model)
    assert [t.structure.target_sparsity for t in targets] == [pytest.approx(0.9), pytest.approx(0.5)]
    spec = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": np.float64(0.8)},
                      {"match": "fc3", "structure": "fixed_point", "bits": np.int64(4)}]}
    plain = json.loads(json.dumps(spec, default=lambda v: v.item()))
    assert Plan.from_dict(spec).to_dict() == Plan.from_dict(plain).to_dict()
    assert type(Plan.from_dict(spec).to_dict()["rules"][1]["bits"]) is int


# --- drivers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [np.float32(1e-3), torch.tensor(1e-3), np.float64(1e-3)])
def test_admm_rho_accepts_numpy_and_torch_scalars(rho):
    model = nn.Linear(8, 4)
    admm = ADMM(model, Plan({"": Unstructured(sparsity=0.5)}), rho=rho)
    assert admm.schedule.initial == pytest.approx(1e-3) and type(admm.schedule.initial) is float
    config = ADMMConfig(rho=rho, rho_growth=np.float32(1.5), rho_max=torch.tensor(2.0))
    assert config == ADMMConfig(rho=0.001, rho_growth=1.5, rho_max=2.0)
    assert RhoSchedule(initial=rho).maximum == 1.0


def test_reweighted_options_accept_numpy_scalars():
    config = ReweightedConfig(penalty=np.float32(1e-4), power=np.int64(2), eps=torch.tensor(1e-3))
    assert config.to_dict() == {"penalty": 0.0001, "power": 2, "eps": 0.001}
    with pytest.raises(ValueError, match="power"):
        ReweightedConfig(power=np.bool_(True))


# --- run configs -------------------------------------------------------------------------------------


def test_config_values_accept_numpy_and_torch_scalars_and_stay_writable():
    phase = PhaseConfig(
        epochs=np.int64(3), optimizer={"lr": np.float32(0.01), "momentum": torch.tensor(0.9)},
        label_smoothing=np.float32(0.1), dropout=np.float64(0.25), average_from_epoch=torch.tensor(2),
        distill={"alpha": np.float32(0.5), "temperature": np.int32(4)},
    )
    assert (phase.epochs, phase.optimizer.lr, phase.optimizer.momentum) == (3, 0.01, 0.9)
    assert (phase.label_smoothing, phase.dropout, phase.average_from_epoch) == (0.1, 0.25, 2)
    assert (phase.distill.alpha, phase.distill.temperature) == (0.5, 4)
    admm = ADMMPhaseConfig(epochs=np.int64(2), update_every_steps=np.int64(10))
    assert admm.update_every_steps == 10 and type(admm.update_every_steps) is int
    data = DataConfig(batch_size=np.int64(32), train_limit=torch.tensor(100), augment={"shift": np.int64(2)})
    assert (data.batch_size, data.train_limit, data.augment.shift) == (32, 100, 2)
    assert CompactRunConfig(atol=np.float32(1e-4), samples=np.int64(4)).samples == 4
    assert OptimizerConfig(weight_decay=torch.tensor(5e-4)).weight_decay == 5e-4
    assert DistillConfig(alpha=np.float64(1.0)).alpha == 1.0

    config = RunConfig(
        model={"name": "lenet300100"}, pretrain={"epochs": np.int64(1)}, seed=np.int64(7), threads=np.int32(1),
        checkpoint_every_epochs=torch.tensor(2),
        stages=[{"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": np.float32(0.9)}]},
                 "admm": {"epochs": np.int64(1), "rho": np.float32(1e-3)}, "retrain": phase}],
    )
    assert (config.seed, config.threads, config.checkpoint_every_epochs) == (7, 1, 2)
    assert config.stages[0].options.rho == 0.001
    text = yaml.safe_dump(json.loads(json.dumps(config.to_dict())))  # what a run writes as config.yaml
    assert RunConfig.from_dict(yaml.safe_load(text)).to_dict() == config.to_dict()


@pytest.mark.parametrize("value", BOOLS)
def test_config_booleans_stay_refused(value):
    with pytest.raises(ValueError, match="seed"):
        RunConfig(model={"name": "lenet300100"}, pretrain={"epochs": 1}, seed=value)
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=value)


def test_config_scalar_out_of_range_is_refused_naming_it():
    with pytest.raises(ValueError, match="epochs=-1 must be an integer >= 0"):
        PhaseConfig(epochs=np.int64(-1))
    with pytest.raises(ValueError, match=r"label_smoothing=1\.5 must be in \[0, 1\)"):
        PhaseConfig(label_smoothing=np.float32(1.5))
    with pytest.raises(ValueError, match="lr=nan must be a positive number"):
        OptimizerConfig(lr=np.float32("nan"))


# --- MaskSet.attach to a second model ----------------------------------------------------------------


def _masks() -> MaskSet:
    return MaskSet({"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)})


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_attaching_to_a_second_model_is_refused_and_the_first_stays_masked():
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    masks = _masks()
    opt = torch.optim.SGD(first.parameters(), lr=0.5, momentum=0.9)
    masks.attach(first, opt)
    second_before = second.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"attached to another model.*masks\.detach\(\)") as err:
        masks.attach(second)
    assert "\n" not in str(err.value)
    assert torch.equal(second.weight, second_before)  # the refused call changed nothing
    for _ in range(3):
        _train_step(first, opt)
    assert torch.all(first.weight[~masks["weight"]] == 0)  # still masked: hooks kept


def test_reattaching_to_the_same_model_and_moving_after_detach_work():
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    masks = _masks().attach(first, torch.optim.SGD(first.parameters(), lr=0.1))
    opt = torch.optim.Adam(first.parameters(), lr=0.1)
    masks.attach(first, opt)  # a new optimizer on the same model (what the runner does per phase)
    _train_step(first, opt)
    assert torch.all(first.weight[~masks["weight"]] == 0)
    masks.detach()
    opt2 = torch.optim.SGD(second.parameters(), lr=0.5)
    masks.attach(second, opt2)
    _train_step(second, opt2)
    assert torch.all(second.weight[~masks["weight"]] == 0)


def test_a_copy_masks_a_second_model_while_the_first_keeps_its_masks():
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    masks = _masks()
    opt1, opt2 = torch.optim.SGD(first.parameters(), lr=0.5), torch.optim.SGD(second.parameters(), lr=0.5)
    masks.attach(first, opt1)
    MaskSet(masks.state_dict()).attach(second, opt2)
    for _ in range(2):
        _train_step(first, opt1)
        _train_step(second, opt2)
    assert torch.all(first.weight[~masks["weight"]] == 0) and torch.all(second.weight[~masks["weight"]] == 0)


def test_a_garbage_collected_first_model_does_not_block_attaching():
    masks = _masks()
    masks.attach(nn.Linear(4, 2))  # the only reference is gone after this line
    import gc

    gc.collect()
    masks.attach(nn.Linear(4, 2))


def test_quantized_mask_sets_refuse_a_second_model_too():
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    held = hard_quantize(first, Plan({"": FixedPoint(bits=2)}).resolve(first))
    opt = torch.optim.SGD(first.parameters(), lr=0.5)
    held.attach(first, opt)
    values = first.weight.detach().clone()
    with pytest.raises(RuntimeError, match="attached to another model"):
        held.attach(second)
    _train_step(first, opt)
    assert torch.equal(first.weight, values)  # still held on its levels


def test_mask_schedule_updates_accept_numpy_integers():
    from admmcompress.drivers.magnitude import GradualMagnitude

    model = nn.Linear(8, 4)
    gradual = GradualMagnitude(model, Plan({"": Unstructured(sparsity=0.5)}), updates=np.int64(2))
    assert gradual.updates == 2 and type(gradual.updates) is int

"""Iterative quantization (SPEC 2.3): frozen share per update, levels fixed, zeros kept, Runner stage, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers import IterativeQuantization
from admmcompress.finalize import MaskSet
from admmcompress.models import LeNet300100
from admmcompress.plan import Plan, PlanError
from admmcompress.structures import FixedPoint, Ternary, Unstructured
from admmcompress.train.config import ConfigError, RunConfig
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


def _layer(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(40, 30)


def test_each_update_freezes_its_share_on_levels_fixed_at_the_first():
    model = _layer()
    driver = IterativeQuantization(model, Plan({"": FixedPoint(bits=3)}), updates=4)
    levels = None
    for i in range(1, 5):
        masks = driver.step()
        held = masks.held["weight"]
        share = held.frozen.float().mean().item()
        assert share >= i / 4 - 1e-9  # ceil per level bin: at least the scheduled share
        assert share <= i / 4 + 0.05 or i == 4
        if levels is None:
            levels = held.levels.clone()
        assert torch.equal(held.levels, levels)
        w = model.weight.detach()
        assert torch.isin(w[held.frozen], torch.cat([levels, torch.zeros(1)])).all()
        with torch.no_grad():  # training between updates moves only the free weights
            model.weight.add_(0.01)
            masks.apply(model)
        assert torch.isin(model.weight.detach()[held.frozen], torch.cat([levels, torch.zeros(1)])).all()
    assert bool(driver.masks.held["weight"].frozen.all())
    assert model.weight.detach().unique().numel() <= 8


def test_pruned_zeros_stay_zero_and_finalize_completes_the_schedule():
    model = _layer(1)
    with torch.no_grad():
        keep = torch.rand_like(model.weight) < 0.2
        model.weight.mul_(keep)
    pruned = MaskSet({"weight": keep})
    driver = IterativeQuantization(model, Plan({"": FixedPoint(bits=2)}), updates=5, frozen=pruned)
    masks = driver.finalize()
    assert driver.iteration == 5
    w = model.weight.detach()
    assert bool((w[~keep] == 0).all())
    assert w[keep].unique().numel() <= 4
    assert torch.equal(masks["weight"], keep)


def test_ternary_prunes_its_dead_zone_as_the_projection_does_instead_of_snapping_it_to_plus_minus_a():
    model = _layer(3)
    projected = Ternary().project(model.weight.detach())
    dead = (projected == 0) & (model.weight.detach() != 0)
    assert int(dead.sum()) > 10
    masks = IterativeQuantization(model, Plan({"": Ternary()}), updates=3).finalize()
    w = model.weight.detach()
    assert torch.equal(w == 0, projected == 0) and torch.equal(masks["weight"], projected != 0)
    assert w.unique().numel() == 3 and torch.equal(w.unique(), projected.unique())


def test_an_all_zero_layer_stays_zero_instead_of_an_index_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    nn.init.zeros_(model[1].weight)
    driver = IterativeQuantization(model, Plan({"*": FixedPoint(bits=2)}), updates=2)
    driver.step()
    masks = driver.finalize()
    assert not model[1].weight.detach().any() and bool(masks.held["1.weight"].frozen.all())
    assert model[0].weight.detach().unique().numel() <= 4


def test_state_dict_round_trip_restores_iteration_and_partial_holds():
    model = _layer(2)
    driver = IterativeQuantization(model, Plan({"": FixedPoint(bits=2)}), updates=3)
    driver.step()
    state = driver.state_dict()
    other = IterativeQuantization(_layer(2), Plan({"": FixedPoint(bits=2)}), updates=3)
    other.load_state_dict(state)
    assert other.iteration == 1
    assert torch.equal(other.masks.held["weight"].frozen, driver.masks.held["weight"].frozen)


def test_pruning_rules_are_refused_with_the_fix():
    with pytest.raises(PlanError, match=r"only quantizes, but the plan prunes \['weight'\]; prune in an earlier"):
        IterativeQuantization(_layer(), Plan({"": Unstructured(sparsity=0.5)}), updates=2)
    with pytest.raises(ValueError, match="updates=0 must be a whole number >= 1"):
        IterativeQuantization(_layer(), Plan({"": FixedPoint(bits=2)}), updates=0)


# --- as a stage of the reference pipeline --------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", "train", limit=512), load_dataset("mnist", "test", limit=200)


def config(quantize_rules=None, **stage2) -> RunConfig:
    rules = quantize_rules or [
        {"match": "fc1", "structure": "fixed_point", "bits": 2},
        {"match": "fc2", "structure": "fixed_point", "bits": 3},
    ]
    return RunConfig.from_dict(
        {
            "name": "iterative",
            "seed": 0,
            "model": {"name": "lenet300100"},
            "data": {"batch_size": 64},
            "pretrain": {"epochs": 1},
            "stages": [
                {
                    "method": "magnitude",
                    "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.8}]},
                    "admm": {"epochs": 0},
                    "retrain": {"epochs": 1},
                },
                {
                    "method": "iterative_quantization",
                    "plan": {"rules": rules},
                    "admm": {"epochs": 2, "update_every_steps": 4},
                    "retrain": {"epochs": 1},
                    **stage2,
                },
            ],
        }
    )


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return LeNet300100()


def test_runner_stage_ends_quantized_with_the_pruning_kept(data):
    runner = Runner(config(), fresh_model(), *data, progress=False)
    metrics = runner.run()
    fc1, fc2 = runner.model.fc1.weight.detach(), runner.model.fc2.weight.detach()
    assert fc1[fc1 != 0].unique().numel() <= 4 and fc2[fc2 != 0].unique().numel() <= 8
    assert (fc1 == 0).float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert metrics["storage"]["layers"][0]["value"]["kind"] == "grid"
    assert metrics["accuracy_after"] > 50.0  # still a classifier after 2-bit fc1


def test_runner_stage_resumes_bit_identically(data, monkeypatch, tmp_path):
    cfg = config()
    full = Runner(cfg, fresh_model(), *data, progress=False)
    full.run()
    calls = {"n": 0}
    original = Runner._record

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # pretrain 1, stage-1 retrain 1, then the first iterative epoch dies
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", crash)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, fresh_model(), *data, out_dir=tmp_path, progress=False).run()
    monkeypatch.undo()
    resumed = Runner(cfg, fresh_model(seed=5), *data, out_dir=tmp_path, progress=False)
    resumed.run(resume=True)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_pruning_rule_fails_before_any_training(data):
    rules = [{"match": "fc2", "structure": "unstructured", "sparsity": 0.5}]
    with pytest.raises(PlanError, match=r"stages\[1\]: method 'iterative_quantization' only quantizes"):
        Runner(config(rules), fresh_model(), *data, progress=False)


def test_coupling_is_refused_for_iterative_quantization():
    with pytest.raises(ConfigError, match=r"coupling needs a method that drives coupled targets, one of \[.admm"):
        config(coupling="strict")

"""The driver registry: built-ins listed, unknown names named, and a reparametrizing toy driver run end to end."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers import (
    ADMM,
    Driver,
    DriverError,
    ModuleTransform,
    Reweighted,
    get_driver,
    list_drivers,
    register_driver,
    unregister_driver,
)
from admmcompress.finalize import MaskSet
from admmcompress.models import LeNet300100
from admmcompress.train.config import RunConfig, StageConfig
from admmcompress.train.runner import Runner, rebuild_transforms


def test_built_in_drivers_are_listed_with_their_configs():
    assert {"admm", "gradual", "magnitude", "reweighted", "iterative_quantization"} <= set(list_drivers())
    assert get_driver("admm").cls is ADMM and get_driver("reweighted").cls is Reweighted
    assert get_driver("admm").make_config({"rho": 2e-3}).rho == 2e-3


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(DriverError, match=r"method='prune'; choose one of \[.*'admm'.*'gradual'"):
        get_driver("prune")


def test_unknown_option_names_the_method_and_the_allowed_keys():
    expected = r"unknown option\(s\) \['rh0'\] for method 'admm'; allowed: \['rescale_dual', 'rho'"
    with pytest.raises(DriverError, match=expected):
        get_driver("admm").make_config({"rh0": 1.0})


def test_registration_errors_are_one_line():
    @dataclass
    class Options:
        pass

    with pytest.raises(DriverError, match="must subclass"):
        register_driver("not_a_driver", Options)(object)
    with pytest.raises(DriverError, match="must be a dataclass"):
        register_driver("no_config", dict)
    with pytest.raises(DriverError, match="already registered"):
        register_driver("admm", Options)(type("Other", (Driver,), {}))


def test_legacy_option_spellings_still_read():
    stage = StageConfig(plan={"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]},
                        admm={"epochs": 1, "rho": 5e-3, "rho_growth": 1.1})
    assert (stage.options.rho, stage.options.rho_growth) == (5e-3, 1.1)
    assert stage.to_dict()["options"] == {"rho": 5e-3, "rho_growth": 1.1, "rho_max": 1.0, "rescale_dual": False}
    gradual = StageConfig(plan=stage.plan, method="gradual", admm={"epochs": 1, "rho": 5e-3})  # ignored, as before
    assert gradual.options is not None
    rew = StageConfig(plan=stage.plan, method="reweighted", reweighted={"penalty": 1e-3})
    assert rew.options.penalty == 1e-3
    with pytest.raises(ValueError, match="options given twice"):
        StageConfig(plan=stage.plan, admm={"rho": 1e-3}, options={"rho": 1e-3})


# --- a reparametrizing toy driver: each targeted Linear becomes a ScaledLinear (weight * per-row scale) ------


class ScaledLinear(nn.Linear):
    """A Linear whose effective weight is ``weight * scale`` (scale: one trainable factor per output row)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.scale = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.scale, self.bias)


def _swap(model: nn.Module, name: str, copy_from: nn.Linear | None) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new = ScaledLinear(old.in_features, old.out_features, old.bias is not None)
    if copy_from is not None:
        new.load_state_dict({**copy_from.state_dict(), "scale": new.scale.detach()})
    setattr(parent, child, new)


class ScaleTransform(ModuleTransform):
    def __init__(self, layers: list[str]):
        self.layers, self.masks = layers, MaskSet()

    def apply(self, model: nn.Module) -> None:
        for name in self.layers:
            _swap(model, name, model.get_submodule(name))

    def spec(self) -> dict:
        return {"layers": self.layers}


@dataclass(frozen=True)
class ScaleOptions:
    pass


@pytest.fixture
def scale_driver():
    @register_driver("toy_scale", ScaleOptions)
    class ToyScale(Driver):
        """Ends in a module transform: targeted Linears get a trainable per-row scale."""

        def __init__(self, targets):
            self.targets, self.history, self.steps = targets, [], 0

        @classmethod
        def from_config(cls, model, targets, config, context):
            return cls(targets)

        @classmethod
        def rebuild(cls, model, spec):
            for name in spec["layers"]:
                _swap(model, name, None)

        def step(self):
            self.steps += 1

        def finalize(self):
            return ScaleTransform(sorted({t.layer for t in self.targets}))

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = int(state["steps"])

    yield ToyScale
    unregister_driver("toy_scale")


def test_a_module_transform_driver_runs_retrains_and_resumes(scale_driver, tmp_path):
    train, test = load_dataset("mnist", "train", limit=256), load_dataset("mnist", "test", limit=100)
    spec = {
        "model": {"name": "lenet300100"}, "pretrained": "<in-memory>", "seed": 0,
        "stages": [{"method": "toy_scale", "plan": {"rules": [{"match": "fc1", "structure": "unstructured",
                                                               "sparsity": 0.5}]},
                    "admm": {"epochs": 1, "update_every_steps": 2}, "retrain": {"epochs": 1}}],
    }
    torch.manual_seed(0)
    model = LeNet300100()
    runner = Runner(RunConfig.from_dict(spec), model, train, test, out_dir=tmp_path, progress=False)
    metrics = runner.run()
    assert isinstance(model.fc1, ScaledLinear) and not isinstance(model.fc2, ScaledLinear)
    assert metrics["transforms"] == [{"method": "toy_scale", "spec": {"layers": ["fc1"]}}]
    assert not torch.equal(model.fc1.scale, torch.ones_like(model.fc1.scale))  # retrained after the rewrite

    # --resume of the finished run: a fresh model gets the same modules back before the weights load
    torch.manual_seed(1)
    again = LeNet300100()
    resumed = Runner(RunConfig.from_dict(spec), again, train, test, out_dir=tmp_path, progress=False)
    resumed.run(resume=True)
    assert isinstance(again.fc1, ScaledLinear)
    x = test.x[:8]
    assert torch.equal(model.eval()(x), again.eval()(x))

    # what `admmcompress report` does with a run folder: rebuild, then load the saved state dict
    skeleton = LeNet300100()
    rebuild_transforms(skeleton, metrics["transforms"])
    skeleton.load_state_dict(model.state_dict())


def test_rescale_dual_reads_from_a_stage_options_mapping():
    plan = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]}
    stage = StageConfig(plan=plan, method="admm", options={"rho": 1e-3, "rescale_dual": True}, admm={"epochs": 1})
    assert stage.options.schedule().rescale_dual is True
    soft = StageConfig(plan=plan, method="soft", options={"rescale_dual": True, "rho_growth": 1.3}, admm={"epochs": 1})
    assert soft.options.schedule.rescale_dual is True
    with pytest.raises((DriverError, ValueError), match=r"rescale_dual=1 must be true or false"):
        StageConfig(plan=plan, method="admm", options={"rescale_dual": 1}, admm={"epochs": 1})

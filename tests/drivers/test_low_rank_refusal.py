"""Low-rank targets (tucker2, shared_kernels) are refused by every driver that cannot factorize them.

Built directly from the API, not only through the runner: a driver that drove them as masks would leave the
layers dense and report nothing wrong.
"""

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM, GradualMagnitude, OneShotMagnitude, Reweighted
from admmcompress.drivers.iterative_quantization import IterativeQuantization
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.plan import Plan, PlanError
from admmcompress.structures import Tucker2

REFUSAL = "does not factorize layers, so its 'tucker2' targets would stay dense; use method admm"


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))


def low_rank(model: nn.Module) -> list:
    return Plan({"2": Tucker2(ranks=(4, 4))}).resolve(model)


@pytest.mark.parametrize(
    ("method", "build"),
    [
        ("magnitude", lambda m, t: OneShotMagnitude(m, t)),
        ("gradual", lambda m, t: GradualMagnitude(m, t, updates=2)),
        ("reweighted", lambda m, t: Reweighted(m, t, penalty=1e-4)),
        ("soft", lambda m, t: SoftThreshold(m, t, SoftConfig(), example=torch.zeros(1, 3, 8, 8))),
        ("iterative_quantization", lambda m, t: IterativeQuantization(m, t, updates=2)),
    ],
)
def test_a_driver_that_cannot_factorize_refuses_tucker2_when_built(method, build):
    model = conv_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=f"method '{method}' {REFUSAL}"):
        build(model, low_rank(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before touching it


def test_admm_factorizes_and_accepts_tucker2():
    model = conv_model()
    ADMM.check_targets(low_rank(model))  # no error


def test_a_plugin_whose_check_targets_calls_no_super_still_refuses_low_rank_targets():
    from admmcompress.drivers import Driver

    class Plugin(Driver):
        name = "plugin_without_super"

        @classmethod
        def check_targets(cls, targets: list) -> None:  # refuses nothing, calls no super()
            pass

    with pytest.raises(PlanError, match=f"method 'plugin_without_super' {REFUSAL}"):
        Plugin.accept_targets(low_rank(conv_model()))


def test_an_unregistered_subclass_is_named_as_itself_not_as_its_registered_parent():
    class MyGradual(GradualMagnitude):
        pass

    with pytest.raises(PlanError, match=f"method 'MyGradual' {REFUSAL}"):
        MyGradual(conv_model(), low_rank(conv_model()), updates=2)

"""Method variation_admm: registered, validated options, noise only between prepare() and close()."""

from __future__ import annotations

import pytest
import torch

from admmcompress.drivers import DriverContext, DriverError, get_driver
from admmcompress.hardware.variation import VariationADMM, VariationADMMConfig
from admmcompress.plan import Plan
from admmcompress.structures.crossbar import CrossbarRow


def test_registered_and_options_validated():
    spec = get_driver("variation_admm")
    assert spec.cls is VariationADMM
    config = spec.make_config({"rho": 1e-2, "sigma": 0.05, "bits_per_cell": 1})
    assert config.noise().sigma == 0.05 and config.crossbar().bits_per_cell == 1
    with pytest.raises(DriverError, match="unknown option"):
        spec.make_config({"variation": 0.1})
    with pytest.raises(DriverError, match="sigma=-1 must be a finite number >= 0"):
        spec.make_config({"sigma": -1})
    with pytest.raises(DriverError, match="signed='twos'"):
        spec.make_config({"signed": "twos"})


def test_noise_only_while_prepared_and_state_round_trips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    targets = Plan({"0": CrossbarRow(sparsity=0.5, tile=(8, 8))}).resolve(model)
    driver = VariationADMM.from_config(model, targets, VariationADMMConfig(sigma=0.2), DriverContext())
    x = torch.randn(4, 16)
    model.train()
    clean = model(x)
    driver.prepare(model)
    noisy = model(x)
    state = driver.state_dict()
    first = model(x)
    driver.load_state_dict(state)
    assert torch.equal(model(x), first)  # the noise generator is part of the driver's state
    loss = noisy.pow(2).sum() + driver.penalty()
    loss.backward()
    assert model[0].weight.grad is not None
    driver.close()
    assert not torch.equal(noisy, clean) and torch.equal(model(x), clean)
    driver.step()
    assert driver.finalize() is not None

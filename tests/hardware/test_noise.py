"""Device non-idealities: log-normal statistics, stuck-at fractions, exact noiseless read-back, Monte-Carlo,
and the training-time injector."""

from __future__ import annotations

import math

import pytest
import torch

from admmcompress.hardware import CrossbarSpec, DeviceNoise, NoiseInjector, monte_carlo
from admmcompress.hardware.noise import CellMapping, perturb_conductance

CELLS = 200_000


def test_log_normal_variation_has_the_stated_sigma():
    g = torch.full((CELLS,), 50.0, dtype=torch.float64)
    for sigma in (0.05, 0.1, 0.2):
        out = perturb_conductance(g, DeviceNoise(sigma=sigma), 1.0, 100.0, torch.Generator().manual_seed(1))
        log_ratio = torch.log(out / g)
        # Standard errors at 200k cells: mean sigma/447, sd about sigma/632; tolerances are ~5 of them.
        assert abs(float(log_ratio.mean())) < 5 * sigma / math.sqrt(CELLS)
        assert float(log_ratio.std()) == pytest.approx(sigma, rel=0.01)
        assert float((out / g).mean()) == pytest.approx(math.exp(sigma**2 / 2), rel=0.002)


def test_stuck_at_fractions():
    g = torch.full((CELLS,), 50.0, dtype=torch.float64)
    out = perturb_conductance(g, DeviceNoise(stuck_on=0.05, stuck_off=0.1), 1.0, 100.0,
                              torch.Generator().manual_seed(2))
    # Binomial sd at p=0.1: sqrt(0.09/200k) = 0.00067; 0.004 is six of them.
    assert float((out == 100.0).double().mean()) == pytest.approx(0.05, abs=0.004)
    assert float((out == 1.0).double().mean()) == pytest.approx(0.10, abs=0.004)
    assert float((out == 50.0).double().mean()) == pytest.approx(0.85, abs=0.004)


@pytest.mark.parametrize("signed", ["differential", "offset"])
@pytest.mark.parametrize("bits_per_cell", range(1, 9))
@pytest.mark.parametrize("weight_bits", [*range(1, 11), 16])
def test_noiseless_read_back_is_exact_on_the_grid(signed, bits_per_cell, weight_bits):
    spec = CrossbarSpec(rows=4, cols=40, bits_per_cell=bits_per_cell, weight_bits=weight_bits, signed=signed)
    # Symmetric magnitudes both schemes can store; a 1-bit weight keeps -q, 0 and +q (pruned weights are zero).
    n = max(1, 2 ** (weight_bits - 1) - 1)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-n, n + 1, (6, 8), generator=g).double() * 0.125
    w[0, 0], w[0, 1], w[0, 2] = n * 0.125, -n * 0.125, 0.0  # the largest codes of both signs, and a zero
    cells = CellMapping.of(w, spec)
    assert torch.allclose(cells.read(DeviceNoise()), w * cells.exists.reshape(w.shape), atol=1e-12)


def test_cells_of_uninstantiated_tiles_read_zero_under_noise():
    spec = CrossbarSpec(rows=2, cols=4, bits_per_cell=2, weight_bits=3)  # 2 outputs x 2 inputs per tile
    w = torch.zeros(4, 4, dtype=torch.float64)
    w[0, 0], w[3, 3] = 1.0, -1.0  # two tiles instantiated, two empty
    read = CellMapping.of(w, spec).read(DeviceNoise(sigma=0.3, stuck_on=0.2), torch.Generator().manual_seed(0))
    empty = torch.zeros(4, 4, dtype=torch.bool)
    empty[0:2, 2:4] = True
    empty[2:4, 0:2] = True
    assert torch.all(read[empty] == 0)
    assert read[0, 0] != 1.0  # the occupied tiles do vary


def test_multiplicative_noise_on_a_single_cell_weight_has_the_lognormal_mean():
    # One slice, differential: w' = q (G+' - G-') / dG with G- = G_min also varying.
    spec = CrossbarSpec(bits_per_cell=2, weight_bits=3, g_min=1.0, g_max=100.0)  # codes 0..3, dG = 33
    w = torch.full((1, 1), 3.0, dtype=torch.float64).expand(400, 500).clone()
    sigma = 0.1
    read = CellMapping.of(w, spec).read(DeviceNoise(sigma=sigma), torch.Generator().manual_seed(3))
    e = math.exp(sigma**2 / 2)
    expected = 3.0 * ((100.0 * e - 1.0) - (1.0 * e - 1.0)) / 99.0  # q=1: E[G+'] - E[G-'] over dG
    assert float(read.mean()) == pytest.approx(expected, rel=0.002)


def test_device_noise_restores_weights_and_monte_carlo_is_seeded():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    before = model[0].weight.detach().clone()
    x = torch.randn(32, 8)

    def score(m):
        return m(x).sum().item()

    spec = CrossbarSpec(bits_per_cell=2, weight_bits=6)
    first = monte_carlo(model, score, spec, DeviceNoise(sigma=0.1), draws=4, seed=5)
    again = monte_carlo(model, score, spec, DeviceNoise(sigma=0.1), draws=4, seed=5)
    assert first == again and len(first.values) == 4 and len(set(first.values)) == 4
    t = torch.tensor(first.values, dtype=torch.float64)
    assert first.mean == pytest.approx(float(t.mean())) and first.sd == pytest.approx(float(t.std()))
    assert torch.equal(model[0].weight.detach(), before)
    with pytest.raises(ValueError, match="draws=0 must be a positive integer"):
        monte_carlo(model, score, spec, DeviceNoise(), draws=0)
    with pytest.raises(ValueError, match="sigma=-0.1 must be a finite number >= 0"):
        DeviceNoise(sigma=-0.1)
    with pytest.raises(ValueError, match="stuck_on \\+ stuck_off = 1.5 is above 1"):
        DeviceNoise(stuck_on=1.0, stuck_off=0.5)


def test_noise_injector_trains_the_clean_parameter_and_leaves_eval_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    param = model[0].weight
    keys = list(model.state_dict())
    injector = NoiseInjector(CrossbarSpec(), DeviceNoise(sigma=0.2), seed=0).install(model)
    x = torch.randn(16, 8)
    model.train()
    out1, out2 = model(x), model(x)
    assert not torch.equal(out1, out2)  # fresh noise each forward
    out1.sum().backward()
    assert model[0].weight is param and param.grad is not None and list(model.state_dict()) == keys
    model.eval()
    clean = model(x)
    injector.remove()
    assert torch.equal(clean, model(x))
    model.train()
    assert torch.equal(model(x), model(x))  # removed: no noise


def test_off_grid_weights_are_rounded_to_the_nearest_cell_code():
    spec = CrossbarSpec(bits_per_cell=2, weight_bits=5)  # 15 magnitude codes: q = max|w| / 15
    w = torch.randn(32, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cells = CellMapping.of(w, spec)
    q = float(w.abs().max()) / 15
    assert cells.q == pytest.approx(q)
    read = cells.read(DeviceNoise())
    assert float((read - w).abs().max()) <= q / 2 + 1e-12
    assert torch.equal(read, torch.round(w / q) * q)


def test_a_tied_weight_is_drawn_once_and_restored_exactly():
    """Two mapped layers sharing one Parameter: noise was applied twice and the restore wrote the first noisy
    draw back, so the noise stayed in the model after the block (a review's finding)."""
    from torch import nn

    from admmcompress.hardware import device_noise

    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    model, clean = nn.Sequential(a, nn.ReLU(), b), a.weight.detach().clone()
    with device_noise(model, CrossbarSpec(), DeviceNoise(sigma=0.2), seed=0):
        assert not torch.equal(a.weight.detach(), clean)
    assert torch.equal(a.weight.detach(), clean)

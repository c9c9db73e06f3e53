"""Cost models against hand computation: crossbar area/power/energy, SOT-MRAM sub-arrays and cycles, ADC."""

from __future__ import annotations

import pytest
import torch

from admmcompress.hardware import CrossbarSpec, LayerMapping, ModelMapping, crossbar_cost
from admmcompress.hardware.adc import adc_quantization
from admmcompress.hardware.constants import CROSSBAR, PIM
from admmcompress.hardware.cost import tile_figures
from admmcompress.hardware.pim import PIMSpec, pim_cost, pim_matrix_cost

# ISAAC per-array figures (constants.py), summed by hand for a 128x128 tile with an 8-bit ADC:
TILE_AREA = 25.0 + 1200.0 + 0.166 * 128 + 0.039 * 128 + 30.0 + 358.75  # um^2
TILE_POWER = 0.3 + 2.0 + 0.0039 * 128 + 0.0000098 * 128 + 0.025 + 0.184  # mW


def two_layers(spec: CrossbarSpec) -> ModelMapping:
    return ModelMapping(spec, [
        LayerMapping("conv", 32, 288, 32, 288, 9216, dense=6, masked=4, compact=3, positions=64),
        LayerMapping("fc", 10, 64, 10, 64, 640, dense=1, masked=1, compact=1, positions=1),
    ])


def test_crossbar_cost_by_hand():
    cost = crossbar_cost(two_layers(CrossbarSpec()), "compact", act_bits=8)
    assert cost.tiles == 4
    assert cost.area_um2 == pytest.approx(4 * TILE_AREA)
    assert cost.power_mw == pytest.approx(4 * TILE_POWER)
    # energy: (3 tiles x 64 positions + 1 x 1) x 8 cycles x 100 ns x tile power; mW x ns = pJ
    assert cost.energy_nj == pytest.approx((3 * 64 + 1) * 8 * 100 * TILE_POWER / 1000)
    assert cost.layer_energy_nj["fc"] == pytest.approx(8 * 100 * TILE_POWER / 1000)
    dense = crossbar_cost(two_layers(CrossbarSpec()), "dense", act_bits=8)
    ratios = cost.ratios(dense)
    assert ratios["tiles"] == pytest.approx(7 / 4) and ratios["area"] == pytest.approx(7 / 4)
    assert ratios["energy"] == pytest.approx((6 * 64 + 1) / (3 * 64 + 1))


def test_adc_resolution_and_tile_size_scale_the_periphery():
    area8, power8 = tile_figures(CrossbarSpec())
    area6, power6 = tile_figures(CrossbarSpec(adc_bits=6))
    assert area6["adc"] == pytest.approx(area8["adc"] / 4) and power6["adc"] == pytest.approx(power8["adc"] / 4)
    area, power = tile_figures(CrossbarSpec(rows=64, cols=256))
    assert area["array"] == pytest.approx(CROSSBAR.array_area.value)  # same cell count
    assert area["dac"] == pytest.approx(64 * 0.166) and area["sample_hold"] == pytest.approx(256 * 0.039)
    with pytest.raises(ValueError, match="kind='sparse'; choose one of"):
        crossbar_cost(two_layers(CrossbarSpec()), "sparse")


def test_pim_matrix_cost_by_hand():
    spec = PIMSpec(rows=4, cols=8, weight_bits=2, act_bits=3)  # 4 outputs x 4 inputs per sub-array
    m = torch.zeros(8, 8)
    m[0, 0:4] = 1.0  # sub-array (0, 0): 4 rows
    m[5, 6] = 1.0  # sub-array (1, 1): 1 row
    layer = pim_matrix_cost("m", m, spec, positions=10)
    # compacted: outputs {0, 5}, inputs {0,1,2,3,6} -> 2 x 5 -> blocks 1 x 2: (0,0) 4 rows, (0,1) 1 row
    assert (layer.subarrays, layer.row_ops, layer.max_rows, layer.cycles_per_row_op) == (2, 5, 4, 6)
    assert layer.stored_bits == 5 * 2


def test_pim_model_totals_by_hand():
    spec = PIMSpec(rows=4, cols=8, weight_bits=2, act_bits=3)
    model = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0:4] = 1.0
        model.weight[5, 6] = 1.0
    cost = pim_cost(model, spec)
    assert cost.subarrays == 2
    assert cost.area_um2 == pytest.approx(2 * (32 * PIM.cell_area.value + 8 * PIM.column_periphery_area.value))
    per_cycle = 4 * (PIM.row_op_energy.value + PIM.count_energy.value)  # pJ, one bit plane: 8 bitlines / 2 bits
    assert cost.energy_nj == pytest.approx(5 * 6 * per_cycle / 1000)
    assert cost.latency_us == pytest.approx(4 * 6 * PIM.cycle_time.value / 1000)
    assert cost.power_mw == pytest.approx(cost.energy_nj / cost.latency_us)
    dense = pim_cost(model, spec, dense=True)
    assert dense.subarrays == 4 and cost.ratios(dense)["subarrays"] == pytest.approx(2.0)


def test_pim_energy_grows_linearly_with_the_weight_bits():
    """Each cycle pairs one weight bit plane with one input bit; charging every bitline in every one of the
    weight_bits x act_bits cycles counted the weight bits twice (energy x4 per doubling, a review's finding)."""
    model = torch.nn.Linear(1024, 1024, bias=False)
    energy = [pim_cost(model, PIMSpec(rows=256, cols=256, weight_bits=w, act_bits=8)).energy_nj for w in (1, 2, 4)]
    assert energy[1] == pytest.approx(2 * energy[0]) and energy[2] == pytest.approx(4 * energy[0])


def test_adc_with_many_bits_is_exact_and_few_bits_are_not():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 36, 5))
    x = torch.randn(4, 3, 6, 6)
    exact = model(x)
    with adc_quantization(model, 20, x, inputs_per_tile=10):
        assert torch.allclose(model(x), exact, atol=1e-4)
    with adc_quantization(model, 3, x, inputs_per_tile=10) as adc:
        rough = model(x)
    assert adc.skipped == [] and len(adc.full_scale["3"]) == 15  # ceil(144 / 10) input blocks
    assert not torch.allclose(rough, exact, atol=1e-3)
    assert torch.allclose(model(x), exact)  # hooks removed on exit


def test_adc_area_and_power_follow_the_columns_a_tile_converts():
    """One ISAAC ADC converts 128 columns per cycle; charged once per tile whatever its width, 512x512 tiles came
    out 12.5x smaller than 128x128 ones for the same layers (a review's finding)."""
    small, wide = tile_figures(CrossbarSpec(128, 128)), tile_figures(CrossbarSpec(512, 512))
    assert wide[0]["adc"] == pytest.approx(4 * small[0]["adc"]) and wide[1]["adc"] == pytest.approx(4 * small[1]["adc"])
    fewer_bits = tile_figures(CrossbarSpec(128, 128, adc_bits=7))
    assert fewer_bits[0]["adc"] == pytest.approx(small[0]["adc"] / 2)

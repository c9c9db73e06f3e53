"""SOT-MRAM costs and device-noise cells of grouped convs worked out from their blocks: the same results as the
dense block-diagonal layout they used to build (``groups`` times the weights: GBs for a large depthwise conv)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from admmcompress.hardware import CrossbarSpec
from admmcompress.hardware.analysis import analyze
from admmcompress.hardware.crossbar import GemmWeight, block_diagonal, diagonal_blocks, tile_grid
from admmcompress.hardware.noise import CellMapping, DeviceNoise, cells_exist, device_noise
from admmcompress.hardware.pim import PIMSpec, pim_blocks_cost, pim_cost, pim_matrix_cost

GROUPED = [
    (nn.Conv2d, 12, 12, 3, 12),  # depthwise
    (nn.Conv2d, 12, 24, 3, 6),
    (nn.Conv1d, 9, 18, 5, 3),
    (nn.ConvTranspose2d, 8, 16, 3, 4),
    (nn.Conv2d, 32, 32, 7, 32),
    (nn.Conv2d, 6, 8, 3, 1),  # ungrouped: one block
]
PRUNINGS = ["none", "weights", "scattered", "sparse", "outputs", "inputs", "groups", "all"]
PIM_SPECS = [
    PIMSpec(rows=16, cols=8, weight_bits=2, act_bits=3),  # 4 outputs x 16 inputs a sub-array
    PIMSpec(rows=7, cols=9, weight_bits=4, act_bits=2),  # 2 outputs x 7 inputs: sub-arrays off the group borders
    PIMSpec(),
    PIMSpec(rows=3, cols=1, weight_bits=1, act_bits=1),  # one output a sub-array
]
CROSSBAR_SPECS = [
    CrossbarSpec(rows=16, cols=8, bits_per_cell=7, weight_bits=8),  # 4 outputs x 16 inputs a tile
    CrossbarSpec(rows=7, cols=9, bits_per_cell=4, weight_bits=4, signed="offset"),  # tiles off the group borders
    CrossbarSpec(rows=128, cols=128),
    CrossbarSpec(rows=3, cols=2, bits_per_cell=8, weight_bits=8, signed="offset"),  # one output a tile
]


def _shape_id(shape: tuple) -> str:
    kind, cin, cout, k, groups = shape
    return f"{kind.__name__}-{cin}x{cout}k{k}g{groups}"


def _pruned_conv(shape: tuple, pruning: str) -> tuple[nn.Module, GemmWeight, torch.Tensor]:
    """A seeded conv with ``pruning`` applied to its GEMM blocks: the conv, its GemmWeight and the blocks."""
    kind, cin, cout, k, groups = shape
    torch.manual_seed(0)
    conv = kind(cin, cout, k, groups=groups)
    gemm = GemmWeight("0", conv)
    blocks = gemm.blocks().clone()
    if pruning == "weights":
        blocks[torch.rand_like(blocks) < 0.7] = 0
    elif pruning == "scattered":  # groups' rows kept on tiles where only a neighbouring group has a weight
        blocks[torch.rand_like(blocks) < 0.9] = 0
    elif pruning == "sparse":  # most tiles left empty, some groups sharing a tile with an empty one
        blocks[torch.rand_like(blocks) < 0.97] = 0
    elif pruning == "outputs":
        blocks[torch.rand(blocks.shape[:2]) < 0.5] = 0
    elif pruning == "inputs":
        blocks.transpose(1, 2)[torch.rand(blocks.shape[0], blocks.shape[2]) < 0.5] = 0
    elif pruning == "groups":
        blocks[::2] = 0
    elif pruning == "all":
        blocks.zero_()
    with torch.no_grad():
        conv.weight.copy_(gemm.weight_of(blocks))
    return conv, gemm, blocks


def _dense_cells_exist(nonzero: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """The old path, kept as the reference: the tile grid of the dense block-diagonal layout, read back per block."""
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    kept = nonzero.any(dim=2, keepdim=True) & nonzero.any(dim=1, keepdim=True)
    layout = block_diagonal(nonzero)
    grid = tile_grid(layout, out_t, in_t)
    on_tile = grid.repeat_interleave(out_t, 0).repeat_interleave(in_t, 1)[: layout.shape[0], : layout.shape[1]]
    return kept & diagonal_blocks(on_tile, nonzero.shape[0])


# --- 1. SOT-MRAM: sub-arrays, row operations, fullest sub-array and stored bits, from the blocks ------------------


@pytest.mark.parametrize("shape", GROUPED, ids=_shape_id)
@pytest.mark.parametrize("spec", PIM_SPECS, ids=lambda s: f"{s.rows}x{s.cols}-w{s.weight_bits}")
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_a_grouped_convs_pim_cost_equals_that_of_its_dense_layout(shape, spec: PIMSpec, pruning: str) -> None:
    conv, _, blocks = _pruned_conv(shape, pruning)
    reference = pim_matrix_cost("0", block_diagonal(blocks), spec, positions=3)
    assert pim_blocks_cost("0", blocks, spec, positions=3) == reference
    model = nn.Sequential(conv)
    assert pim_cost(model, spec).layers[0] == dataclasses.replace(reference, positions=1)
    unpruned = pim_matrix_cost("0", block_diagonal(torch.ones_like(blocks)), spec)
    assert pim_cost(model, spec, dense=True).layers[0] == unpruned


def test_blocks_that_are_not_groups_outputs_inputs_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"blocks of shape \(4, 6\); give \(groups, outputs, inputs\)") as caught:
        pim_blocks_cost("m", torch.ones(4, 6), PIMSpec())
    assert "\n" not in str(caught.value)


# --- 2. device noise: the cells that exist, and so every seeded draw, equal those of the dense layout -------------


@pytest.mark.parametrize("shape", GROUPED, ids=_shape_id)
@pytest.mark.parametrize("spec", CROSSBAR_SPECS, ids=lambda s: f"{s.rows}x{s.cols}-{s.signed}")
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_a_grouped_convs_cells_equal_those_of_its_dense_layout(shape, spec: CrossbarSpec, pruning: str) -> None:
    _, _, blocks = _pruned_conv(shape, pruning)
    assert torch.equal(cells_exist(blocks != 0, spec), _dense_cells_exist(blocks != 0, spec))


def test_a_cell_exists_on_a_tile_only_a_neighbouring_group_holds_a_weight_on() -> None:
    """2 groups of 3 outputs x 5 inputs, a 6 x 10 layout on tiles of 2 outputs x 4 inputs. Group 0's weight
    (output 2, input 4) is pruned, but its output and input are kept (by its weights (2, 0) and (0, 4)), and
    its tile (layout rows 2-3, columns 4-7) is instantiated by group 1's weight (0, 0) at layout (3, 5)."""
    spec = CrossbarSpec(rows=4, cols=4, bits_per_cell=2, weight_bits=3)
    nonzero = torch.zeros(2, 3, 5, dtype=torch.bool)
    nonzero[0, 2, 0] = nonzero[0, 0, 4] = nonzero[1, 0, 0] = True
    exists = cells_exist(nonzero, spec)
    assert bool(exists[0, 2, 4]) and not bool(exists[0, 1, 4])  # output 1 of group 0 holds no weight: removed
    assert torch.equal(exists, _dense_cells_exist(nonzero, spec))


@pytest.mark.parametrize("blocks_shape", [(6, 4, 18), (3, 6, 45), (4, 4, 9)], ids=str)
@pytest.mark.parametrize("spec", CROSSBAR_SPECS, ids=lambda s: f"{s.rows}x{s.cols}-{s.signed}")
def test_scattered_weights_of_multi_output_groups_have_the_cells_of_the_dense_layout(blocks_shape, spec) -> None:
    """Groups of several outputs cross tile rows, so tiles are shared in both directions; 10 seeded patterns."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        nonzero = torch.rand(blocks_shape, generator=generator) < 0.1
        assert torch.equal(cells_exist(nonzero, spec), _dense_cells_exist(nonzero, spec))


@pytest.mark.parametrize("shape", GROUPED[:5], ids=_shape_id)
@pytest.mark.parametrize("pruning", ["weights", "scattered", "groups"])
def test_a_seeded_draw_on_a_grouped_conv_equals_the_draw_on_its_dense_layouts_cells(shape, pruning: str) -> None:
    """The draws are made per cell of the blocks (not of the layout), so only which cells exist could differ."""
    spec, noise = CROSSBAR_SPECS[1], DeviceNoise(sigma=0.2, stuck_on=0.05, stuck_off=0.05)
    conv, gemm, blocks = _pruned_conv(shape, pruning)
    cells = CellMapping.of(conv.weight, spec, layout=gemm)
    dense = dataclasses.replace(cells, exists=_dense_cells_exist(blocks != 0, spec))
    expected = dense.read(noise, torch.Generator().manual_seed(5))
    assert torch.equal(cells.read(noise, torch.Generator().manual_seed(5)), expected)
    clean = conv.weight.detach().clone()
    with device_noise(nn.Sequential(conv), spec, noise, seed=5):
        assert torch.equal(conv.weight.detach(), expected.to(conv.weight.dtype))
    assert torch.equal(conv.weight.detach(), clean)


# --- 3. a large depthwise conv: costed and varied without its block-diagonal layout --------------------------------


def _depthwise_subarray_rows(channels: int, kernel: int, spec: PIMSpec) -> list[int]:
    """Occupied rows of each sub-array of an unpruned depthwise conv's layout, worked out: sub-array row r holds
    channels [r * out, (r + 1) * out), whose inputs are the consecutive columns [r * out * kernel, ...); each of
    those columns is one occupied row of the sub-array it falls in."""
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    rows = []
    for band in range(-(-channels // out_t)):
        first, last = band * out_t * kernel, min((band + 1) * out_t, channels) * kernel - 1
        for column in range(first // in_t, last // in_t + 1):
            rows.append(min(last, (column + 1) * in_t - 1) - max(first, column * in_t) + 1)
    return rows


@pytest.fixture
def no_block_diag(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a dense block-diagonal layout was built")

    monkeypatch.setattr(torch, "block_diag", refuse)


def _large_depthwise(channels: int = 4096, kernel: int = 7) -> nn.Conv2d:
    """4096 channels, 7x7: its layout would be 4096 x 200,704 weights (3.3 GB of floats)."""
    conv = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)
    return conv


def test_a_large_depthwise_conv_is_costed_on_sot_mram_without_its_layout(no_block_diag) -> None:
    conv = _large_depthwise()
    channels, kernel = conv.out_channels, conv.weight[0].numel()
    result = analyze(nn.Sequential(conv), CrossbarSpec(), pim_bits=(1, 4))
    for cost in [*result.pim, result.pim_baseline]:
        expected = _depthwise_subarray_rows(channels, kernel, cost.spec)
        layer = cost.layers[0]
        assert (layer.subarrays, layer.row_ops, layer.max_rows) == (len(expected), sum(expected), max(expected))
        assert layer.stored_bits == conv.weight.numel() * cost.spec.weight_bits
    assert result.pim_baseline.spec.weight_bits == 16 and [c.spec.weight_bits for c in result.pim] == [1, 4]


def test_a_large_depthwise_conv_is_varied_without_its_layout(no_block_diag) -> None:
    conv = _large_depthwise()
    spec = CrossbarSpec()
    gemm = GemmWeight("0", conv)
    cells = CellMapping.of(conv.weight, spec, layout=gemm)
    assert bool(cells.exists.all())  # every weight kept, on a tile with weights
    clean = conv.weight.detach().clone()
    with device_noise(nn.Sequential(conv), spec, DeviceNoise(sigma=0.1), seed=0):
        noisy = conv.weight.detach().clone()
    assert not torch.equal(noisy, clean) and torch.equal(conv.weight.detach(), clean)
    # the same seed on the blocks alone gives the same draw: nothing depends on the layout
    assert torch.equal(noisy, cells.read(DeviceNoise(sigma=0.1), torch.Generator().manual_seed(0)).float())

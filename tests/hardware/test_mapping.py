"""Crossbar tile mapping: tile counts on hand-made matrices, masked and compacted counts against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from admmcompress.hardware import CrossbarSpec, map_matrix, map_model


def brute_tiles(matrix: torch.Tensor, out_t: int, in_t: int) -> int:
    """Instantiated tiles counted one block at a time."""
    rows, cols = matrix.shape
    count = 0
    for r in range(0, rows, out_t):
        for c in range(0, cols, in_t):
            if bool((matrix[r : r + out_t, c : c + in_t] != 0).any()):
                count += 1
    return count


def test_spec_columns_and_outputs_per_tile_by_hand():
    # 8-bit weights, 2 bits/cell, differential: 7 magnitude bits -> 4 slices -> 8 columns -> 16 outputs per tile.
    spec = CrossbarSpec()
    assert (spec.slices, spec.columns_per_weight, spec.outputs_per_tile, spec.inputs_per_tile) == (4, 8, 16, 128)
    # Offset: 8 magnitude bits / 2 -> 4 slices, 1 column per slice, 1 reference column: (128 - 1) // 4 = 31.
    offset = CrossbarSpec(signed="offset")
    assert (offset.slices, offset.columns_per_weight, offset.outputs_per_tile) == (4, 4, 31)
    # One bit per cell, 1-bit weights (binary, differential): one slice, a pair of cells.
    assert CrossbarSpec(bits_per_cell=1, weight_bits=1).columns_per_weight == 2
    assert CrossbarSpec(bits_per_cell=8, weight_bits=8).slices == 1


def test_dense_tile_counts_on_hand_made_shapes():
    spec = CrossbarSpec(rows=4, cols=8, bits_per_cell=2, weight_bits=5)  # 4 magnitude bits: 2 slices, 4 cols
    assert spec.outputs_per_tile == 2
    for (o, k), expected in {(2, 4): 1, (3, 4): 2, (5, 9): 9, (1, 1): 1, (4, 8): 4}.items():
        layer = map_matrix("m", torch.ones(o, k), spec)
        assert layer.dense == layer.masked == layer.compact == expected, (o, k)


def test_masked_mapping_drops_all_pruned_tiles():
    spec = CrossbarSpec(rows=4, cols=4, bits_per_cell=2, weight_bits=3)  # 2 outputs x 4 inputs per tile
    m = torch.zeros(6, 12)
    m[0:2, 0:4] = 1.0  # tile (0, 0) full
    m[5, 11] = 1.0  # one weight in tile (2, 2)
    layer = map_matrix("m", m, spec)
    assert (layer.dense, layer.masked) == (9, 2)
    # Compacted: rows {0,1,5} x cols {0..3, 11} = 3 x 5 -> tiles: rows [0,1]|[5], cols [0..3]|[11]:
    # (0,0) holds the full block, (1,1) holds m[5, 11]; (0,1) and (1,0) are empty.
    assert (layer.kept_outputs, layer.kept_inputs, layer.compact) == (3, 5, 2)


@pytest.mark.parametrize("seed", range(5))
def test_masked_and_compact_counts_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    spec = CrossbarSpec(rows=3, cols=4, bits_per_cell=1, weight_bits=2)  # 1 slice, pair: 2 outputs per tile
    m = torch.randn(7, 10, generator=g) * (torch.rand(7, 10, generator=g) < 0.15)
    layer = map_matrix("m", m, spec)
    assert layer.dense == math.ceil(7 / 2) * math.ceil(10 / 3)
    assert layer.masked == brute_tiles(m, 2, 3)
    compact = m[(m != 0).any(1)][:, (m != 0).any(0)]
    assert layer.compact == brute_tiles(compact, 2, 3)
    assert layer.nonzero == int((m != 0).sum())


def test_conv_layers_use_the_gemm_view_and_output_positions():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 20, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(20 * 64, 10))
    mapping = map_model(model, CrossbarSpec(), torch.randn(2, 3, 8, 8))
    conv, fc = mapping.layers
    assert (conv.outputs, conv.inputs, conv.positions, conv.dense) == (20, 27, 64, 2)  # 16 outputs per tile
    assert (fc.outputs, fc.inputs, fc.positions, fc.dense) == (10, 1280, 1, 10)
    assert mapping.total("dense") == 12


def test_tile_above_matrix_size_gets_a_clear_note():
    layer = map_matrix("tiny", torch.ones(4, 10), CrossbarSpec())
    assert layer.dense == 1
    assert "'tiny' (4x10) fits in one tile (16 outputs x 128 inputs)" in layer.note
    assert "use a smaller tile" in layer.note
    assert map_model(torch.nn.Linear(10, 4), CrossbarSpec()).notes == [layer.note.replace("'tiny'", "''")]
    exact = map_matrix("exact", torch.ones(16, 128), CrossbarSpec())  # one tile exactly: noted too (review)
    assert exact.dense == 1 and "fits in one tile" in exact.note


def test_model_without_gemm_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="ReLU has no Linear, Conv or recurrent layer to map onto crossbar tiles"):
        map_model(torch.nn.ReLU(), CrossbarSpec())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": 0}, "rows=0 must be a positive integer"),
        ({"signed": "twos"}, "signed='twos'; choose 'differential' or 'offset'"),
        ({"cols": 4, "weight_bits": 16, "bits_per_cell": 1}, "one weight takes 30 columns"),
        ({"g_min": 5.0, "g_max": 1.0}, "need 0 < g_min < g_max"),
        # a huge tile would pad every layer to a huge grid (1.25e15 bytes for a 1e8 tile): refused with the range
        ({"rows": 10**8, "cols": 10**8},
         r"tile 100000000x100000000 is too large; rows and cols must be in \[1, 4096\]"),
        ({"adc_bits": 5000}, r"adc_bits=5000 must be in \[1, 24\]"),  # 2 ** (5000 - 8) overflowed a float
    ],
)
def test_bad_specs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossbarSpec(**kwargs)


def test_compacting_never_needs_more_tiles_than_the_masked_layout():
    from types import SimpleNamespace

    import torch

    from admmcompress.hardware.crossbar import map_matrix

    m = torch.zeros(4, 4)
    m[1, 0:2] = 1
    m[2, 2:4] = 1
    m[3, 2:4] = 1  # removing zero row 0 shifts rows 2-3 across the 2x2 tile border
    layout = SimpleNamespace(outputs_per_tile=2, inputs_per_tile=2)
    mapping = map_matrix("m", m, layout)
    assert (mapping.dense, mapping.masked, mapping.compact) == (4, 2, 2)

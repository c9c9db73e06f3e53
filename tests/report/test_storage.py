"""Storage accounting (SPEC 4.2) on hand-computed cases, including filler entries of the relative index.

The per-weight helpers live in ``admmcompress.encoding``; ``report.storage`` keeps the model table.
"""

import io
import math

import pytest
import torch
from torch import nn

from admmcompress.encoding import FLOAT32, clog2, layer_storage, relative_entries, relative_gaps, value_format
from admmcompress.report.storage import render_storage, storage
from admmcompress.structures.quantization import Clustering, FixedPoint

# R=3, C=4, nnz=4, levels {-0.5, 0.5, 1.0} = 0.5 * {-1, 1, 2}: a grid of 3 nonzero codes (2 bits).
A = torch.tensor([[0.5, 0.0, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.5]])


def test_value_format_of_a_small_grid():
    fmt = value_format(A)
    assert (fmt.kind, fmt.levels, fmt.code_bits, fmt.zero_bits, fmt.table_bits) == ("grid", 3, 2, 2, 64)
    assert (fmt.scale, fmt.low, fmt.high) == (0.5, -1, 2)


def test_every_scheme_on_a_hand_computed_matrix():
    layer = layer_storage("A", A, index_bits=1)
    # dense: 12 entries * 2 bits (zero needs a code) + codebook 64
    # bitmask: 12 + 4 * 2 + 64
    # relative (columns): gaps 0,1 | 0,1 -> no filler at b_r=1: E=4;
    #   4*(2+1) + 5 pointers * ceil(log2 5)=3 + 64
    # csr: 4 * (2 + ceil(log2 4)) + 4 row pointers * ceil(log2 5) + 64
    # structured: rows {0,2} x cols {0,3}: 4 values * 2 bits + R + C bitmaps + 64
    assert layer.bits == {
        "dense": 24 + 64,
        "bitmask": 20 + 64,
        "relative": 12 + 15 + 64,
        "csr": 16 + 12 + 64,
        "structured": 8 + 7 + 64,
    }
    assert (layer.entries, layer.kept_rows, layer.kept_cols, layer.best) == (4, 2, 2, "structured")
    assert layer.weight_reduction == 3.0
    assert layer.storage_reduction("dense") == pytest.approx(32 * 12 / 88)


def test_a_gap_that_needs_filler_entries():
    column = torch.zeros(20, 1)
    column[[0, 10, 19]] = 1.0  # gaps 0, 9, 8
    assert relative_gaps(column != 0).tolist() == [0, 9, 8]
    fmt = value_format(column)  # one level: a 1-entry table (32 bits) beats a grid (64 bits)
    assert (fmt.kind, fmt.code_bits, fmt.zero_bits, fmt.table_bits) == ("table", 1, 1, 32)
    # b_r=2: fillers 0 + 2 + 2 -> E=7; 7*(1+2) + 2 pointers * ceil(log2 8) + 32
    assert relative_entries(relative_gaps(column != 0), 2) == 7
    assert layer_storage("c", column, index_bits=2).bits["relative"] == 21 + 6 + 32
    # b_r=3: fillers 0 + 1 + 1 -> E=5; 5*(1+3) + 2 * ceil(log2 6) + 32
    assert layer_storage("c", column, index_bits=3).bits["relative"] == 20 + 6 + 32
    # b_r=4: no filler, so no zero code needed: 3*(1+4) + 2 * ceil(log2 4) + 32
    layer = layer_storage("c", column, index_bits="best")
    assert layer_storage("c", column, index_bits=4).bits["relative"] == 15 + 4 + 32
    assert layer.index_bits == 4 and layer.bits["relative"] == 51


def test_row_order_counts_row_gaps_and_row_pointers():
    layer = layer_storage("A", A, index_bits=1, order="row")
    # rows: [0,3] gaps 0,2 (1 filler at b_r=1), [] , [0,3] gaps 0,2 (1 filler) -> E=6
    assert relative_gaps(A != 0, "row").tolist() == [0, 2, 0, 2]
    assert layer.entries == 6
    assert layer.bits["relative"] == 6 * (2 + 1) + 4 * clog2(7) + 64


def test_binary_with_four_bit_index_costs_at_least_five_bits_per_nonzero():
    gen = torch.Generator().manual_seed(0)
    w = torch.sign(torch.randn(64, 64, generator=gen)) * (torch.rand(64, 64, generator=gen) < 0.1)
    layer = layer_storage("w", w, index_bits=4)
    assert layer.value.code_bits == 1
    assert layer.bits["relative"] - layer.value.table_bits >= 5 * layer.nnz


def test_unquantized_layers_are_float32_and_clustered_layers_pay_their_codebook():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(30, 40, generator=gen)
    assert value_format(w) == FLOAT32
    assert layer_storage("w", w).bits["dense"] == 32 * 1200
    clustered = Clustering(clusters=5).project(w)
    fmt = value_format(clustered)
    assert (fmt.kind, fmt.levels, fmt.code_bits, fmt.table_bits) == ("table", 5, 3, 5 * 32)
    assert layer_storage("w", clustered).bits["dense"] == 1200 * 3 + 160


def test_model_totals_weight_and_storage_reduction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight * (torch.rand_like(layer.weight) < 0.25)
            layer.weight.copy_(FixedPoint(bits=4).project(w))
    report = storage(model)
    nnz = sum(int((m.weight != 0).sum()) for m in (model[0], model[2]))
    assert report.params == 64 * 32 + 32 * 10 and report.nnz == nnz
    assert report.weight_reduction == pytest.approx(report.params / nnz)
    assert report.bits("best") == sum(min(layer.bits.values()) for layer in report.layers)
    assert report.storage_reduction("bitmask") == pytest.approx(32 * report.params / report.bits("bitmask"))
    assert report.paper_reduction == pytest.approx(32 * report.params / (4 * nnz))
    assert report.other_bits == 32 * (32 + 10) and report.other_params == 42
    text = render_storage(report)
    assert "Storage reduction" in text and "0.weight" in text
    assert render_storage(report.to_dict()) == text
    with pytest.raises(ValueError, match="scheme='zip'"):
        report.bits("zip")


def test_clog2_and_bad_arguments():
    assert [clog2(x) for x in (1, 2, 5, 1024, 1025)] == [0, 1, 3, 10, 11]
    import numpy as np

    from admmcompress.executors.packed import _index_bits

    assert _index_bits(np.int64(4)) == 4 and _index_bits(" 5 ") == 5
    with pytest.raises(ValueError, match="index_bits='\\+-4': give a positive integer"):
        _index_bits("+-4")
    for bad in (0, 33, 2.5, True):  # the packed file's range; 2.5 and True were read as 2 and 1 (review)
        with pytest.raises(ValueError, match=f"index_bits={bad!r} must be an integer b_r in 1..32"):
            layer_storage("A", A, index_bits=bad)
        if bad != 0 and bad != 33:
            from admmcompress.executors.packed import save_packed

            with pytest.raises(ValueError, match=f"index_bits={bad!r}: give a positive integer"):
                save_packed(nn.Linear(2, 2), io.BytesIO(), index_bits=bad)
    with pytest.raises(ValueError, match=r"no layer\(s\) \['fc9'\]"):
        storage(nn.Linear(2, 2), ["fc9"])
    assert math.isinf(
        storage(
            nn.Linear(2, 2, bias=False)
            .requires_grad_(False)
            .apply(lambda m: m.weight.data.zero_() if isinstance(m, nn.Linear) else None)
        ).storage_reduction("csr")
    )


def test_normalisation_scales_are_counted_with_the_other_parameters_by_default():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 4),
    )
    report = storage(model)
    assert [row.name for row in report.layers] == ["0.weight", "4.weight"]
    # conv bias 8 + BN weight/bias 16 + LayerNorm 16 + linear bias 4, all float32
    assert report.other_params == 44
    assert report.other_bits == 44 * 32
    named = storage(model, ["0", "1"])  # asked for by name: still reported as a layer
    assert [row.name for row in named.layers] == ["0.weight", "1.weight"]


def test_the_encoding_helpers_are_one_object_under_both_names():
    from admmcompress import encoding
    from admmcompress.report import storage as report_storage

    for name in ("SCHEMES", "LayerStorage", "ValueFormat", "layer_storage", "value_format", "weight_layers"):
        assert getattr(report_storage, name) is getattr(encoding, name), name
    report = storage(nn.Linear(4, 3))
    assert report.render() == render_storage(report)  # their docstring examples run in tests/test_docstrings.py


def test_buffers_are_counted_and_the_whole_model_figure_matches_the_packed_file(tmp_path):
    """BatchNorm statistics are in every saved model but were in no figure of the report (a review: a ResNet-20's
    packed file was 27.7% over the report's weights + other parameters)."""
    import os

    from torch import nn

    from admmcompress.executors.packed import save_packed
    from admmcompress.finalize import hard_quantize
    from admmcompress.plan import Plan, Rule
    from admmcompress.report.storage import render_storage, storage
    from admmcompress.structures import FixedPoint, Unstructured

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    model.register_buffer("scratch", torch.zeros(1000), persistent=False)  # not saved, so not counted
    hard_quantize(model, Plan([Rule(Unstructured(sparsity=0.9), type="Conv2d"),
                               Rule(FixedPoint(bits=3), type="Conv2d")]).resolve(model))
    report = storage(model)
    saved = {k: v for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
    assert report.buffer_values == sum(v.numel() for v in saved.values()) == 2 * (16 + 16 + 1)
    assert report.buffer_bits == sum(v.numel() * v.element_size() * 8 for v in saved.values())
    path = tmp_path / "model.packed"
    save_packed(model, path)
    figure = (report.bits() + report.other_bits + report.buffer_bits) / 8
    assert figure <= os.path.getsize(path) <= figure * 1.05  # the header and byte padding only
    dense = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert report.whole_model_reduction == pytest.approx(dense / figure, rel=1e-9)
    text = render_storage(report)
    assert "Buffers (BatchNorm running statistics and counters): 66 values" in text and "Whole model" in text

"""Review 48 of quantization and packed storage: levels the weight's dtype cannot hold, non-finite weights, empty
layers, and a packed stream shorter than its header fields."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
import torch.nn as nn

from admmcompress.executors.packed import PackedFormatError, load_packed, read_manifest, save_packed
from admmcompress.report.storage import storage
from admmcompress.structures.quantization import Binary, Clustering, FixedPoint, PowerOfTwo


def _on_levels(projected: torch.Tensor, weight: torch.Tensor) -> None:
    """Finite, nonzero where the weight is, zero where it is not."""
    assert projected.dtype == weight.dtype
    assert bool(torch.isfinite(projected).all()), projected
    assert torch.equal(projected != 0, weight != 0)


def test_fixed_point_float16_near_its_max_stays_finite() -> None:
    # q * c past 65504 became inf in float16 (the projection of 65472 was inf)
    weight = torch.tensor([65472.0, 32032.0, -34144.0]).half()
    for bits in (3, 6, 8):
        quantized = FixedPoint(bits=bits).quantize(weight)
        assert bool(torch.isfinite(quantized.levels).all())
        _on_levels(FixedPoint(bits=bits).project(weight), weight)


def test_power_of_two_float16_near_its_max_takes_the_largest_power_it_holds() -> None:
    weight = torch.tensor([60000.0, 30000.0, -50000.0]).half()
    projected = PowerOfTwo(bits=2).project(weight)
    _on_levels(projected, weight)
    magnitudes = projected.float().abs()
    assert torch.equal(magnitudes, 2.0 ** torch.round(torch.log2(magnitudes)))  # still powers of two
    assert float(projected[0]) == 32768.0


def test_fixed_point_float32_near_its_max_stays_finite() -> None:
    weight = torch.tensor([3.4e38, 1.0e38])
    _on_levels(FixedPoint(bits=4).project(weight), weight)


@pytest.mark.parametrize("structure", [FixedPoint(bits=2), PowerOfTwo(bits=3), Binary(), Clustering(clusters=3)])
def test_non_finite_weight_is_one_value_error(structure) -> None:
    # FixedPoint zeroed the whole layer, Clustering raised IndexError, PowerOfTwo "cannot convert float NaN"
    weight = torch.tensor([[0.5, float("nan"), 1.0, -0.25]])
    with pytest.raises(ValueError, match=r"holds 1 NaN/inf value\(s\); quantization needs finite weights"):
        structure.quantize(weight)


def test_weights_no_storable_level_reaches_are_refused() -> None:
    # float64 levels are stored as float32: 1e-50 became a level 0 (-0.0 out), 1e50 an inf level
    for scale in (1e-50, 1e50):
        weight = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64) * scale
        with pytest.raises(ValueError, match="is a finite nonzero float32 .* rescale the layer's weights"):
            FixedPoint(bits=2).project(weight)


@pytest.mark.parametrize("make", [lambda: nn.Linear(0, 3), lambda: nn.Embedding(0, 4), lambda: nn.Linear(4, 0)])
def test_empty_layer_is_counted_and_packed_as_nothing(make) -> None:
    # storage and save_packed raised "clog2: x=0" or a reshape RuntimeError on a zero-element weight
    model = make()
    report = storage(model)
    assert report.bits() == 0 and report.layers == []
    buffer = io.BytesIO()
    summary = save_packed(model, buffer)
    assert summary.weight_bits == report.bits() and summary.raw_weights == {}
    assert summary.file_bytes == len(buffer.getvalue())
    restored = load_packed(buffer.getvalue(), make())
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)


def test_codebook_past_its_stream_names_the_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.copy_(Clustering(clusters=4).project(model.weight))
    buffer = io.BytesIO()
    save_packed(model, buffer, scheme="dense")
    data = bytearray(buffer.getvalue())
    manifest, _ = read_manifest(bytes(data), nn.Linear(8, 8, bias=False))
    assert manifest["tensors"][0]["value"] == "table" and manifest["tensors"][0]["levels"] == 4
    # magic 4, CRC 4, layout 4, spec length 1, count 1, tag 1, nnz 1, then K: a table of 100 floats, CRC made good
    assert data[16] == 4
    data[16] = 100
    data[4:8] = struct.pack("<I", zlib.crc32(bytes(data[8:])))
    with pytest.raises(PackedFormatError, match=r"tensor 'weight' is truncated: its fields need 3,200 bits") as err:
        load_packed(bytes(data), nn.Linear(8, 8, bias=False))
    assert "please report" not in str(err.value)

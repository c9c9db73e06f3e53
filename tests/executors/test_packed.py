"""Packed export: bit-exact round trip under every scheme, sizes equal to the storage report's bits."""

import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from admmcompress.cli import main
from admmcompress.encoding import SCHEMES, layer_storage
from admmcompress.executors import packed as packed_module
from admmcompress.executors.packed import (
    BitReader,
    BitWriter,
    load_packed,
    manifest_entry,
    packed_size_lines,
    read_manifest,
    save_packed,
)
from admmcompress.models import create_model
from admmcompress.report.integrity import record_output_checksums
from admmcompress.report.storage import storage
from admmcompress.structures.quantization import Binary, Clustering, FixedPoint, PowerOfTwo, Ternary
from admmcompress.train import checkpoint as ckpt

QUANTIZERS = [FixedPoint(bits=3), Binary(), Ternary(), Clustering(clusters=5), PowerOfTwo(bits=3), None]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 7))


def compressed_model(keep: float, quantizer, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model()
    with torch.no_grad():
        for layer in (model[0], model[3]):
            w = layer.weight * (torch.rand_like(layer.weight) < keep)
            layer.weight.copy_(quantizer.project(w) if quantizer is not None else w)
        model[1].running_mean.uniform_(-1, 1)
    return model.eval()


def test_bit_writer_and_reader_round_trip():
    out = BitWriter()
    out.write([5, 0, 7], 3)
    out.write([1], 1)
    out.write([2**40 + 3], 41)
    assert out.bits == 3 * 3 + 1 + 41 and len(out.getvalue()) == (51 + 7) // 8
    src = BitReader(out.getvalue())
    assert src.read(3, 3).tolist() == [5, 0, 7] and src.read(1, 1).tolist() == [1]
    assert src.read(1, 41).tolist() == [2**40 + 3]
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        BitWriter().write([4], 2)


def _reference_bits(fields: list[tuple[list[int], int]]) -> bytes:
    """The format, written the plain way: each value's bits MSB first, concatenated, zero-padded to a byte."""
    text = "".join(format(v, f"0{w}b") for values, w in fields for v in values)
    text += "0" * (-len(text) % 8)
    return bytes(int(text[i : i + 8], 2) for i in range(0, len(text), 8))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.integers(1, 63).flatmap(lambda w: st.tuples(st.lists(st.integers(0, 2**w - 1), max_size=40), st.just(w))),
        max_size=6,
    ),
    st.sampled_from([8, 13, 64, 1 << 20]),
)
def test_bit_streams_match_the_plain_format_across_step_boundaries(fields, step_bits):
    """Written and read in steps of a few bits (a value or a byte split between steps) or of a MiB: the same
    bytes as the format's plain definition, and the same values back."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed_module, "_STEP_BITS", step_bits)
        out = BitWriter()
        for values, width in fields:
            out.write(values, width)
        data = out.getvalue()
        assert data == _reference_bits(fields)
        src = BitReader(data)
        for values, width in fields:
            assert src.read(len(values), width).tolist() == values


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=repr)
@pytest.mark.parametrize("keep", [0.03, 0.3, 1.0])
def test_round_trip_is_bit_exact_under_every_scheme(quantizer, keep):
    model = compressed_model(keep, quantizer)
    x = torch.randn(4, 3, 6, 6)
    for scheme in ("best", *SCHEMES):
        buffer = io.BytesIO()
        summary = save_packed(model, buffer, scheme=scheme)
        restored = load_packed(io.BytesIO(buffer.getvalue()), make_model()).eval()
        for name, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[name], value), (scheme, name)
        assert torch.equal(restored(x), model(x))
        # Each weight's payload is exactly the storage report's bits, rounded up to whole bytes.
        report = storage(model)
        manifest, _ = read_manifest(io.BytesIO(buffer.getvalue()), make_model())
        assert manifest["header_bytes"] == summary.header_bytes
        entries = [manifest_entry(e) for e in manifest["tensors"]]
        packed = {e["name"]: e for e in entries if e["kind"] == "packed"}
        for layer in report.layers:
            chosen = layer.best if scheme == "best" else scheme
            assert packed[layer.name]["bytes"] == (layer.bits[chosen] + 7) // 8
        assert summary.weight_bits == report.bits(scheme)


def test_file_size_matches_the_storage_report_within_one_percent():
    # The only bytes the report does not count are the manifest's (~300 B for three layers) and
    # the last partial byte of each tensor, so the match holds once the payload is tens of KB.
    torch.manual_seed(0)
    model = create_model("lenet300100")
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            w = layer.weight * (torch.rand_like(layer.weight) < 0.25)
            layer.weight.copy_(FixedPoint(bits=4).project(w))
    buffer = io.BytesIO()
    save_packed(model, buffer, model_spec={"name": "lenet300100"})
    report = storage(model)
    expected = report.bits("best") / 8 + report.other_bits / 8
    assert abs(len(buffer.getvalue()) / expected - 1) < 0.01
    restored = load_packed(io.BytesIO(buffer.getvalue()))  # architecture rebuilt from the manifest
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())


def pruned_quantized_lenet5(seed: int = 0) -> nn.Module:
    """A LeNet-5 (431K weights) pruned and quantized by projection alone, about 150x storage reduction."""
    torch.manual_seed(seed)
    model = create_model("lenet5")
    plan = {"conv1": (0.5, FixedPoint(bits=4)), "conv2": (0.1, FixedPoint(bits=3)),
            "fc1": (0.015, Ternary()), "fc2": (0.1, FixedPoint(bits=3))}
    with torch.no_grad():
        for name, (keep, quantizer) in plan.items():
            layer = getattr(model, name)
            w = layer.weight * (torch.rand_like(layer.weight) < keep)
            layer.weight.copy_(quantizer.project(w))
    return model.eval()


def test_small_lenet5_file_matches_the_storage_report_within_one_percent():
    # ~10 KB of payload: the container header must stay far below 1% of it.
    model = pruned_quantized_lenet5()
    report = storage(model)
    assert 100 < report.storage_reduction("best") < 200
    buffer = io.BytesIO()
    summary = save_packed(model, buffer, model_spec={"name": "lenet5"})
    data = buffer.getvalue()
    expected_bytes = (report.bits("best") + report.other_bits) / 8
    assert len(data) < 16_000 and summary.file_bytes == len(data)
    assert abs(len(data) / expected_bytes - 1) < 0.01, (len(data), expected_bytes, summary)
    assert summary.header_bytes < 80  # magic, checksum, spec, 8 tensors' fields
    assert summary.weight_bits == report.bits("best") and 0 <= summary.padding_bits < 8 * 4
    assert summary.other_bytes * 8 == report.other_bits  # LeNet-5 has no buffers
    restored = load_packed(io.BytesIO(data))
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())
    # The export command's summary names every byte between the report's figure and the file.
    storage_line, overhead, file_line = packed_size_lines(len(data), summary, report)
    assert f"header {summary.header_bytes} B" in overhead and "buffers" not in overhead
    assert f"file / report = {len(data) / expected_bytes:.4f}" in file_line
    assert f"{report.bits('best'):,} bits" in storage_line


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("quantizer", [FixedPoint(bits=3), Clustering(clusters=5), None], ids=repr)
def test_a_half_or_double_model_is_coded_as_the_report_counts_and_comes_back_at_its_dtype(dtype, quantizer):
    """Before: only float32 weights were coded; a float16 model's weights went raw, 35x the report's figure."""
    model = compressed_model(0.3, quantizer).to(dtype)  # float32 values, so every layer is float32-exact
    report, buffer = storage(model), io.BytesIO()
    summary = save_packed(model, buffer)
    assert set(summary.schemes) == {"0.weight", "3.weight"} and summary.raw_weights == {}
    assert summary.weight_bits == report.bits("best")
    assert summary.other_bytes * 8 == report.other_bits + 8 * sum(  # BN statistics: buffers, at their dtype
        b.numel() * b.element_size() for n, b in model.named_buffers())
    restored = load_packed(io.BytesIO(buffer.getvalue()), make_model().to(dtype)).eval()
    for name, value in model.state_dict().items():
        assert restored.state_dict()[name].dtype == value.dtype and torch.equal(restored.state_dict()[name], value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dense_half_model_is_stored_at_16_bits_and_measured_against_16(dtype):
    """Before: its values went out as float32 bits (158,567 B for 131,072 B of weights), reported as 1.65x."""
    torch.manual_seed(0)
    model = nn.Linear(256, 256, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(256, 256).to(dtype))  # more distinct values than a codebook holds well
    report, buffer = storage(model), io.BytesIO()
    summary = save_packed(model, buffer)
    assert report.dense_bits == 16 * 256 * 256 and summary.weight_bits == report.bits("best")
    assert len(buffer.getvalue()) <= 256 * 256 * 2 + summary.header_bytes + 1
    # float16 draws take about 30k distinct values (raw 16 bits is cheapest); bfloat16's 2.5k take a 12-bit table
    kind, reduction = report.layers[0].value.kind, report.storage_reduction()
    assert (kind, round(reduction, 2)) == ({torch.float16: "float16", torch.bfloat16: "table"}[dtype],
                                           {torch.float16: 1.0, torch.bfloat16: 1.21}[dtype])
    restored = load_packed(io.BytesIO(buffer.getvalue()), nn.Linear(256, 256, bias=False).to(dtype))
    assert restored.weight.dtype == dtype and torch.equal(restored.weight, model.weight)


def test_double_weights_float32_cannot_hold_are_stored_raw_and_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, dtype=torch.float64), nn.Linear(8, 4))  # float64 draws; a float32 layer
    buffer = io.BytesIO()
    summary = save_packed(model, buffer)
    assert summary.raw_weights == {"0.weight": 16 * 8 * 8} and list(summary.schemes) == ["1.weight"]
    first, *_ = packed_size_lines(len(buffer.getvalue()), summary, storage(model))
    assert first.startswith("stored raw, not coded: 0.weight (1,024 B: float64 values that float32 cannot hold")
    restored = load_packed(io.BytesIO(buffer.getvalue()), nn.Sequential(nn.Linear(16, 8, dtype=torch.float64),
                                                                       nn.Linear(8, 4)))
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_codebook_is_chosen_with_its_zero_code_counted():
    """Seven of the integers -4..4: a grid codes nonzeros in 3 bits but zero needs a 4th; a table of 7 values
    codes both in 3 bits, which is cheaper once zeros are stored (dense)."""
    torch.manual_seed(0)
    w = torch.tensor([-4, -3, -1, 1, 2, 3, 4])[torch.randint(0, 7, (64, 64))] * 0.25
    w[torch.rand(64, 64) < 0.25] = 0
    layer = layer_storage("w", w)
    assert (layer.value.kind, layer.value.code_bits, layer.value.zero_bits, layer.best) == ("table", 3, 3, "dense")
    assert layer.bits["dense"] == 64 * 64 * 3 + 7 * 32  # the grid's best was 13,424 bits (bitmask)
    model = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    summary = save_packed(model, buffer := io.BytesIO())
    assert summary.weight_bits == layer.bits["dense"]
    assert torch.equal(load_packed(io.BytesIO(buffer.getvalue()), nn.Linear(64, 64, bias=False)).weight, w)


def test_a_different_architecture_is_refused():
    data = io.BytesIO()
    save_packed(pruned_quantized_lenet5(), data, model_spec={"name": "lenet5"})
    with pytest.raises(ValueError, match="state dict differs"):
        load_packed(io.BytesIO(data.getvalue()), create_model("lenet5", num_classes=7))
    with pytest.raises(ValueError, match="truncated"):
        read_manifest(data.getvalue()[:20])


def test_format_1_files_are_still_read():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    weight, bias = model.weight.detach(), model.bias.detach()
    entries = [
        ["weight", [2, 3], 24, "dense", 6, 6, 1, "column", "float32", 0],
        ["bias", [2], 8, "float32"],
    ]
    manifest = json.dumps({"model": None, "tensors": entries}).encode()
    # Format 1: magic, uint32 manifest length, JSON manifest; a float32 dense weight is its IEEE bits, MSB first.
    data = b"ADMMPK1\n" + len(manifest).to_bytes(4, "little") + manifest
    data += weight.numpy().astype(">f4").tobytes() + bias.numpy().tobytes()
    restored = load_packed(io.BytesIO(data), nn.Linear(3, 2))
    assert torch.equal(restored.weight, weight) and torch.equal(restored.bias, bias)
    assert read_manifest(data)[0]["header_bytes"] == 12 + len(manifest)


def test_cli_export_packed_writes_and_verifies(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("lenet300100")
    with torch.no_grad():
        model.fc1.weight.copy_(Ternary().project(model.fc1.weight))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "model: {name: lenet300100}\ndata: {dataset: mnist}\npretrained: dense.safetensors\nstages: []\n"
    )
    ckpt.save_tensors(run / "model.safetensors", model.state_dict())
    ckpt.save_tensors(run / "masks.safetensors", {})  # a run without pruning stages writes no masks, but the file
    (run / "metrics.json").write_text('{"metrics": {}, "history": []}')  # a finished run's: export verifies it
    record_output_checksums(run)
    out = tmp_path / "model.admmpk"
    assert main(["export", "--packed", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "outputs identical (eval mode)" in printed and "file / report" in printed
    assert "storage report (SPEC 4.2)" in printed and "container overhead: header" in printed
    manifest, _ = read_manifest(out)
    assert manifest["model"] == {"name": "lenet300100"}
    assert json.loads(json.dumps(manifest)) == manifest
    assert main(["export", "--packed", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_not_a_packed_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ValueError, match="not an admmcompress packed file"):
        load_packed(bad, make_model())


@pytest.mark.parametrize("rule", [{"structure": "fixed_point", "bits": 3}, {"structure": "clustering", "clusters": 8},
                                  {"structure": "power_of_two", "bits": 3}])
def test_a_float64_model_s_levels_are_stored_as_codes(rule):
    """Levels of a float64 model (q * 3) that float32 cannot hold made the file store the layer raw at 64 bits
    while the report counted codes (a review's finding); the levels are float32 values now, through retraining's
    centroid updates too."""
    import io

    from torch import nn

    from admmcompress.executors.packed import save_packed
    from admmcompress.finalize import hard_quantize
    from admmcompress.plan import Plan
    from admmcompress.report.storage import storage

    torch.manual_seed(0)
    model = nn.Linear(64, 32, bias=False).double()
    masks = hard_quantize(model, Plan.from_dict([{"match": "", **rule}]).resolve(model))
    assert masks.held["weight"].update == ("centroids" if rule["structure"] == "clustering" else "hold")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(model, opt)
    model(torch.randn(4, 64, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    w = model.weight.detach()
    assert torch.equal(w.float().double(), w)
    buffer = io.BytesIO()
    summary = save_packed(model, buffer)
    assert not summary.raw_weights
    assert len(buffer.getvalue()) <= storage(model).bits() / 8 + 64


def test_a_folder_or_a_missing_path_is_one_line(tmp_path):
    from admmcompress.executors.packed import PackedFormatError, load_packed

    for path, what in [(tmp_path, "a folder"), (tmp_path / "gone.admmpk", "missing")]:
        with pytest.raises(PackedFormatError, match=f"is {what}, not a packed file"):
            load_packed(path)


def test_non_finite_weights_are_saved_with_a_warning():
    from torch import nn

    from admmcompress.executors.packed import load_packed, save_packed

    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    buffer = io.BytesIO()
    with pytest.warns(RuntimeWarning, match="save_packed: weight hold NaN or infinite values"):
        save_packed(model, buffer)
    buffer.seek(0)
    assert torch.isnan(load_packed(buffer, nn.Linear(4, 2)).weight[0, 0])

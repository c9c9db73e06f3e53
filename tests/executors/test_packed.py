"""Packed export: bit-exact round trip under every scheme, sizes equal to the storage report's bits."""

import io
import json

import pytest
import torch
from torch import nn

from admmcompress.cli import main
from admmcompress.executors.packed import (
    BitReader,
    BitWriter,
    load_packed,
    manifest_entry,
    read_manifest,
    save_packed,
)
from admmcompress.models import create_model
from admmcompress.report.storage import SCHEMES, storage
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
        manifest, _ = read_manifest(io.BytesIO(buffer.getvalue()))
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
    out = tmp_path / "model.admmpk"
    assert main(["export", "--packed", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "outputs identical: True" in printed and "file / report" in printed
    manifest, _ = read_manifest(out)
    assert manifest["model"] == {"name": "lenet300100"}
    assert json.loads(json.dumps(manifest)) == manifest
    assert main(["export", "--packed", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_not_a_packed_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ValueError, match="not an admmcompress packed file"):
        load_packed(bad, make_model())

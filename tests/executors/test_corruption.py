"""Corruption: bit flips in every file admmcompress writes are refused with one clear error, never loaded silently.

Files: a packed file (format 3), a compacted model (``manifest.json`` + ``model.safetensors``) and a finished
run's ``model.safetensors``, ``masks.safetensors`` and ``metrics.json``. For each, every header byte is flipped
(packed file: each of its 8 bits; the JSON files, which are all header, and the safetensors headers: one seeded
bit per byte) and 500 seeded payload offsets get one seeded bit flipped. Every flip must be

- refused with the format's own error (``PackedFormatError``, ``ManifestError``, ``RunIntegrityError``: all
  ``ValueError``s, so the command line prints one ``admmcompress: error:`` line), or
- for bytes that cannot change meaning, load identically. Only JSON files have such bytes (e.g. ``1e-05`` and
  ``1E-05`` are one bit apart and the same number); they are counted, and the loaded content must then be equal
  to the original's. Binary files (packed, safetensors) have none: every flip there is refused.

A second part crafts files whose checksums were recomputed after the flip (a hostile file, not an accident):
the loaders' field checks must still refuse them with the same error, or load them, never raise anything else
(no KeyError/IndexError/RuntimeError/struct.error), and never build a model of the file's chosen size.
"""

from __future__ import annotations

import io
import json
import random
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from admmcompress.executors import get_executor
from admmcompress.executors.manifest import ManifestError, canonical_sha256, load_compacted
from admmcompress.executors.packed import (
    MAX_MODEL_ELEMENTS,
    PackedFormatError,
    PackedFormatWarning,
    load_packed,
    read_manifest,
    save_packed_bytes,
)
from admmcompress.finalize import MaskSet
from admmcompress.models import create_model
from admmcompress.report.integrity import RunIntegrityError, read_metrics, record_output_checksums, verify_run
from admmcompress.structures.quantization import FixedPoint, Ternary
from admmcompress.train import checkpoint as ckpt

SEED = 20
PAYLOAD_FLIPS = 500


def flipped(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def payload_flips(start: int, end: int, seed: int = SEED) -> list[tuple[int, int]]:
    """``PAYLOAD_FLIPS`` seeded (offset, bit) pairs in ``[start, end)``."""
    rng = random.Random(seed)
    return [(rng.randrange(start, end), rng.randrange(8)) for _ in range(PAYLOAD_FLIPS)]


def header_flips(end: int, every_bit: bool, seed: int = SEED) -> list[tuple[int, int]]:
    """Every byte of ``[0, end)``: all 8 bits, or one seeded bit per byte."""
    rng = random.Random(seed)
    if every_bit:
        return [(offset, bit) for offset in range(end) for bit in range(8)]
    return [(offset, rng.randrange(8)) for offset in range(end)]


def safetensors_header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


# --- packed files ---------------------------------------------------------------------------


def packed_lenet5() -> tuple[nn.Module, bytes]:
    """A pruned, quantized LeNet-5 packed with its model spec (~10 KB: header, grid and table weights, raw biases)."""
    torch.manual_seed(SEED)
    model = create_model("lenet5").eval()
    with torch.no_grad():
        for name, keep, quantizer in (("conv1", 0.5, FixedPoint(bits=4)), ("conv2", 0.1, FixedPoint(bits=3)),
                                      ("fc1", 0.015, Ternary()), ("fc2", 0.1, None)):
            layer = getattr(model, name)
            w = layer.weight * (torch.rand_like(layer.weight) < keep)
            layer.weight.copy_(quantizer.project(w) if quantizer else w)
    return model, save_packed_bytes(model, model_spec={"name": "lenet5"})


def test_every_bit_flip_of_a_packed_file_is_refused():
    model, data = packed_lenet5()
    header = read_manifest(data)[0]["header_bytes"]
    assert load_packed(data).state_dict().keys() == model.state_dict().keys()
    flips = header_flips(header, every_bit=True) + payload_flips(header, len(data))
    for offset, bit in flips:
        with pytest.raises(PackedFormatError, match=r"^packed file <bytes> ") as info:
            load_packed(flipped(data, offset, bit))
        assert "\n" not in str(info.value), (offset, bit)
    # Truncated anywhere: refused too (the checksum covers the length).
    for end in range(0, len(data), 97):
        with pytest.raises(PackedFormatError):
            load_packed(data[:end])


CRAFTED_MODELS = [
    (0.3, FixedPoint(bits=3), "best"), (0.05, Ternary(), "relative"), (0.3, None, "csr"),
    (0.3, FixedPoint(bits=2), "bitmask"), (1.0, None, "dense"), (0.3, FixedPoint(bits=3), "structured"),
]


def small_model(keep: float, quantizer, seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 7))
    with torch.no_grad():
        for layer in (model[0], model[3]):
            w = layer.weight * (torch.rand_like(layer.weight) < keep)
            layer.weight.copy_(quantizer.project(w) if quantizer is not None else w)
    return model.eval()


def with_checksum(data: bytes) -> bytes:
    """``data`` with its file checksum recomputed: what a hostile file looks like."""
    return data[:4] + struct.pack("<I", zlib.crc32(data[8:])) + data[8:]


@pytest.mark.parametrize("keep, quantizer, scheme", CRAFTED_MODELS, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_crafted_packed_files_are_refused_or_loaded_never_a_traceback(keep, quantizer, scheme):
    model = small_model(keep, quantizer)
    data = save_packed_bytes(model, scheme=scheme)
    skeleton = small_model(keep, quantizer)
    header = read_manifest(data, skeleton)[0]["header_bytes"]
    flips = header_flips(header, every_bit=True) + payload_flips(header, len(data), seed=SEED + 1)[:100]
    refused = 0
    for offset, bit in flips:
        crafted = flipped(data, offset, bit)
        crafted = with_checksum(crafted) if offset >= 8 else crafted
        try:
            load_packed(crafted, small_model(keep, quantizer))
        except PackedFormatError as err:
            refused += 1
            assert "\n" not in str(err)
    assert refused > len(flips) // 4  # most crafted headers contradict the model or the payload


def test_a_crafted_spec_cannot_make_the_loader_build_a_huge_model():
    # A valid file for a small LeNet-300-100, its spec then edited to a model of 2^30 elements, checksum fixed.
    model = create_model("lenet300100")
    data = save_packed_bytes(model, model_spec={"name": "lenet300100"})
    old_spec = b'{"name":"lenet300100"}'
    huge = b'{"name":"lstm_ptb","vocab_size":1000000,"embed":1000}'  # 10^9 embedding weights
    start = data.index(old_spec)
    crafted = data[: start - 1] + bytes([len(huge)]) + huge + data[start + len(old_spec) :]
    with pytest.raises(PackedFormatError, match=r"names a model of [\d,]+ elements, more than the 268,435,456"):
        load_packed(with_checksum(crafted))
    assert MAX_MODEL_ELEMENTS == 2**28
    # A spec that is not JSON, or names no model: one line too.
    for bad in (b"\xff\xfe", b"[1, 2]", b'{"nam":"lenet5"}'):
        crafted = data[: start - 1] + bytes([len(bad)]) + bad + data[start + len(old_spec) :]
        with pytest.raises(PackedFormatError, match="model spec"):
            load_packed(with_checksum(crafted))


def test_crafted_packed_layouts_are_refused_before_anything_is_allocated():
    # A spec of 100,000 GRU layers: few elements, but minutes to build even on the meta device.
    model = create_model("lenet300100")
    data = save_packed_bytes(model, model_spec={"name": "lenet300100"})
    old_spec = b'{"name":"lenet300100"}'
    deep = b'{"name":"gru_fsdd","num_layers":100000,"hidden":1}'
    start = data.index(old_spec)
    crafted = data[: start - 1] + bytes([len(deep)]) + deep + data[start + len(old_spec) :]
    with pytest.raises(PackedFormatError, match="a layer count"):
        load_packed(with_checksum(crafted))
    # Format 1 naming no model: its shapes were checked against nothing, so nothing is decoded.
    manifest = json.dumps({"tensors": [{"name": "w", "shape": [8192, 8192], "bytes": 0, "kind": "packed",
                                        "scheme": "structured", "nnz": 0, "entries": 0, "index_bits": 0,
                                        "order": "row", "value": "float32", "levels": 0}]}).encode()
    with pytest.raises(PackedFormatError, match="names no model"), warnings.catch_warnings():
        warnings.simplefilter("ignore", PackedFormatWarning)
        load_packed(b"ADMMPK1\n" + struct.pack("<I", len(manifest)) + manifest)
    named = json.dumps({"tensors": [], "model": "lenet5"}).encode()  # a spec that is a bare name
    with pytest.raises(PackedFormatError, match="model spec 'lenet5' is not a mapping"):
        load_packed(b"ADMMPK1\n" + struct.pack("<I", len(named)) + named)
    with pytest.raises(PackedFormatError, match="is not an admmcompress packed file"):
        load_packed(b"APK\x01" + bytes(8))  # format 1 has a magic of its own
    # A relative index wider than the writer's 32 bits (a skip of 2^64 - 1 would wrap to a negative index).
    from admmcompress.executors.packed import MAGIC, BitWriter, _varint, layout_checksum

    skeleton = nn.Linear(4, 2, bias=False)
    bits = BitWriter()
    bits.write(torch.tensor([7.0]).numpy().view("uint32").astype("uint64"), 32)
    bits.write([2**64 - 1], 64)
    bits.write([0, 0, 1, 1, 1], 1)
    blob = bits.getvalue()
    header = struct.pack("<I", layout_checksum(skeleton.state_dict())) + _varint(0) + _varint(1)
    header += bytes([2]) + _varint(1) + _varint(64) + _varint(0) + _varint(len(blob))
    body = header + blob
    with pytest.raises(PackedFormatError, match="64 index bits"):
        load_packed(MAGIC + struct.pack("<I", zlib.crc32(body)) + body, skeleton)


def test_byte_flips_of_a_training_checkpoint_are_one_checkpoint_error(tmp_path):
    path = tmp_path / "state.pt"
    ckpt.save_state(path, {"model": {"w": torch.randn(3, 4)}, "epoch": 3, "rng": torch.get_rng_state()})
    good = path.read_bytes()
    rng = random.Random(SEED)
    # every byte of the pickle (the first zip member) and the zip directory, a sample of the tensor bytes between
    offsets = [*range(512), *rng.sample(range(512, len(good) - 1024), 200), *range(len(good) - 1024, len(good))]
    for offset in offsets:
        path.write_bytes(flipped(good, offset, rng.randrange(8)))
        try:
            ckpt.load_state(path)
        except ckpt.CheckpointError as err:
            assert "\n" not in str(err)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_state(path)


def test_format_2_files_still_load_with_a_note():
    model, data = packed_lenet5()
    v2 = b"APK\x02" + data[8:]  # format 2: the same bytes without the file checksum
    with pytest.warns(PackedFormatWarning, match="carries no checksum"):
        restored = load_packed(v2)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.warns(PackedFormatWarning):
        assert read_manifest(v2)[0]["checksum"] is None
    assert read_manifest(data)[0]["checksum"] == f"{struct.unpack('<I', data[4:8])[0]:08x}"
    with pytest.raises(PackedFormatError, match="is format 9; this admmcompress reads formats 1 to 4"):
        load_packed(b"APK\x09" + data[4:])
    with pytest.raises(PackedFormatError, match=r"packed file '.*x.apk' is corrupt or truncated"):
        buffer = io.BytesIO(flipped(data, 100, 0))
        buffer.name = "x.apk"
        load_packed(buffer)


# --- compacted models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compacted_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A compacted LeNet-300-100 (250 of fc1's 300 neurons removed), saved with its registry spec."""
    torch.manual_seed(SEED)
    model = create_model("lenet300100").eval()
    with torch.no_grad():
        model.fc1.weight[:250] = 0
        model.fc1.bias[:250] = 0
    small = get_executor("compact").convert(model, example=torch.randn(2, 1, 28, 28))
    folder = tmp_path_factory.mktemp("compacted")
    get_executor("compact").save(small, folder, model_spec={"name": "lenet300100", "kwargs": {}})
    return folder, {k: v.clone() for k, v in load_compacted(folder).state_dict().items()}


def load_outcome(folder: Path, reference: dict[str, torch.Tensor]) -> str:
    """'refused' or 'same'; anything else (another exception, other weights) fails the test."""
    try:
        state = load_compacted(folder).state_dict()
    except ManifestError as err:
        assert "\n" not in str(err)
        return "refused"
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    return "same"


def test_every_bit_flip_of_a_compacted_model_is_refused(compacted_folder):
    folder, reference = compacted_folder
    manifest, weights = (folder / "manifest.json").read_bytes(), (folder / "model.safetensors").read_bytes()
    outcomes = {"refused": 0, "same": 0}
    try:
        # manifest.json is all header: every byte, one seeded bit. A flip that keeps the JSON's meaning
        # (1e-05 -> 1E-05) may load, but only identically; its own SHA-256 refuses every other one.
        for offset, bit in header_flips(len(manifest), every_bit=False):
            (folder / "manifest.json").write_bytes(flipped(manifest, offset, bit))
            outcomes[load_outcome(folder, reference)] += 1
        (folder / "manifest.json").write_bytes(manifest)
        end = safetensors_header_end(weights)
        for offset, bit in header_flips(end, every_bit=False) + payload_flips(end, len(weights)):
            (folder / "model.safetensors").write_bytes(flipped(weights, offset, bit))
            assert load_outcome(folder, reference) == "refused", (offset, bit)  # binary: never "same"
    finally:
        (folder / "manifest.json").write_bytes(manifest)
        (folder / "model.safetensors").write_bytes(weights)
    assert outcomes["refused"] > 0.99 * len(manifest)
    assert load_outcome(folder, reference) == "same"


def test_crafted_manifests_are_refused_with_one_line(compacted_folder, tmp_path):
    folder, reference = compacted_folder
    for name in ("manifest.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    original = json.loads((folder / "manifest.json").read_text())

    def write(manifest: dict) -> None:
        manifest = {k: v for k, v in manifest.items() if k != "sha256"}
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "sha256": canonical_sha256(manifest)}))

    cases = {
        "cannot be built from": {
            **original, "layers": {**original["layers"], "fc1": {"type": "Linear", "in_features": "x"}}
        },
        "of type 'Module'": {**original, "layers": {"fc1": {"type": "Module"}}},
        "does not fit the layers": {
            **original, "layers": {**original["layers"], "fc1": {**original["layers"]["fc1"], "out_features": 51}}
        },
        "'layers' must map": {**original, "layers": [1, 2]},
        "'model' must be null": {**original, "model": "lenet300100"},
        "elements": {**original, "model": {"name": "lstm_ptb", "kwargs": {"vocab_size": 10**6, "embed": 1000}}},
        # built from the file at once on the CPU, not checked on the meta device first
        "which a manifest does not set": {
            **original, "layers": {**original["layers"], "fc1": {**original["layers"]["fc1"], "device": "cpu"}}
        },
        # minutes to build even on the meta device, though its elements stay few
        "a layer count": {**original, "model": {"name": "gru_fsdd", "kwargs": {"num_layers": 100000}}},
    }
    for expected, manifest in cases.items():
        write(manifest)
        with pytest.raises(ManifestError, match=expected) as info:
            load_compacted(tmp_path)
        assert "\n" not in str(info.value)
    # Nested deeper than Python's stack: one line, not a RecursionError.
    (tmp_path / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ManifestError, match="is not valid JSON"):
        load_compacted(tmp_path)
    # Written before checksums: loads, with a note that it cannot be verified.
    legacy = {k: v for k, v in original.items() if k not in ("sha256", "weights")}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    with pytest.warns(UserWarning, match="before compacted models carried checksums"):
        assert load_outcome(tmp_path, reference) == "same"


# --- a run's outputs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as `admmcompress run` leaves it (weights, masks, metrics.json), checksums recorded."""
    torch.manual_seed(SEED)
    model = create_model("lenet300100")
    masks = MaskSet({"fc1.weight": torch.rand(300, 784) < 0.1, "fc2.weight": torch.rand(100, 300) < 0.5})
    masks.apply(model)
    out = tmp_path_factory.mktemp("run")
    ckpt.save_tensors(out / "model.safetensors", model.state_dict(), {"config": {"model": {"name": "lenet300100"}}})
    ckpt.save_tensors(out / "masks.safetensors", masks.state_dict())
    metrics = {
        "accuracy_before": 98.12, "accuracy_after": 97.5, "wall_seconds": 12.25, "eps": 1e-05,
        "stats": {"overall_compression": 7.8125, "layers": [{"name": "fc1", "kept": 23520, "sparsity": 0.9}]},
    }
    history = [{"phase": "admm", "epoch": i, "accuracy": 90.0 + i, "loss": 0.5 / (i + 1)} for i in range(3)]
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": history}, indent=2))
    record_output_checksums(out)
    assert verify_run(out) == []
    return out


def run_outcome(out: Path, reference: str) -> str:
    try:
        verify_run(out)
    except RunIntegrityError as err:
        assert "\n" not in str(err)
        return "refused"
    # Loaded: only when the content is the same (a JSON byte that cannot change meaning).
    assert json.dumps(read_metrics(out), sort_keys=True) == reference
    return "same"


@pytest.mark.parametrize("name", ["model.safetensors", "masks.safetensors"])
def test_every_bit_flip_of_a_runs_weights_and_masks_is_refused(run_folder, name):
    path = run_folder / name
    original = path.read_bytes()
    reference = json.dumps(read_metrics(run_folder), sort_keys=True)
    end = safetensors_header_end(original)
    try:
        for offset, bit in header_flips(end, every_bit=False) + payload_flips(end, len(original)):
            path.write_bytes(flipped(original, offset, bit))
            with pytest.raises(RunIntegrityError, match=f"'{path}' does not match the SHA-256|'{path}' is not"):
                verify_run(run_folder)
    finally:
        path.write_bytes(original)
    assert run_outcome(run_folder, reference) == "same"


def test_every_bit_flip_of_a_runs_metrics_is_refused_or_meaningless(run_folder):
    path = run_folder / "metrics.json"
    original = path.read_bytes()
    reference = json.dumps(read_metrics(run_folder), sort_keys=True)
    outcomes = {"refused": 0, "same": 0}
    try:
        # metrics.json is all header: every byte, one seeded bit (its content checksum covers values, not layout).
        for offset, bit in header_flips(len(original), every_bit=False):
            path.write_bytes(flipped(original, offset, bit))
            outcomes[run_outcome(run_folder, reference)] += 1
    finally:
        path.write_bytes(original)
    assert outcomes["refused"] > 0.99 * len(original), outcomes


def test_a_revived_pruned_weight_is_refused_even_with_fresh_checksums(run_folder, tmp_path):
    for name in ("model.safetensors", "masks.safetensors", "metrics.json"):
        (tmp_path / name).write_bytes((run_folder / name).read_bytes())
    weights = ckpt.load_tensors(tmp_path / "model.safetensors")
    masks = ckpt.load_tensors(tmp_path / "masks.safetensors")
    weights["fc1.weight"][~masks["fc1.weight"]] = 0.0
    row, col = (~masks["fc1.weight"]).nonzero()[0].tolist()
    weights["fc1.weight"][row, col] = 1e-3
    ckpt.save_tensors(tmp_path / "model.safetensors", weights)
    record_output_checksums(tmp_path)  # as if the change had been recorded: the masks still refuse it
    with pytest.raises(RunIntegrityError, match="1 weights of 'fc1.weight' that masks.safetensors prunes are not zero"):
        verify_run(tmp_path)


def test_packed_notes_are_silent_for_current_files():
    _, data = packed_lenet5()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_packed(data)

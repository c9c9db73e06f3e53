"""A real compressed file: bit-packed codes and indices, exactly the bits ``report.storage`` counts.

Every weight matrix is written in the scheme the storage report chose for it (each layer's
cheapest by default, or one scheme for all), field by field with the widths of SPEC 4.2, so its
payload is ``ceil(bits / 8)`` bytes for the report's ``bits``. Everything else in the state dict
(biases, BN statistics) is stored raw. Loading rebuilds the model and its weights bit-exactly.

File layout, format 2 (no pickle; a few bytes of header so that small models, e.g. a LeNet-5 at
~10 KB, match the storage report within 1%)::

    b"APK\\x02"                       4 bytes, magic and format version
    uint32 little endian              CRC-32 of the state dict's layout (names, dtypes, shapes)
    varint n, n bytes                 model spec as compact JSON (n = 0: none)
    varint                            number of tensors (the state dict's, in its order)
    per tensor                        0xFF for a raw tensor (its bytes follow from the model's
                                      dtype and shape), else a packed weight: tag byte (scheme
                                      index in bits 0-2, row order in bit 3, value kind in bits
                                      4-5: float32/grid/table), varint nnz, for ``relative`` varint
                                      b_r and varint fillers (E - nnz), for grid/table varint
                                      K, varint payload bytes
    payload                           the tensors' bytes, in state-dict order (raw little endian)

Names and shapes are not stored: they come from the model the file is loaded into (an instance
passed to ``load_packed``, or the one the model spec builds), and the layout checksum refuses a
model whose state dict differs. Varints are unsigned LEB128. Files of format 1 (magic
``b"ADMMPK1\\n"``, a JSON manifest with names) are still read.

A weight's bit stream (most significant bit first, ``numpy.packbits`` order) is its codebook
(``table``: ``K`` float32; ``grid``: float32 scale, int16 lowest and highest integer; none for
float32 values), then per scheme:

- ``dense``: ``N`` codes (``0`` = zero when the layer has zeros, else nonzero codes from 0);
- ``bitmask``: ``N`` mask bits, then ``nnz`` codes;
- ``relative``: ``E`` value codes (zero = filler when fillers exist), ``E`` skips of ``b_r`` bits,
  ``lines + 1`` entry pointers;
- ``csr``: ``nnz`` codes, ``nnz`` column indices, ``R + 1`` row pointers;
- ``structured``: ``R`` kept-row bits, ``C`` kept-column bits, the kept block's codes.

Float32 layers store raw IEEE-754 bits in place of codes. The widths and codes come from
:mod:`admmcompress.encoding`, the same module the storage report counts with.

The ``packed`` executor (``get_executor("packed")``): ``save`` = ``save_packed``, ``load`` =
``load_packed``, ``export`` = a finished run's model packed, reloaded, checked bit for bit and sized
against the storage report (``admmcompress export --packed``).

>>> import io, torch.nn as nn
>>> model = nn.Linear(8, 4)
>>> summary = save_packed(model, buffer := io.BytesIO())
>>> restored = load_packed(io.BytesIO(buffer.getvalue()), nn.Linear(8, 4))
>>> torch.equal(restored.weight, model.weight)
True
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from admmcompress.encoding import (
    FLOAT32,
    SCHEMES,
    LayerStorage,
    clog2,
    codes_of,
    grid_format,
    layer_storage,
    levels_of,
    relative_gaps,
    table_format,
    weight_tensors,
)
from admmcompress.executors.base import Executor, FinishedRun, register_executor
from admmcompress.structures.groups import as_matrix

MAGIC = b"ADMMPK1\n"


# --- bit streams ------------------------------------------------------------------------------


class BitWriter:
    """Append unsigned integers of fixed widths; ``getvalue()`` packs them MSB-first into bytes.

    >>> w = BitWriter(); w.write([1, 2, 3], 2); w.write([1], 1); w.getvalue(), w.bits
    (b'n', 7)
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.bits = 0

    def write(self, values: Any, width: int) -> None:
        values = np.asarray(values, dtype=np.uint64).reshape(-1)
        if width == 0 or values.size == 0:
            return
        if width < 64 and values.size and int(values.max()) >> width:
            raise ValueError(f"BitWriter: value {int(values.max())} does not fit in {width} bits")
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
        self._chunks.append(((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1))
        self.bits += values.size * width

    def getvalue(self) -> bytes:
        if not self._chunks:
            return b""
        return np.packbits(np.concatenate(self._chunks)).tobytes()


class BitReader:
    """Read back what a ``BitWriter`` wrote, field by field."""

    def __init__(self, data: bytes) -> None:
        self._bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self._pos = 0

    def read(self, count: int, width: int) -> np.ndarray:
        if width == 0 or count == 0:
            return np.zeros(count, dtype=np.uint64)
        end = self._pos + count * width
        if end > self._bits.size:
            raise ValueError(f"packed file is truncated: needs {end} bits, has {self._bits.size}")
        chunk = self._bits[self._pos : end].reshape(count, width).astype(np.uint64)
        self._pos = end
        weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
        return (chunk * weights).sum(axis=1, dtype=np.uint64)


def _float_bits(values: torch.Tensor) -> np.ndarray:
    return values.detach().to(torch.float32).contiguous().numpy().view(np.uint32).astype(np.uint64)


def _bits_float(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.astype(np.uint32).view(np.float32).copy())


# --- one weight -----------------------------------------------------------------------------


def _encode(weight: torch.Tensor, layer: LayerStorage, scheme: str) -> bytes:
    fmt = layer.value
    matrix = as_matrix(weight.detach().to(torch.float32))
    rows, cols = matrix.shape
    mask = matrix != 0
    out = BitWriter()
    is_float = fmt.kind == "float32"
    if fmt.kind == "table":
        out.write(_float_bits(torch.unique(matrix[mask])), 32)
    elif fmt.kind == "grid":
        out.write(_float_bits(torch.tensor([fmt.scale])), 32)
        out.write([fmt.low & 0xFFFF, fmt.high & 0xFFFF], 16)
    codes = None if is_float else codes_of(matrix, fmt)  # 0 = zero, 1.. = nonzero

    def values(selected: torch.Tensor, with_zero: bool) -> None:
        """Write the values at ``selected`` (a flat index into the matrix)."""
        if is_float:
            out.write(_float_bits(matrix.reshape(-1)[selected]), 32)
        elif with_zero:
            out.write(codes.reshape(-1)[selected].numpy(), fmt.zero_bits)
        else:
            out.write(codes.reshape(-1)[selected].numpy() - 1, fmt.code_bits)

    flat_mask = mask.reshape(-1)
    everything = torch.arange(rows * cols)
    nonzero = everything[flat_mask]
    if scheme == "dense":
        values(everything, layer.nnz < rows * cols)
    elif scheme == "bitmask":
        out.write(flat_mask.numpy().astype(np.uint64), 1)
        values(nonzero, False)
    elif scheme == "relative":
        lines = mask.t() if layer.order == "column" else mask
        gaps = relative_gaps(mask, layer.order)
        step = 1 << layer.index_bits
        fillers = gaps >> layer.index_bits
        line_of = torch.nonzero(lines)[:, 0]
        position = torch.nonzero(lines)
        flat_index = (
            (position[:, 1] * cols + position[:, 0])
            if layer.order == "column"
            else (position[:, 0] * cols + position[:, 1])
        )
        # Entries: per nonzero, `fillers` filler entries (skip 2^b_r - 1, value zero), then the nonzero.
        repeat = fillers + 1
        entry_skip = torch.full((int(repeat.sum()),), step - 1, dtype=torch.int64)
        last = torch.cumsum(repeat, 0) - 1
        entry_skip[last] = gaps - fillers * step
        entry_index = torch.full_like(entry_skip, -1)
        entry_index[last] = flat_index
        with_zero = layer.entries > layer.nnz
        if is_float:
            flat = matrix.reshape(-1)
            vals = torch.where(entry_index >= 0, flat[entry_index.clamp(min=0)], torch.zeros(()))
            out.write(_float_bits(vals), 32)
        else:
            code = codes.reshape(-1)[entry_index.clamp(min=0)]
            code = torch.where(entry_index >= 0, code, torch.zeros_like(code))
            out.write(
                code.numpy() if with_zero else code.numpy() - 1, fmt.zero_bits if with_zero else fmt.code_bits
            )
        out.write(entry_skip.numpy(), layer.index_bits)
        n_lines = lines.shape[0]
        per_line = torch.zeros(n_lines, dtype=torch.int64).index_add_(0, line_of, repeat)
        pointers = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_line, 0)])
        out.write(pointers.numpy(), clog2(layer.entries + 1))
    elif scheme == "csr":
        values(nonzero, False)
        out.write((nonzero % cols).numpy(), clog2(cols))
        per_row = mask.sum(dim=1)
        pointers = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_row, 0)])
        out.write(pointers.numpy(), clog2(layer.nnz + 1))
    elif scheme == "structured":
        kept_rows, kept_cols = mask.any(dim=1), mask.any(dim=0)
        out.write(kept_rows.numpy().astype(np.uint64), 1)
        out.write(kept_cols.numpy().astype(np.uint64), 1)
        block = everything.view(rows, cols)[kept_rows][:, kept_cols].reshape(-1)
        values(block, layer.kept_rows * layer.kept_cols > layer.nnz)
    else:
        raise ValueError(f"scheme={scheme!r}; choose one of {SCHEMES}")
    if out.bits != layer.bits[scheme]:
        raise AssertionError(
            f"{layer.name}: wrote {out.bits} bits, the storage report counts {layer.bits[scheme]}"
        )
    return out.getvalue()


def _decode(data: bytes, meta: dict[str, Any]) -> torch.Tensor:
    kind = meta["value"]
    rows, cols = meta["rows"], meta["cols"]
    scheme, nnz = meta["scheme"], meta["nnz"]
    src = BitReader(data)
    table = None
    fmt = FLOAT32
    if kind == "grid":
        scale = float(_bits_float(src.read(1, 32))[0])
        low, high = (int(v) - (1 << 16) if v >= (1 << 15) else int(v) for v in src.read(2, 16))
        fmt = grid_format(meta["levels"], scale, low, high)
    elif kind == "table":
        fmt = table_format(meta["levels"])
        table = _bits_float(src.read(fmt.levels, 32))
    elif kind != "float32":
        raise ValueError(f"packed file: unknown value kind {kind!r}")
    is_float = fmt.kind == "float32"
    levels = None if is_float else levels_of(fmt, table)
    flat = torch.zeros(rows * cols, dtype=torch.float32)

    def read_values(count: int, with_zero: bool) -> torch.Tensor:
        if is_float:
            return _bits_float(src.read(count, 32))
        raw = torch.from_numpy(
            src.read(count, fmt.zero_bits if with_zero else fmt.code_bits).astype(np.int64)
        )
        code = raw - 1 if with_zero else raw  # now -1 = zero, 0.. = level index
        return torch.where(code >= 0, levels[code.clamp(min=0)], torch.zeros(()))

    if scheme == "dense":
        flat[:] = read_values(rows * cols, nnz < rows * cols)
    elif scheme == "bitmask":
        mask = torch.from_numpy(src.read(rows * cols, 1).astype(bool))
        flat[mask] = read_values(nnz, False)
    elif scheme == "relative":
        entries, b_r = meta["entries"], meta["index_bits"]
        vals = read_values(entries, entries > nnz)
        skips = torch.from_numpy(src.read(entries, b_r).astype(np.int64))
        n_lines = cols if meta["order"] == "column" else rows
        pointers = torch.from_numpy(src.read(n_lines + 1, clog2(entries + 1)).astype(np.int64))
        if entries == 0:
            return flat.view(meta["shape"])
        line = torch.repeat_interleave(torch.arange(n_lines), pointers[1:] - pointers[:-1])
        # Position inside the line: cumulative (skip + 1) within each line, minus 1.
        steps = skips + 1
        total = torch.cumsum(steps, 0)
        before = torch.where(
            pointers[:-1] > 0, total[(pointers[:-1] - 1).clamp(min=0)], torch.zeros(()).long()
        )
        position = total - before[line] - 1
        index = position * cols + line if meta["order"] == "column" else line * cols + position
        flat[index] = vals
    elif scheme == "csr":
        vals = read_values(nnz, False)
        col = torch.from_numpy(src.read(nnz, clog2(cols)).astype(np.int64))
        pointers = torch.from_numpy(src.read(rows + 1, clog2(nnz + 1)).astype(np.int64))
        row = torch.repeat_interleave(torch.arange(rows), pointers[1:] - pointers[:-1])
        flat[row * cols + col] = vals
    elif scheme == "structured":
        kept_rows = torch.from_numpy(src.read(rows, 1).astype(bool))
        kept_cols = torch.from_numpy(src.read(cols, 1).astype(bool))
        kr, kc = int(kept_rows.sum()), int(kept_cols.sum())
        vals = read_values(kr * kc, kr * kc > nnz)
        index = torch.arange(rows * cols).view(rows, cols)[kept_rows][:, kept_cols].reshape(-1)
        flat[index] = vals
    else:
        raise ValueError(f"packed file: unknown scheme {scheme!r}")
    return flat.view(meta["shape"])


# --- files ---------------------------------------------------------------------------------

MAGIC_V1 = b"ADMMPK1\n"
MAGIC = b"APK\x02"
RAW_TAG = 0xFF
KINDS = ("float32", "grid", "table")
ORDERS = ("column", "row")


@dataclass
class PackedSummary:
    """Sizes of a written packed file, in bytes, and each weight's scheme.

    ``header_bytes`` is the container (magic, layout checksum, model spec, per-tensor fields);
    ``weight_bytes`` the packed weights, ``weight_bits`` the storage report's bits for them (the
    difference is ``padding_bits``, each weight rounded up to whole bytes); ``other_bytes`` the
    raw tensors (biases, BN statistics).
    """

    header_bytes: int
    weight_bytes: int
    other_bytes: int
    weight_bits: int
    schemes: dict[str, str]

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.weight_bytes + self.other_bytes

    @property
    def padding_bits(self) -> int:
        return 8 * self.weight_bytes - self.weight_bits


def layout_checksum(state: dict[str, torch.Tensor]) -> int:
    """CRC-32 of the state dict's names, dtypes and shapes, in order (what a packed file omits)."""
    text = "\n".join(f"{k}:{str(v.dtype).removeprefix('torch.')}:{list(v.shape)}" for k, v in state.items())
    return zlib.crc32(text.encode())


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"varint: {value} is negative")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Cursor:
    """Reads the header fields, with a clear error on a truncated or corrupt file."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise ValueError("packed file is truncated (header)")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("packed file is corrupt (varint longer than 64 bits)")


def _raw_bytes(value: torch.Tensor) -> bytes:
    array = value.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


@torch.no_grad()
def save_packed(
    model: torch.nn.Module,
    path: str | Path | BinaryIO,
    scheme: str = "best",
    index_bits: int | str = "best",
    order: str = "column",
    model_spec: dict[str, Any] | None = None,
) -> PackedSummary:
    """Write ``model`` as a packed file; ``model_spec`` (``{"name": ..., **kwargs}``) lets
    ``load_packed`` rebuild the architecture from the registry without a model instance."""
    if scheme != "best" and scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}; choose 'best' or one of {SCHEMES}")
    weights = weight_tensors(model)  # the storage report's weight layers (norm scales stay raw)
    state = model.state_dict()
    spec = json.dumps(model_spec, separators=(",", ":")).encode() if model_spec else b""
    header = bytearray(MAGIC + struct.pack("<I", layout_checksum(state)))
    header += _varint(len(spec)) + spec + _varint(len(state))
    blobs, schemes = [], {}
    weight_bytes = weight_bits = other_bytes = 0
    for name, value in state.items():
        if name in weights and value.dtype == torch.float32:
            layer = layer_storage(name, value, index_bits, order)
            chosen = layer.best if scheme == "best" else scheme
            blob = _encode(value, layer, chosen)
            schemes[name] = chosen
            weight_bytes += len(blob)
            weight_bits += layer.bits[chosen]
            kind = layer.value.kind
            header.append(SCHEMES.index(chosen) | ORDERS.index(layer.order) << 3 | KINDS.index(kind) << 4)
            header += _varint(layer.nnz)
            if chosen == "relative":
                header += _varint(layer.index_bits)
                header += _varint(layer.entries - layer.nnz)
            if kind != "float32":
                header += _varint(layer.value.levels)
            header += _varint(len(blob))
        else:
            blob = _raw_bytes(value)
            other_bytes += len(blob)
            header.append(RAW_TAG)
        blobs.append(blob)
    data = bytes(header) + b"".join(blobs)
    if isinstance(path, (str, Path)):
        from admmcompress.atomic import atomic_write

        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    else:
        path.write(data)
    return PackedSummary(len(header), weight_bytes, other_bytes, weight_bits, schemes)


def manifest_entry(entry: list[Any] | dict[str, Any]) -> dict[str, Any]:
    """One tensor's fields as a dict: a format-1 manifest list entry, or a dict from ``read_manifest``.

    Packed weights get ``rows``/``cols`` (their GEMM shape) added; ``value`` is the value kind.
    """
    if isinstance(entry, dict):
        out = dict(entry)
    elif len(entry) == 4:
        name, shape, nbytes, dtype = entry
        return {"name": name, "shape": shape, "bytes": nbytes, "kind": "raw", "dtype": dtype}
    else:
        name, shape, nbytes, scheme, nnz, entries, index_bits, order, kind, levels = entry
        out = {
            "name": name, "shape": shape, "bytes": nbytes, "kind": "packed", "scheme": scheme, "nnz": nnz,
            "entries": entries, "index_bits": index_bits, "order": order, "value": kind, "levels": levels,
        }
    if out["kind"] == "packed":
        out["rows"], out["cols"] = as_matrix(torch.empty(out["shape"], device="meta")).shape
    return out


def _template(spec: dict[str, Any] | None, model: torch.nn.Module | None) -> torch.nn.Module:
    if model is not None:
        return model
    if not spec:
        raise ValueError("this packed file names no model; pass model=<an instance of its architecture>")
    from admmcompress.models import create_model

    return create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


def read_manifest(
    source: str | Path | BinaryIO | bytes, model: torch.nn.Module | None = None
) -> tuple[dict[str, Any], bytes]:
    """``(manifest, payload)`` of a packed file; the manifest is JSON-ready.

    ``manifest``: ``{"format", "model" (spec or None), "header_bytes", "tensors"}``, one dict per
    tensor in payload order (``name``, ``shape``, ``bytes``, ``kind`` raw/packed, then ``dtype``, or
    ``scheme``, ``nnz``, ``entries``, ``index_bits``, ``order``, ``value`` kind, ``levels``). Format 2
    stores no names or shapes: they are read from ``model`` (default: built from the file's spec).
    """
    manifest, payload, _ = _parse(_read(source), model)
    return manifest, payload


def _read(source: str | Path | BinaryIO | bytes) -> bytes:
    if isinstance(source, bytes):
        return source
    return Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()


def _parse(data: bytes, model: torch.nn.Module | None) -> tuple[dict[str, Any], bytes, torch.nn.Module | None]:
    """Manifest, payload and the model that names the tensors (None for format 1 without one)."""
    if data.startswith(MAGIC_V1):
        (length,) = struct.unpack("<I", data[len(MAGIC_V1) : len(MAGIC_V1) + 4])
        start = len(MAGIC_V1) + 4
        raw = json.loads(data[start : start + length])
        tensors = [manifest_entry(e) for e in raw["tensors"]]
        manifest = {"format": 1, "model": raw.get("model"), "header_bytes": start + length, "tensors": tensors}
        return manifest, data[start + length :], model
    if not data.startswith(MAGIC):
        raise ValueError(
            f"not an admmcompress packed file (magic {data[:8]!r}); "
            "write one with `admmcompress export --packed`"
        )
    head = _Cursor(data, len(MAGIC))
    (checksum,) = struct.unpack("<I", head.take(4))
    spec_bytes = head.take(head.varint())
    spec = json.loads(spec_bytes) if spec_bytes else None
    model = _template(spec, model)
    state = model.state_dict()
    count = head.varint()
    if count != len(state) or checksum != layout_checksum(state):
        raise ValueError(
            f"this packed file was written from a model whose state dict differs from this one's "
            f"({count} tensors, layout checksum {checksum:08x}; this model: {len(state)} tensors, "
            f"{layout_checksum(state):08x}); load it into an instance of the architecture it was saved from"
        )
    tensors = []
    for name, value in state.items():
        tag = head.byte()
        entry: dict[str, Any] = {"name": name, "shape": list(value.shape)}
        if tag == RAW_TAG:
            dtype = np.dtype(str(value.dtype).removeprefix("torch.")).newbyteorder("<")
            entry.update(kind="raw", dtype=dtype.str, bytes=value.numel() * dtype.itemsize)
        else:
            scheme_index, order_index, kind_index = tag & 7, tag >> 3 & 1, tag >> 4 & 3
            if scheme_index >= len(SCHEMES) or kind_index >= len(KINDS) or tag >> 6:
                raise ValueError(f"packed file is corrupt (tensor {name!r}: tag {tag:#04x})")
            scheme = SCHEMES[scheme_index]
            nnz = head.varint()
            index_bits, entries = 0, nnz
            if scheme == "relative":
                index_bits = head.varint()
                entries = nnz + head.varint()
            kind = KINDS[kind_index]
            levels = head.varint() if kind != "float32" else 0
            entry.update(
                kind="packed", scheme=scheme, nnz=nnz, entries=entries, index_bits=index_bits,
                order=ORDERS[order_index], value=kind, levels=levels, bytes=head.varint(),
            )
        tensors.append(entry)
    payload = data[head.pos :]
    needed = sum(entry["bytes"] for entry in tensors)
    if len(payload) != needed:
        raise ValueError(f"packed file has {len(payload)} payload bytes, its header describes {needed}")
    manifest = {"format": 2, "model": spec, "header_bytes": head.pos, "tensors": tensors}
    return manifest, payload, model


@torch.no_grad()
def load_packed(source: str | Path | BinaryIO, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Rebuild the model (``model``, or the file's model spec via the registry) and load its weights."""
    manifest, payload, model = _parse(_read(source), model)
    model = _template(manifest["model"], model)
    state, offset = {}, 0
    for entry in manifest["tensors"]:
        entry = manifest_entry(entry)
        blob = payload[offset : offset + entry["bytes"]]
        offset += entry["bytes"]
        if entry["kind"] == "packed":
            state[entry["name"]] = _decode(blob, entry)
        else:
            array = np.frombuffer(blob, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
            state[entry["name"]] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    model.load_state_dict(state)
    return model


def save_packed_bytes(model: torch.nn.Module, **kwargs: Any) -> bytes:
    """The packed file as bytes (for tests and size checks)."""
    buffer = io.BytesIO()
    save_packed(model, buffer, **kwargs)
    return buffer.getvalue()


def packed_size_lines(size: int, summary: PackedSummary, report: Any, scheme: str = "best") -> list[str]:
    """The packed file's size against the storage report (SPEC 4.2), every byte of difference named.

    ``report`` is the model's ``report.storage.StorageReport`` (only its ``bits(scheme)`` and
    ``other_bits`` are read). The report counts weight bits (codes, indices, codebooks) and, apart, the
    other parameters; the file adds the container header, each packed weight's last partial byte and
    any buffers (BN statistics), which the report does not count.
    """
    weight_bits, other_bits = report.bits(scheme), report.other_bits
    figure = (weight_bits + other_bits) / 8
    buffers = summary.other_bytes - other_bits / 8
    return [
        f"storage report (SPEC 4.2): weights {weight_bits:,} bits = {weight_bits / 8:,.1f} B, "
        f"other parameters {other_bits / 8:,.0f} B; together {figure:,.1f} B",
        f"container overhead: header {summary.header_bytes:,} B (format, layout checksum, model spec, "
        f"per-tensor scheme/nnz/length), byte padding {summary.padding_bits:,} bits "
        f"({len(summary.schemes)} packed weights)"
        + (f", buffers not in the report {buffers:,.0f} B" if buffers else ""),
        f"packed file: {size:,} B = {summary.header_bytes:,} header + {summary.weight_bytes:,} weights + "
        f"{summary.other_bytes:,} other tensors; file / report = {size / figure:.4f} "
        f"({100 * (size / figure - 1):+.2f}%)",
    ]


def _index_bits(value: int | str) -> int | str:
    """``"best"`` or a positive integer ``b_r`` (the command line gives strings)."""
    if value == "best" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"index_bits={value!r}: give a positive integer (relative index bits b_r) or 'best'") from None


@register_executor("packed")
class PackedExecutor(Executor):
    """Bit-packed storage: codes, indices and codebooks with the storage report's widths, no pickle."""

    summary = "bit-packed codes + indices"
    export_options = {
        "scheme": {"default": "best", "help": "packed: best|dense|bitmask|relative|csr|structured"},
        "index_bits": {"default": "best", "help": "packed: relative index bits b_r, or best"},
    }
    hints = {"convert": "packing changes the file, not the model: save it, then load it back"}

    def save(
        self,
        model: torch.nn.Module,
        path: str | Path | BinaryIO,
        scheme: str = "best",
        index_bits: int | str = "best",
        order: str = "column",
        model_spec: dict[str, Any] | None = None,
    ) -> PackedSummary:
        """``save_packed``: every weight in its cheapest scheme (or ``scheme`` for all); sizes returned."""
        return save_packed(model, path, scheme, _index_bits(index_bits), order, model_spec)

    def load(self, path: str | Path | BinaryIO, skeleton: torch.nn.Module | None = None) -> torch.nn.Module:
        """``load_packed``: ``skeleton``, or the model the file's spec names, with the file's weights."""
        return load_packed(path, skeleton)

    def export(
        self, run: FinishedRun, out: str | Path, scheme: str = "best", index_bits: int | str = "best"
    ) -> str:
        """Write the packed file, verify the round trip bit for bit, return the storage table and sizes."""
        model = run.model
        index_bits = _index_bits(index_bits)
        summary = self.save(model, out, scheme=scheme, index_bits=index_bits, model_spec=dict(run.model_config))
        restored = self.load(out).eval()
        for name, value in model.state_dict().items():
            if not torch.equal(value, restored.state_dict()[name]):
                raise RuntimeError(f"packed round trip changed '{name}'; please report this as a bug")
        x = run.example(8)
        with torch.no_grad():
            identical = torch.equal(model(x), restored(x))
        report = run.storage(index_bits=index_bits)
        lines = [report.render(), *packed_size_lines(Path(out).stat().st_size, summary, report, scheme)]
        lines.append(f"round trip: state dict bit-identical, outputs identical: {identical}")
        return "\n".join(lines)


__all__ = [
    "BitReader",
    "BitWriter",
    "PackedExecutor",
    "PackedSummary",
    "layout_checksum",
    "load_packed",
    "manifest_entry",
    "packed_size_lines",
    "read_manifest",
    "save_packed",
    "save_packed_bytes",
]

"""A real compressed file: bit-packed codes and indices, exactly the bits ``report.storage`` counts.

Every weight matrix is written in the scheme the storage report chose for it (each layer's
cheapest by default, or one scheme for all), field by field with the widths of SPEC 4.2, so its
payload is ``ceil(bits / 8)`` bytes for the report's ``bits``. Everything else in the state dict
(biases, BN statistics) is stored raw. Loading rebuilds the model and its weights bit-exactly (a pruned -0.0
comes back as +0.0).

File layout, formats 3 and 4 (no pickle; a few bytes of header so that small models, e.g. a LeNet-5 at
~10 KB, match the storage report within 1%)::

    b"APK\\x03" (b"APK\\x04")         4 bytes, magic and format version
    uint32 little endian              CRC-32 of every byte after this field (header and payload)
    uint32 little endian              CRC-32 of the state dict's layout (names, dtypes, shapes)
    varint n, n bytes                 model spec as compact JSON (n = 0: none)
    varint                            number of tensors (the state dict's, in its order)
    per tensor                        0xFF for a raw tensor (its bytes follow from the model's
                                      dtype and shape), else a packed weight: tag byte (scheme
                                      index in bits 0-2, row order in bit 3, value kind in bits
                                      4-5: float32/grid/table/float16), varint nnz, for ``relative`` varint
                                      b_r and varint fillers (E - nnz), for grid/table varint
                                      K, varint payload bytes; format 4 only: 0xFE and varint i
                                      for a tensor tied to the i-th (an alias: no payload)
    payload                           the tensors' bytes, in state-dict order (raw little endian)

Tied tensors (one Parameter shared by two modules: a language model's ``lm_head.weight`` IS its embedding's
weight, or any ``b.weight = a.weight``; ``tied_names``) are one tensor, stored once under its first state-dict name,
as the storage report counts them once; each other name is an alias entry. A file holding an alias is format 4
(magic ``b"APK\\x04"``, otherwise format 3's layout); a model without ties is written as format 3, as before, so
older admmcompress reads it. Loading an alias gives its name the tied tensor itself: the loaded model's names share
one Parameter again even where the instance passed to ``load_packed`` was built untied. Format 3 files written from
tied models before ties were stored once (each name's copy in full) still load.

Names and shapes are not stored: they come from the model the file is loaded into (an instance
passed to ``load_packed``, or the one the model spec builds), and the layout checksum refuses a
model whose state dict differs. A model holding factorized convs (Tucker-2, PENNI shared kernels) adds them to
its spec under ``"factorized_layers"`` (``{layer: {"structure": ..., "ranks" or "bases"}}``), which the loader
rebuilds in the registry model's plain convs. Varints are unsigned LEB128.

Integrity: the file checksum is verified before anything else is read (CRC-32 catches every single-bit
flip and every burst up to 32 bits; 4 bytes keep small files within 1% of the report). Then every header
field is checked against the model's state dict and the file's length, and every weight's stream against
its fields (sizes, codes within the codebook, pointers and indices in range, the nonzero count), before
anything is allocated; a model built from the file's spec is built on the meta device first and refused
above ``MAX_MODEL_ELEMENTS``. Any failure is one ``PackedFormatError`` (a ``ValueError``) naming the file.
Format 2 (the same without the file checksum, magic ``b"APK\\x02"``) and format 1 (magic
``b"ADMMPK1\\n"``, a JSON manifest with names) are still read, with a ``PackedFormatWarning`` that they
carry no checksum.

A weight's bit stream (most significant bit first, ``numpy.packbits`` order) is its codebook
(``table``: ``K`` float32; ``grid``: float32 scale, int16 lowest and highest integer; none for
float32 values), then per scheme:

- ``dense``: ``N`` codes (``0`` = zero when the layer has zeros, else nonzero codes from 0);
- ``bitmask``: ``N`` mask bits, then ``nnz`` codes;
- ``relative``: ``E`` value codes (zero = filler when fillers exist), ``E`` skips of ``b_r`` bits,
  ``lines + 1`` entry pointers;
- ``csr``: ``nnz`` codes, ``nnz`` column indices, ``R + 1`` row pointers;
- ``structured``: ``R`` kept-row bits, ``C`` kept-column bits, the kept block's codes.

Unquantized layers store raw IEEE-754 bits in place of codes: 32 bits a value, or the weight's own 16 for a
float16/bfloat16 model. The widths and codes come from
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
import math
import numbers
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
import torch

from admmcompress.encoding import (
    FLOAT16,
    FLOAT32,
    HALF_DTYPES,
    MAX_INDEX_BITS,
    MAX_LEVELS,
    SCHEMES,
    LayerStorage,
    ValueFormat,
    clog2,
    codes_of,
    csr_bits,
    grid_format,
    layer_storage,
    levels_of,
    relative_bits,
    relative_gaps,
    table_format,
    weight_tensors,
)
from admmcompress.executors.base import Executor, ExecutorError, FinishedRun, register_executor
from admmcompress.executors.factorized import factorized_spec, rebuild_factorized
from admmcompress.structures.groups import as_matrix

# --- bit streams ------------------------------------------------------------------------------


# Bits handled per step of a read or write: the temporaries (a byte, then 8 bytes, per bit) stay a few MiB
# whatever the layer's size. Unpacking a whole file at once cost about 140x its size in memory.
_STEP_BITS = 1 << 20


class BitWriter:
    """Append unsigned integers of fixed widths; ``getvalue()`` packs them MSB-first into bytes.

    >>> w = BitWriter(); w.write([1, 2, 3], 2); w.write([1], 1); w.getvalue(), w.bits
    (b'n', 7)
    """

    def __init__(self) -> None:
        self._packed: list[bytes] = []  # whole bytes written so far
        self._tail = np.zeros(0, dtype=np.uint8)  # the last bits (fewer than 8), one per byte
        self.bits = 0

    def write(self, values: Any, width: int) -> None:
        values = np.asarray(values, dtype=np.uint64).reshape(-1)
        if width == 0 or values.size == 0:
            return
        if width < 64 and values.size and int(values.max()) >> width:
            raise ValueError(f"BitWriter: value {int(values.max())} does not fit in {width} bits")
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
        step = max(1, _STEP_BITS // width)
        for first in range(0, values.size, step):
            fields = values[first : first + step, None]
            bits = np.concatenate([self._tail, ((fields >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)])
            whole = bits.size // 8 * 8
            self._packed.append(np.packbits(bits[:whole]).tobytes())
            self._tail = bits[whole:]
        self.bits += values.size * width

    def getvalue(self) -> bytes:
        return b"".join(self._packed) + (np.packbits(self._tail).tobytes() if self._tail.size else b"")


class BitReader:
    """Read back what a ``BitWriter`` wrote, field by field (only the bytes a read needs are unpacked)."""

    def __init__(self, data: bytes, name: str | None = None) -> None:
        self._bytes = np.frombuffer(data, dtype=np.uint8)
        self._pos = 0
        self._name = name  # the tensor a packed file's stream holds: a short stream is then a PackedFormatError

    def read(self, count: int, width: int) -> np.ndarray:
        if width == 0 or count == 0:
            return np.zeros(count, dtype=np.uint64)
        end = self._pos + count * width
        if end > self._bytes.size * 8:
            if self._name is not None:  # a header field (a codebook's size) past the stream: the file's fault
                have = self._bytes.size * 8
                _fail(f"tensor {self._name!r} is truncated: its fields need {end:,} bits, it has {have:,}")
            raise ValueError(f"packed file is truncated: needs {end} bits, has {self._bytes.size * 8}")
        weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
        out = np.empty(count, dtype=np.uint64)
        step = max(1, _STEP_BITS // width)
        for first in range(0, count, step):
            n = min(step, count - first)
            start = self._pos + first * width
            skip = start % 8
            bits = np.unpackbits(self._bytes[start // 8 : (start + n * width + 7) // 8])[skip : skip + n * width]
            out[first : first + n] = (bits.reshape(n, width).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        self._pos = end
        return out


def _float_bits(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """IEEE bits of ``values`` as ``dtype``: float32, or a half type's 16 bits (numpy has no bfloat16)."""
    if dtype in HALF_DTYPES:
        return values.detach().to(dtype).contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint64)
    return values.detach().to(torch.float32).contiguous().numpy().view(np.uint32).astype(np.uint64)


def _bits_float(raw: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float32 values of ``raw`` bits of ``dtype`` (exact: a half type's values are float32 values)."""
    if dtype in HALF_DTYPES:
        return torch.from_numpy(raw.astype(np.uint16).view(np.int16).copy()).view(dtype).to(torch.float32)
    return torch.from_numpy(raw.astype(np.uint32).view(np.float32).copy())


# --- one weight -----------------------------------------------------------------------------


def _encode(weight: torch.Tensor, layer: LayerStorage, scheme: str) -> bytes:
    fmt = layer.value
    matrix = as_matrix(weight.detach().to(torch.float32))
    rows, cols = matrix.shape
    mask = matrix != 0
    out = BitWriter()
    is_float = fmt.kind in FLOAT_KINDS  # raw values at the weight's own width (32 or 16 bits)
    dtype = weight.dtype if fmt.kind == "float16" else torch.float32
    if fmt.kind == "table":
        out.write(_float_bits(torch.unique(matrix[mask])), 32)
    elif fmt.kind == "grid":
        out.write(_float_bits(torch.tensor([fmt.scale])), 32)
        out.write([fmt.low & 0xFFFF, fmt.high & 0xFFFF], 16)
    codes = None if is_float else codes_of(matrix, fmt)  # 0 = zero, 1.. = nonzero

    def values(selected: torch.Tensor, with_zero: bool) -> None:
        """Write the values at ``selected`` (a flat index into the matrix)."""
        if is_float:
            out.write(_float_bits(matrix.reshape(-1)[selected], dtype), fmt.code_bits)
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
            out.write(_float_bits(vals, dtype), fmt.code_bits)
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


class PackedFormatError(ValueError):
    """A packed file that cannot be loaded as it is: corrupt, truncated, crafted, or written from another model.

    Always one line naming the file and what is wrong (a ``ValueError``, so the command line prints it as
    ``admmcompress: error: ...``); never a ``KeyError``/``IndexError``/``RuntimeError``/``struct.error``.
    """


class PackedFormatWarning(UserWarning):
    """A packed file of format 1 or 2 was read: those carry no checksum, so corruption cannot be detected."""


def _fail(message: str) -> NoReturn:
    raise PackedFormatError(message)


def _codebook(src: BitReader, meta: dict[str, Any]) -> tuple[ValueFormat, torch.Tensor | None]:
    """The weight's value format and table, read from the front of its bit stream and checked."""
    kind, name, levels = meta["value"], meta["name"], meta["levels"]
    if kind == "float32":
        return FLOAT32, None
    if kind == "float16":
        return FLOAT16, None
    if kind not in KINDS:
        _fail(f"tensor {name!r}: unknown value kind {kind!r}")
    if not 1 <= levels <= MAX_LEVELS:
        _fail(f"tensor {name!r}: {levels} levels, a codebook holds 1 to {MAX_LEVELS}")
    if kind == "table":
        return table_format(levels), _bits_float(src.read(levels, 32))
    scale = float(_bits_float(src.read(1, 32))[0])
    low, high = (int(v) - (1 << 16) if v >= (1 << 15) else int(v) for v in src.read(2, 16))
    count = high - low + 1 - (1 if low <= 0 <= high else 0)
    if not (math.isfinite(scale) and scale > 0) or count < max(1, levels):
        _fail(f"tensor {name!r}: grid codebook (scale {scale:g}, integers {low}..{high}) cannot hold {levels} levels")
    return grid_format(levels, scale, low, high), None


def _check_size(data: bytes, meta: dict[str, Any], bits: int) -> None:
    """The weight's bytes must be its fields' bits rounded up to a byte, as the writer made them."""
    if len(data) != (bits + 7) // 8:
        _fail(f"tensor {meta['name']!r} has {len(data):,} bytes, its header fields describe {bits:,} bits")


def _check_pointers(pointers: torch.Tensor, total: int, meta: dict[str, Any]) -> None:
    if int(pointers[0]) != 0 or int(pointers[-1]) != total or bool((pointers[1:] < pointers[:-1]).any()):
        _fail(f"tensor {meta['name']!r}: its {meta['scheme']} pointers do not run from 0 up to {total}")


def _decode(data: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """One packed weight, every field checked against its header before it is used (no index out of range)."""
    name, rows, cols = meta["name"], meta["rows"], meta["cols"]
    scheme, nnz, n = meta["scheme"], meta["nnz"], rows * cols
    if scheme not in SCHEMES:
        _fail(f"tensor {name!r}: unknown scheme {scheme!r}")
    if meta["order"] not in ORDERS:
        _fail(f"tensor {name!r}: unknown index order {meta['order']!r}")
    relative_ok = meta["entries"] >= nnz and 1 <= meta["index_bits"] <= MAX_INDEX_BITS
    if not 0 <= nnz <= n or (scheme == "relative" and not relative_ok):
        _fail(f"tensor {name!r}: header fields out of range (nnz {nnz} of {n}, entries {meta['entries']}, "
              f"index bits {meta['index_bits']})")
    src = BitReader(data, name)
    fmt, table = _codebook(src, meta)
    is_float = fmt.kind in FLOAT_KINDS
    dtype = getattr(torch, meta.get("dtype", "torch.float32").removeprefix("torch."))
    levels = None if is_float else levels_of(fmt, table)
    b, b0 = fmt.code_bits, fmt.zero_bits
    entries, b_r = meta["entries"], meta["index_bits"]
    lines = cols if meta["order"] == "column" else rows
    if scheme == "dense":
        _check_size(data, meta, fmt.table_bits + n * (b0 if nnz < n else b))
    elif scheme == "bitmask":
        _check_size(data, meta, fmt.table_bits + n + nnz * b)
    elif scheme == "relative":
        _check_size(data, meta, fmt.table_bits + relative_bits(entries, lines, b0 if entries > nnz else b, b_r))
    elif scheme == "csr":
        _check_size(data, meta, fmt.table_bits + csr_bits(nnz, rows, cols, b))
    flat = torch.zeros(n, dtype=torch.float32)

    def read_values(count: int, with_zero: bool) -> torch.Tensor:
        if is_float:
            return _bits_float(src.read(count, fmt.code_bits), dtype if fmt.kind == "float16" else torch.float32)
        raw = torch.from_numpy(src.read(count, b0 if with_zero else b).astype(np.int64))
        code = raw - 1 if with_zero else raw  # now -1 = zero, 0.. = level index
        if code.numel() and int(code.max()) >= levels.numel():
            _fail(f"tensor {name!r}: code {int(code.max())} is beyond its {levels.numel()} levels")
        return torch.where(code >= 0, levels[code.clamp(min=0)], torch.zeros(()))

    if scheme == "dense":
        flat[:] = read_values(n, nnz < n)
    elif scheme == "bitmask":
        mask = torch.from_numpy(src.read(n, 1).astype(bool))
        if int(mask.sum()) != nnz:
            _fail(f"tensor {name!r}: its bitmask marks {int(mask.sum())} weights, its header says {nnz}")
        flat[mask] = read_values(nnz, False)
    elif scheme == "relative":
        vals = read_values(entries, entries > nnz)
        skips = torch.from_numpy(src.read(entries, b_r).astype(np.int64))
        pointers = torch.from_numpy(src.read(lines + 1, clog2(entries + 1)).astype(np.int64))
        _check_pointers(pointers, entries, meta)
        if entries:
            line = torch.repeat_interleave(torch.arange(lines), pointers[1:] - pointers[:-1])
            # Position inside the line: cumulative (skip + 1) within each line, minus 1.
            total = torch.cumsum(skips + 1, 0)
            before = torch.where(pointers[:-1] > 0, total[(pointers[:-1] - 1).clamp(min=0)], torch.zeros(()).long())
            position = total - before[line] - 1
            if int(position.min()) < 0 or int(position.max()) >= (rows if meta["order"] == "column" else cols):
                _fail(f"tensor {name!r}: a relative index runs past the end of its line")
            index = position * cols + line if meta["order"] == "column" else line * cols + position
            flat[index] = vals
    elif scheme == "csr":
        vals = read_values(nnz, False)
        col = torch.from_numpy(src.read(nnz, clog2(cols)).astype(np.int64))
        pointers = torch.from_numpy(src.read(rows + 1, clog2(nnz + 1)).astype(np.int64))
        _check_pointers(pointers, nnz, meta)
        if nnz and int(col.max()) >= cols:
            _fail(f"tensor {name!r}: column index {int(col.max())} is past its {cols} columns")
        row = torch.repeat_interleave(torch.arange(rows), pointers[1:] - pointers[:-1])
        flat[row * cols + col] = vals
    else:  # structured: the kept rows and columns say how large the block is
        kept_rows = torch.from_numpy(src.read(rows, 1).astype(bool))
        kept_cols = torch.from_numpy(src.read(cols, 1).astype(bool))
        kr, kc = int(kept_rows.sum()), int(kept_cols.sum())
        if kr * kc < nnz:
            _fail(f"tensor {name!r}: a kept block of {kr}x{kc} cannot hold its {nnz} nonzeros")
        _check_size(data, meta, fmt.table_bits + rows + cols + kr * kc * (b0 if kr * kc > nnz else b))
        vals = read_values(kr * kc, kr * kc > nnz)
        index = torch.arange(n).view(rows, cols)[kept_rows][:, kept_cols].reshape(-1)
        flat[index] = vals
    found = int(torch.count_nonzero(flat))
    if found != nnz:
        _fail(f"tensor {name!r} decodes to {found} nonzero weights, its header says {nnz}")
    return flat.view(meta["shape"])


# --- files ---------------------------------------------------------------------------------

MAGIC_V1 = b"ADMMPK1\n"
MAGIC_V2 = b"APK\x02"
MAGIC = b"APK\x03"  # written when no tensor is tied (the files of models without ties are as before)
MAGIC_TIED = b"APK\x04"  # format 4: format 3 plus alias entries, written only when the model ties tensors
FORMAT = 4  # the newest format read
RAW_TAG = 0xFF
ALIAS_TAG = 0xFE  # format 4: the tensor is an earlier one (tied weights), stored once; its index follows
KINDS = ("float32", "grid", "table", "float16")  # the tag's bits 4-5; float16: a half type's own 16 bits
FLOAT_KINDS = ("float32", "float16")
ORDERS = ("column", "row")
MAX_SPEC_BYTES = 1 << 16  # a model spec is a registry name and a few keyword arguments
MAX_MODEL_ELEMENTS = 1 << 28  # a model built from a file's spec: at most 2^28 elements (1 GiB of float32)
FACTORIZED_KEY = "factorized_layers"  # model spec key: {layer: structure} of convs the registry builds plain


@dataclass
class PackedSummary:
    """Sizes of a written packed file, in bytes, and each weight's scheme.

    ``header_bytes`` is the container (magic, file checksum, layout checksum, model spec, per-tensor
    fields); ``weight_bytes`` the packed weights, ``weight_bits`` the storage report's bits for them (the
    difference is ``padding_bits``, each weight rounded up to whole bytes); ``other_bytes`` the
    raw tensors (biases, BN statistics).
    """

    header_bytes: int
    weight_bytes: int
    other_bytes: int
    weight_bits: int
    schemes: dict[str, str]
    raw_weights: dict[str, int] = field(default_factory=dict)  # weights stored raw (float64 past float32), bytes
    #: tied tensors (``{"lm_head.weight": "embed.weight"}``): stored once, under the first name, each other name an
    #: alias entry of the header (format 4)
    aliases: dict[str, str] = field(default_factory=dict)

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


def tied_names(model: torch.nn.Module, names: Any = None) -> dict[str, str]:
    """``{name: first name}`` of the state-dict names that hold a tensor an earlier name holds: one Parameter (or
    buffer) shared by two modules, as a language model's ``lm_head.weight`` IS its embedding's weight, or any
    ``b.weight = a.weight``. Such a tensor is one tensor: it is counted (``report.storage``) and stored once.

    ``names``: the state dict's names in order (default: ``model.state_dict()``'s). Ties are found by identity, so
    a model on the meta device (built from a file's spec) gives the same answer as the one it was saved from.

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    >>> model[1].weight = model[0].weight
    >>> tied_names(model)
    {'1.weight': '0.weight'}
    """
    owner: dict[str, int] = {}  # name -> id of the tensor object it names
    for name, param in model.named_parameters(remove_duplicate=False):
        owner[name] = id(param)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        owner.setdefault(name, id(buffer))
    first: dict[int, str] = {}
    out = {}
    for name in model.state_dict() if names is None else names:
        key = owner.get(name)
        if key is None:  # a state-dict entry of a module's own (extra state): never tied
            continue
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


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
            _fail(f"is truncated: its header needs {self.pos + count:,} bytes, the file has {len(self.data):,}")
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
                _fail("is corrupt (a header varint is longer than 64 bits)")


def _raw_bytes(name: str, value: torch.Tensor) -> bytes:
    value = value.detach().cpu().contiguous()
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16: its 16 bits as an int16
        value = value.view(torch.int16)
    try:
        array = value.numpy()
    except TypeError:
        raise ValueError(f"tensor {name!r} is {value.dtype}, which packed files do not store; convert the model "
                         "(e.g. model.float()) before saving") from None
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _packable(value: torch.Tensor) -> bool:
    """Whether a weight's values are exactly float32 values (what the codes and the storage report count):
    float16 and bfloat16 always are; float64 only where no value needs more (a quantized layer). An empty weight
    (``nn.Linear(0, n)``) has no GEMM view to code: it is stored raw, 0 bytes, as the report counts it."""
    if value.numel() == 0:
        return False
    if value.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return True
    return value.is_floating_point() and torch.equal(value.to(torch.float32).to(value.dtype), value)


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
    ``load_packed`` rebuild the architecture from the registry without a model instance (with the model's
    factorized convs, recorded under ``"factorized_layers"``: ``executors.factorized``)."""
    if scheme != "best" and scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}; choose 'best' or one of {SCHEMES}")
    index_bits = _index_bits(index_bits)  # checked before any byte is written
    weights = weight_tensors(model)  # the storage report's weight layers (norm scales stay raw)
    state = model.state_dict()
    broken = [n for n, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # saved as they are (the file holds the model), but such a model gives NaN: say so (SPEC P1)
        warnings.warn(f"save_packed: {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} hold NaN or "
                      "infinite values; the file keeps them, but the model's outputs will not be finite",
                      RuntimeWarning, stacklevel=2)
    factorized = factorized_spec(model)
    if model_spec and factorized:  # the registry builds these convs plain: the loader rebuilds them from this
        model_spec = {**model_spec, FACTORIZED_KEY: factorized}
    spec = json.dumps(model_spec, separators=(",", ":")).encode() if model_spec else b""
    header = bytearray(struct.pack("<I", layout_checksum(state)))  # after the magic and the file checksum
    header += _varint(len(spec)) + spec + _varint(len(state))
    # A tied tensor is stored once, under its first name; each other name is an alias entry (format 4). It is coded
    # if any of its names is a weight layer's, as the storage report counts it (once, among the weights).
    aliases = tied_names(model, state)
    coded = set(weights) | {aliases[n] for n in aliases if n in weights}
    position = {name: i for i, name in enumerate(state)}
    blobs, schemes, raw_weights = [], {}, {}
    weight_bytes = weight_bits = other_bytes = 0
    for name, value in state.items():
        if name in aliases:  # nothing in the payload: the tensor it is tied to holds the values
            header.append(ALIAS_TAG)
            header += _varint(position[aliases[name]])
            continue
        if name in coded and _packable(value):  # coded from its float32 values, given back at its dtype
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
            if kind not in FLOAT_KINDS:
                header += _varint(layer.value.levels)
            header += _varint(len(blob))
        else:
            blob = _raw_bytes(name, value)
            other_bytes += len(blob)
            if name in coded and value.numel():  # float64 values float32 cannot hold: the report counted float32
                raw_weights[name] = len(blob)
            header.append(RAW_TAG)
        blobs.append(blob)
    body = bytes(header) + b"".join(blobs)
    # One CRC-32 over everything after it: any single-bit flip or burst up to 32 bits is always caught.
    data = (MAGIC_TIED if aliases else MAGIC) + struct.pack("<I", zlib.crc32(body)) + body
    if isinstance(path, (str, Path)):
        from admmcompress.atomic import atomic_write

        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    else:
        path.write(data)
    return PackedSummary(
        len(MAGIC) + 4 + len(header), weight_bytes, other_bytes, weight_bits, schemes, raw_weights, aliases
    )


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


def _build(spec: dict[str, Any] | None, device: str | None = None) -> torch.nn.Module:
    """The model a file's spec names (``device="meta"``: shapes only, nothing allocated)."""
    if not spec:
        _fail("names no model; pass an instance of its architecture: load_packed(path, model), or the packed "
              "executor's load(path, skeleton)")
    from admmcompress.models import create_model
    from admmcompress.models.registry import spec_problem

    kwargs = {k: v for k, v in spec.items() if k not in ("name", FACTORIZED_KEY)}
    problem = spec_problem(kwargs)
    if problem:
        _fail(f"names model {spec.get('name')!r} with {problem}")
    try:
        with torch.device(device or "cpu"):
            model = create_model(spec["name"], **kwargs)
    except Exception as err:  # a spec from a file: whatever the registry says about it, say it in one line
        _fail(f"names a model that cannot be built ({spec!r}: {type(err).__name__}: {err})")
    if FACTORIZED_KEY in spec:  # convs a low-rank target rewrote: the registry builds them plain
        try:
            rebuild_factorized(model, spec[FACTORIZED_KEY], "its model spec's factorized layers")
        except ExecutorError as err:
            _fail(str(err))
    return model


def _shape_model(spec: dict[str, Any] | None, model: torch.nn.Module | None, limit: int) -> torch.nn.Module:
    """``model``, or the file's model built on the meta device and bounded, before anything is allocated."""
    if model is not None:
        return model
    skeleton = _build(spec, "meta")
    elements = sum(value.numel() for value in skeleton.state_dict().values())
    if elements > limit:
        _fail(
            f"names a model of {elements:,} elements, more than the {limit:,} a file may make the loader "
            "build; pass model=<an instance> (or max_elements=) if you trust this file"
        )
    return skeleton


def _spec(raw: bytes) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        spec = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
        _fail(f"is corrupt: its model spec is not JSON ({type(err).__name__}: {str(err)[:80]})")
    return _named_spec(spec)


def _named_spec(spec: Any) -> dict[str, Any]:
    """``spec`` if it is a mapping with a model 'name' (formats 1 to 4 alike), else the file is corrupt."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        _fail(f"is corrupt: its model spec {str(spec)[:60]!r} is not a mapping with a model 'name'")
    return spec


def read_manifest(
    source: str | Path | BinaryIO | bytes, model: torch.nn.Module | None = None, max_elements: int = MAX_MODEL_ELEMENTS
) -> tuple[dict[str, Any], bytes]:
    """``(manifest, payload)`` of a packed file; the manifest is JSON-ready.

    ``manifest``: ``{"format", "model" (spec or None), "header_bytes", "checksum", "tensors"}``, one dict
    per tensor in state-dict order (``name``, ``shape``, ``bytes``, ``kind`` raw/packed/alias, then ``dtype``, or
    ``scheme``, ``nnz``, ``entries``, ``index_bits``, ``order``, ``value`` kind, ``levels``, or for an alias (a tied
    tensor, format 4: 0 bytes) ``of``, the name it is tied to). ``checksum``
    is the file's CRC-32 as hex (formats 3 and 4), or None (formats 1 and 2 carry none: a ``PackedFormatWarning``
    says so). Formats 2 to 4 store no names or shapes: they are read from ``model`` (default: the file's
    spec, built on the meta device). Any problem is one ``PackedFormatError`` naming the file.
    """
    data, label = _read(source)
    with _named(label):
        manifest, payload, _ = _parse(data, model, max_elements)
    _note_unchecked(manifest, label)
    return manifest, payload


def _read(source: str | Path | BinaryIO | bytes) -> tuple[bytes, str]:
    """The file's bytes and how to name it in messages."""
    if isinstance(source, bytes):
        return source, "<bytes>"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():  # a folder or a missing path: one line, not an OSError's traceback (review)
            what = "a folder" if path.is_dir() else "missing"
            raise PackedFormatError(f"'{source}' is {what}, not a packed file; give the path of a file written by "
                                    "save_packed or `admmcompress export --packed`")
        return path.read_bytes(), f"'{source}'"
    name = getattr(source, "name", None)
    return source.read(), f"'{name}'" if isinstance(name, str) else "<stream>"


class _named:
    """Prefix every ``PackedFormatError`` with the file's name; anything else a hostile file could provoke
    below (an index, a reshape, a struct) becomes one too, so no traceback ever reaches the user."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, err: BaseException | None, _tb: Any) -> None:
        if err is None or not isinstance(err, Exception) or isinstance(err, OSError):
            return
        if isinstance(err, PackedFormatError):
            text = str(err)
            joint = " " if text.split(" ", 1)[0] in ("is", "was", "has", "names") else ": "
            raise PackedFormatError(f"packed file {self.label}{joint}{text}") from None
        raise PackedFormatError(
            f"packed file {self.label} could not be decoded ({type(err).__name__}: {err}); if admmcompress wrote "
            "it unchanged, please report this"
        ) from err


def _note_unchecked(manifest: dict[str, Any], label: str) -> None:
    if manifest["checksum"] is None:
        warnings.warn(
            f"packed file {label} is format {manifest['format']}, which carries no checksum: corruption cannot be "
            f"detected; write it again (`admmcompress export --packed`) for format 3 (or {FORMAT}, the same with "
            "tied weights stored once)",
            PackedFormatWarning,
            stacklevel=3,
        )


def _parse_v1(
    data: bytes, model: torch.nn.Module | None, limit: int
) -> tuple[dict[str, Any], bytes, torch.nn.Module | None]:
    """Format 1: a JSON manifest with names and shapes, checked against the model before use."""
    head = _Cursor(data, len(MAGIC_V1))
    (length,) = struct.unpack("<I", head.take(4))
    try:
        raw = json.loads(head.take(length).decode("utf-8"))
        tensors = [manifest_entry(e) for e in raw["tensors"]]
        spec = raw.get("model")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        _fail(f"is corrupt: its format-1 manifest cannot be read ({type(err).__name__}: {str(err)[:80]})")
    spec = None if spec is None else _named_spec(spec)
    template = None if model is None and not spec else _shape_model(spec, model, limit)
    found = {str(e["name"]): list(e["shape"]) for e in tensors}
    if template is not None and found != {k: list(v.shape) for k, v in template.state_dict().items()}:
        _fail("was written from a model whose state dict differs from this one's (names or shapes)")
    manifest = {"format": 1, "model": spec, "header_bytes": head.pos, "checksum": None, "tensors": tensors}
    return manifest, data[head.pos :], template


def _parse(
    data: bytes, model: torch.nn.Module | None, limit: int
) -> tuple[dict[str, Any], bytes, torch.nn.Module | None]:
    """Manifest, payload and the model that names the tensors (the meta-device one when built from the spec).

    Everything is checked here before anything is allocated: magic and version, the file checksum, then
    every header field and size against the model's state dict and the file's length.
    """
    if data.startswith(MAGIC_V1):
        return _parse_v1(data, model, limit)
    if not data.startswith(MAGIC[:3]) or len(data) < len(MAGIC):
        _fail(f"is not an admmcompress packed file (magic {data[:8]!r}); write one with `admmcompress export --packed`")
    version = data[len(MAGIC) - 1]
    if version == 1:  # format 1 has its own magic (ADMMPK1)
        _fail(f"is not an admmcompress packed file (magic {data[:8]!r}: no format is written so); write one with "
              "`admmcompress export --packed`")
    if version not in (2, 3, FORMAT):
        _fail(f"is format {version}; this admmcompress reads formats 1 to {FORMAT} (upgrade admmcompress to read it)")
    head = _Cursor(data, len(MAGIC))
    checksum = None
    if version >= 3:
        (recorded,) = struct.unpack("<I", head.take(4))
        actual = zlib.crc32(memoryview(data)[head.pos :])
        if actual != recorded:
            _fail(
                f"is corrupt or truncated: the CRC-32 of its {len(data) - head.pos:,} bytes after the checksum is "
                f"{actual:08x}, the file records {recorded:08x}; write it again from the run"
            )
        checksum = f"{recorded:08x}"
    (layout,) = struct.unpack("<I", head.take(4))
    spec_length = head.varint()
    if spec_length > MAX_SPEC_BYTES:
        _fail(f"is corrupt: its model spec claims {spec_length:,} bytes (at most {MAX_SPEC_BYTES:,})")
    spec = _spec(head.take(spec_length))
    template = _shape_model(spec, model, limit)
    state = template.state_dict()
    count = head.varint()
    if count != len(state) or layout != layout_checksum(state):
        _fail(
            f"was written from a model whose state dict differs from this one's "
            f"({count} tensors, layout checksum {layout:08x}; this model: {len(state)} tensors, "
            f"{layout_checksum(state):08x}); load it into an instance of the architecture it was saved from"
        )
    tensors: list[dict[str, Any]] = []
    values = list(state.values())
    for name, value in state.items():
        tensors.append(_tensor_fields(head, name, value, version, tensors, values))
    payload = data[head.pos :]
    needed = sum(entry["bytes"] for entry in tensors)
    if len(payload) != needed:
        _fail(f"has {len(payload):,} payload bytes, its header describes {needed:,} (truncated or corrupt)")
    manifest = {"format": version, "model": spec, "header_bytes": head.pos, "checksum": checksum, "tensors": tensors}
    return manifest, payload, template


def _tensor_fields(
    head: _Cursor,
    name: str,
    value: torch.Tensor,
    version: int = FORMAT,
    earlier: list[dict[str, Any]] = (),
    values: list[torch.Tensor] = (),
) -> dict[str, Any]:
    """One tensor's header fields, each checked against the model's tensor (formats 2 to 4; ``earlier``: the
    entries read before it, ``values`` the model's tensors in state-dict order, which an alias is checked against)."""
    tag = head.byte()
    entry: dict[str, Any] = {"name": name, "shape": list(value.shape)}
    if tag == ALIAS_TAG and version >= 4:  # a tied tensor: the earlier one it is, no bytes of its own
        index = head.varint()
        first = earlier[index] if index < len(earlier) else None
        if first is None or first["kind"] == "alias":
            _fail(f"is corrupt (tensor {name!r} is tied to tensor {index}, which is not an earlier stored tensor)")
        if values[index].dtype != value.dtype or list(values[index].shape) != entry["shape"]:
            _fail(f"is corrupt (tensor {name!r} is tied to {first['name']!r}, which is "
                  f"{str(values[index].dtype).removeprefix('torch.')} {list(values[index].shape)}; this model's "
                  f"{name!r} is {str(value.dtype).removeprefix('torch.')} {entry['shape']})")
        entry.update(kind="alias", of=first["name"], bytes=0)
        return entry
    if tag == RAW_TAG:
        stored = "int16" if value.dtype == torch.bfloat16 else str(value.dtype).removeprefix("torch.")
        try:
            dtype = np.dtype(stored).newbyteorder("<")
        except TypeError:
            _fail(f"tensor {name!r} is {value.dtype}, which packed files do not store")
        entry.update(kind="raw", dtype=dtype.str, bytes=value.numel() * dtype.itemsize)
        if value.dtype == torch.bfloat16:
            entry["view"] = "bfloat16"
        return entry
    scheme_index, order_index, kind_index = tag & 7, tag >> 3 & 1, tag >> 4 & 3
    if scheme_index >= len(SCHEMES) or kind_index >= len(KINDS) or tag >> 6:
        _fail(f"is corrupt (tensor {name!r}: tag {tag:#04x})")
    if not value.is_floating_point() or value.dim() < 2:
        _fail(f"is corrupt (tensor {name!r} is marked packed; only floating weight matrices and kernels are)")
    rows, cols = as_matrix(value).shape
    scheme, kind, n = SCHEMES[scheme_index], KINDS[kind_index], rows * cols
    nnz = head.varint()
    index_bits, entries = 0, nnz
    if scheme == "relative":
        index_bits = head.varint()
        fillers = head.varint()
        entries = nnz + fillers
        if not 1 <= index_bits <= MAX_INDEX_BITS or fillers > (n - min(nnz, n)) >> min(index_bits, 64):
            _fail(f"is corrupt (tensor {name!r}: {index_bits} index bits, {fillers} filler entries)")
    if kind == "float16" and value.dtype not in HALF_DTYPES:
        _fail(f"is corrupt (tensor {name!r} holds 16-bit values; the model's is {value.dtype})")
    levels = head.varint() if kind not in FLOAT_KINDS else 0
    nbytes = head.varint()
    if nnz > n or (kind not in FLOAT_KINDS and not 1 <= levels <= MAX_LEVELS) or nbytes > len(head.data):
        _fail(f"is corrupt (tensor {name!r}: {nnz} nonzeros of {n}, {levels} levels, {nbytes:,} bytes)")
    entry.update(
        kind="packed", scheme=scheme, nnz=nnz, entries=entries, index_bits=index_bits,
        order=ORDERS[order_index], value=kind, levels=levels, bytes=nbytes, dtype=str(value.dtype),
    )
    return entry


@torch.no_grad()
def load_packed(
    source: str | Path | BinaryIO, model: torch.nn.Module | None = None, max_elements: int = MAX_MODEL_ELEMENTS
) -> torch.nn.Module:
    """Rebuild the model (``model``, or the file's model spec via the registry) and load its weights.

    Nothing is built or allocated before the whole header has been checked (a model from the file's spec is
    first built on the meta device and refused above ``max_elements``); every weight is decoded and checked
    before the model is built. A corrupt, truncated or crafted file is one ``PackedFormatError``. The model comes
    back in eval mode (call ``.train()`` to fine-tune it).
    """
    data, label = _read(source)
    with _named(label):
        manifest, payload, template = _parse(data, model, max_elements)
        if template is None:  # format 1 without a spec: its shapes were checked against nothing, decode nothing
            _fail("is format 1 and names no model; pass an instance of its architecture: load_packed(path, model), "
                  "or the packed executor's load(path, skeleton)")
        state, offset = {}, 0
        for entry in manifest["tensors"]:
            entry = manifest_entry(entry)
            blob = payload[offset : offset + entry["bytes"]]
            offset += entry["bytes"]
            if entry["kind"] == "alias":  # a tied tensor (format 4): the very tensor of the name it is tied to
                state[entry["name"]] = state[entry["of"]]
            elif entry["kind"] == "packed":  # float32 values, given back at the weight's own dtype (exactly)
                state[entry["name"]] = _decode(blob, entry).to(getattr(torch, entry.get("dtype", "torch.float32")
                                                                       .removeprefix("torch.")))
            else:
                dtype = np.dtype(entry["dtype"])
                if len(blob) != dtype.itemsize * math.prod(entry["shape"]):
                    _fail(f"tensor {entry['name']!r} has {len(blob):,} bytes, its shape needs more")
                array = np.frombuffer(blob, dtype=dtype).reshape(entry["shape"])
                tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
                state[entry["name"]] = tensor.view(torch.bfloat16) if entry.get("view") == "bfloat16" else tensor
        if offset != len(payload):
            _fail(f"has {len(payload) - offset:,} bytes after its last tensor")
        model = _build(manifest["model"]) if model is None else model  # only now: everything checked
        model.load_state_dict(state)
        _tie(model, {e["name"]: e["of"] for e in manifest["tensors"] if e["kind"] == "alias"})
    _note_unchecked(manifest, label)
    return model.eval()  # for inference, as from_pretrained: a BatchNorm in train mode would give other outputs


def _tie(model: torch.nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias name the very tensor of the name it is tied to (a model built untied gets its ties back;
    one built tied, as its architecture ties them, already is). A name that is no module's parameter or buffer
    (a module's own state-dict entry) is left as loaded: its values are the tied tensor's."""
    for name, first in aliases.items():
        try:
            (module, attr), (source, source_attr) = (
                (model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in (name, first)
            )
        except AttributeError:
            continue
        for table, source_table in ((module._parameters, source._parameters), (module._buffers, source._buffers)):
            if attr in table and source_attr in source_table and table[attr] is not source_table[source_attr]:
                table[attr] = source_table[source_attr]


def save_packed_bytes(model: torch.nn.Module, **kwargs: Any) -> bytes:
    """The packed file as bytes (for tests and size checks)."""
    buffer = io.BytesIO()
    save_packed(model, buffer, **kwargs)
    return buffer.getvalue()


def packed_size_lines(size: int, summary: PackedSummary, report: Any, scheme: str = "best") -> list[str]:
    """The packed file's size against the storage report (SPEC 4.2), every byte of difference named.

    ``report`` is the model's ``report.storage.StorageReport`` (its ``bits(scheme)``, ``other_bits`` and
    ``buffer_bits`` are read). The report counts weight bits (codes, indices, codebooks) and, apart, the
    other parameters and the buffers (BN statistics); the file adds the container header and each packed
    weight's last partial byte. A tied tensor is one tensor to both: counted once, stored once (its other names are
    alias entries of the header). A report of 0 B (every weight empty, no other tensor) has no ratio: "n/a".
    """
    weight_bits, other_bits = report.bits(scheme), report.other_bits
    buffer_bits = getattr(report, "buffer_bits", 0)
    figure = (weight_bits + other_bits + buffer_bits) / 8
    raw = sum(summary.raw_weights.values())
    buffers = summary.other_bytes - raw - (other_bits + buffer_bits) / 8
    aliases = getattr(summary, "aliases", {})  # (a summary pickled before ties were stored once has none)
    lines = [] if not raw else [
        f"stored raw, not coded: {', '.join(summary.raw_weights)} ({raw:,} B: float64 values that float32 cannot "
        "hold, which the report counts as float32 weights); convert the model with model.float() to code them"
    ]
    return lines + [
        f"storage report (SPEC 4.2): weights {weight_bits:,} bits = {weight_bits / 8:,.1f} B, "
        f"other parameters {other_bits / 8:,.0f} B"
        + (f", buffers {buffer_bits / 8:,.0f} B" if buffer_bits else "") + f"; together {figure:,.1f} B",
        f"container overhead: header {summary.header_bytes:,} B (format, checksums, model spec, "
        f"per-tensor scheme/nnz/length"
        + (f"; {len(aliases)} tied tensor(s) stored once, as alias entries: "
           + ", ".join(f"{name} = {first}" for name, first in aliases.items()) if aliases else "")
        + f"), byte padding {summary.padding_bits:,} bits ({len(summary.schemes)} packed weights)"
        + (f", buffers not in the report {buffers:,.0f} B" if buffers else ""),
        f"packed file: {size:,} B = {summary.header_bytes:,} header + {summary.weight_bytes:,} weights + "
        f"{summary.other_bytes:,} other tensors; file / report = "
        + (f"{size / figure:.4f} ({100 * (size / figure - 1):+.2f}%)" if figure else
           "n/a (the report counts 0 B: no weight, other parameter or buffer holds a value)"),
    ]


def _index_bits(value: int | str) -> int | str:
    """``"best"`` or an integer ``b_r`` in 1..``MAX_INDEX_BITS`` (the command line gives strings)."""
    if value == "best":
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):  # the command line's "4" (or "-1")
        value = int(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy's int64 too
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):  # 2.5 or True: int() would read them as 2 or 1
        raise ValueError(f"index_bits={value!r}: give a positive integer (relative index bits b_r) or 'best'")
    if not 1 <= value <= MAX_INDEX_BITS:
        raise ValueError(
            f"index_bits={value} must be in 1..{MAX_INDEX_BITS} (relative index bits b_r; {MAX_INDEX_BITS} bits "
            f"already skip {2**MAX_INDEX_BITS - 1:,} zeros per entry), or best"
        )
    return value


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
        restored = self.load(out).eval()  # from the file's model spec alone (factorized convs included)
        for name, value in model.state_dict().items():
            if not torch.equal(value, restored.state_dict()[name]):
                raise RuntimeError(f"packed round trip changed '{name}'; please report this as a bug")
        x = run.example(8)
        was_training = model.training
        with torch.no_grad():
            before, after = model.eval()(x), restored(x)
        model.train(was_training)
        if not torch.equal(before, after):  # printed as "identical: False" and exit 0 before (a review's nit)
            diff = float((before - after).abs().max()) if before.shape == after.shape else float("nan")
            raise RuntimeError(f"the model loaded from the packed file gives other outputs (largest difference "
                               f"{diff:.3g}) with a bit-identical state dict; please report this as a bug")
        report = run.storage(index_bits=index_bits)
        lines = [report.render(), *packed_size_lines(Path(out).stat().st_size, summary, report, scheme)]
        lines.append("round trip: state dict bit-identical, outputs identical (eval mode)")
        return "\n".join(lines)


__all__ = [
    "BitReader",
    "BitWriter",
    "MAX_INDEX_BITS",
    "MAX_MODEL_ELEMENTS",
    "PackedExecutor",
    "PackedFormatError",
    "PackedFormatWarning",
    "PackedSummary",
    "layout_checksum",
    "load_packed",
    "manifest_entry",
    "packed_size_lines",
    "read_manifest",
    "save_packed",
    "save_packed_bytes",
    "tied_names",
]

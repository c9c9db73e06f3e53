"""How compressed weights are coded and what each coding costs, exactly as SPEC 4.2 counts it.

The lower module under both ``report.storage`` (the storage table of a model) and the executors
that write the bits for real (``executors.packed``, ``executors.onnx_export``): value formats and
their codes, relative-index gaps and filler entries, the bit formulas of every scheme and
``layer_storage`` (one weight under every scheme). It imports only ``structures.groups`` (the
GEMM view), so nothing above it is ever pulled in by an executor.

For one weight with ``N`` entries, ``nnz`` nonzeros, GEMM shape ``R x C`` and value bits ``b``:

=============  =========================================================================================
scheme         bits
=============  =========================================================================================
dense          ``N * b0``
bitmask        ``N + nnz * b``
relative       ``E * (b' + b_r) + (C + 1) * ceil(log2(E + 1))``, ``E = nnz + sum_j floor(d_j / 2^b_r)``
csr            ``nnz * (b + ceil(log2 C)) + (R + 1) * ceil(log2(nnz + 1))``
structured     ``kept_rows * kept_cols * b0' + R + C`` (``+ 0`` instead of ``R + C`` when compacted)
=============  =========================================================================================

plus the layer's codebook in every scheme. ``d_j`` is the number of zeros before the j-th nonzero
of a column (counted from the column start; columns scanned top to bottom, EIE style, or rows with
``order="row"``); a relative index of ``b_r`` bits skips at most ``2^b_r - 1`` zeros, so each
``2^b_r`` zeros of a gap cost one filler entry (a stored zero).

**Value bits, read off the weights.** The distinct nonzero values of the weight are its levels
(``K`` of them). A nonzero costs ``b = ceil(log2 K)`` bits (at least 1). Formats that also store
zeros (dense with pruned entries, fillers of the relative index, zeros inside a structured block)
need a code for zero: ``b0 = ceil(log2(K + 1))``. The codebook is, whichever is cheaper for the
layer: a *table* of ``K`` float32 values (``32 K`` bits, SPEC's clustering codebook), or, when
every level is ``s * c`` for one float32 scale ``s`` and integers ``c`` (fixed-point, binary,
ternary, power of two with small exponent range), a *grid*: ``s`` (32 bits) plus the lowest and
highest ``c`` (16 bits each), codes numbering the integers in between with zero skipped; or plain
float32 (``b = b0 = 32``, no codebook) for unquantized layers. Biases and other parameters are
reported apart, at their own dtype's width (SPEC 4.2: the papers count weights only).

>>> w = torch.tensor([[0.5, 0, 0, 0, 0, 0, -0.5, 0.5, 0.5, -0.5]]).T   # one column; a gap of 5 zeros
>>> layer = layer_storage("w", w, index_bits=2)
>>> layer.value.kind, layer.value.code_bits, layer.value.zero_bits, layer.entries   # +-0.5: 1 filler
('grid', 1, 2, 6)
>>> layer.bits["relative"]      # 6 entries * (2-bit code with zero + 2) + 2 pointers * 3 bits + grid 64
94
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from admmcompress.structures.groups import as_matrix, factor_params, gemm_params

SCHEMES = ("dense", "bitmask", "relative", "csr", "structured")
MAX_LEVELS = 2**16  # more distinct values than this: treated as unquantized float32
GRID_INT_BITS = 16  # lowest/highest integer of a grid codebook


def clog2(x: int) -> int:
    """``ceil(log2 x)`` for integers >= 1 (0 for x = 1).

    >>> [clog2(x) for x in (1, 2, 3, 4, 5, 256, 257)]
    [0, 1, 2, 2, 3, 8, 9]
    """
    if x < 1:
        raise ValueError(f"clog2: x={x} must be >= 1")
    return (x - 1).bit_length()


# --- value formats --------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueFormat:
    """How a layer's nonzero values are coded: ``float32``, a ``grid`` ``s * c`` or a ``table``."""

    kind: str
    levels: int
    code_bits: int
    zero_bits: int
    table_bits: int
    scale: float | None = None
    low: int | None = None
    high: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FLOAT32 = ValueFormat("float32", 0, 32, 32, 0)
FLOAT16 = ValueFormat("float16", 0, 16, 16, 0)  # a float16 or bfloat16 weight's own 16 bits, raw
HALF_DTYPES = (torch.float16, torch.bfloat16)


def float_bits(weight: torch.Tensor) -> int:
    """Bits of one value of an unquantized ``weight`` at its own width: 16 for half types, else 32 (float64
    weights are counted as float32, the storage baseline; ``executors.packed`` stores those float32 cannot hold
    raw and names them)."""
    return 16 if weight.dtype in HALF_DTYPES else 32


def table_format(k: int) -> ValueFormat:
    return ValueFormat("table", k, max(1, clog2(max(k, 1))), clog2(k + 1), 32 * k)


def grid_format(k: int, scale: float, low: int, high: int) -> ValueFormat:
    count = high - low + 1 - (1 if low <= 0 <= high else 0)
    return ValueFormat(
        "grid", k, max(1, clog2(count)), clog2(count + 1), 32 + 2 * GRID_INT_BITS, scale, low, high
    )


def grid_of(levels: torch.Tensor, max_divisor: int = 512) -> tuple[float, int, int] | None:
    """``(s, low, high)`` if every level is exactly ``float32(s) * c`` for integers ``c``, else None.

    ``s`` is the largest step found: ``min|level| / m`` for ``m = 1, 2, ...`` (levels a quantizer
    did not use leave gaps, so the step can be a fraction of the smallest level), refined by least
    squares over all levels and checked exactly in float32 (with its neighbouring floats).

    >>> grid_of(torch.tensor([-0.75, 0.5, 1.25]))
    (0.25, -3, 5)
    """
    levels = levels.to(torch.float32)
    if levels.numel() == 0:
        return None
    wide = levels.to(torch.float64)
    smallest = float(wide.abs().min())
    limit = 2 ** (GRID_INT_BITS - 1) - 1
    for m in range(1, max_divisor + 1):
        rough = smallest / m
        c = torch.round(wide / rough)
        if float(c.abs().max()) > limit:
            return None
        if float((wide / rough - c).abs().max()) > 1e-3:
            continue  # not even approximately a grid of this step
        fitted = float((wide * c).sum() / (c * c).sum())  # least squares: far below an ulp from s
        base = torch.tensor(fitted, dtype=torch.float32)
        for step in (base, torch.nextafter(base, base * 2), torch.nextafter(base, base * 0)):
            if bool(step > 0) and torch.equal(step * c.to(torch.float32), levels):
                return float(step), int(c.min()), int(c.max())
    return None


def value_formats(weight: torch.Tensor) -> list[ValueFormat]:
    """Every coding that holds the weight's distinct nonzero values: float32, a table, a grid where one fits."""
    values = weight.detach().reshape(-1)
    levels = torch.unique(values[values != 0].to(torch.float32))
    k = levels.numel()
    raw = FLOAT16 if float_bits(weight) == 16 else FLOAT32
    if k > MAX_LEVELS:
        return [raw]
    options = [raw, table_format(k)]
    grid = grid_of(levels)
    if grid is not None:
        options.append(grid_format(k, *grid))
    return options


def value_format(weight: torch.Tensor, nnz: int | None = None) -> ValueFormat:
    """The coding with the fewest bits for the nonzero values alone (``layer_storage`` also weighs zero codes).

    >>> value_format(torch.tensor([[0.5, -0.5], [0.0, 1.0]])).kind
    'grid'
    """
    values = weight.detach().reshape(-1)
    nnz = int((values != 0).sum()) if nnz is None else nnz
    return min(value_formats(weight), key=lambda f: (nnz * f.code_bits + f.table_bits, f.kind != "grid"))


def codes_of(weight: torch.Tensor, fmt: ValueFormat) -> torch.Tensor:
    """Integer code of every entry: ``0`` for zero, ``1..`` for nonzeros (int64, weight's shape).

    Formats that never store zeros subtract 1 (see ``executors.packed``); float32 has no codes.
    """
    flat = weight.detach().reshape(-1).to(torch.float32)
    codes = torch.zeros(flat.shape, dtype=torch.int64)
    nz = flat != 0
    if fmt.kind == "table":
        levels = torch.unique(flat[nz])
        codes[nz] = torch.searchsorted(levels, flat[nz]) + 1
    elif fmt.kind == "grid":
        c = torch.round(flat[nz].to(torch.float64) / fmt.scale).to(torch.int64)
        index = c - fmt.low
        if fmt.low <= 0 <= fmt.high:
            index = torch.where(c > 0, index - 1, index)
        codes[nz] = index + 1
    else:
        raise ValueError("codes_of: float32 values have no codes; store them as raw float32")
    return codes.view(weight.shape)


def levels_of(fmt: ValueFormat, table: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 value of each nonzero code ``0..``: the table itself, or ``s * c`` over the grid."""
    if fmt.kind == "table":
        return table.to(torch.float32)
    c = torch.arange(fmt.low, fmt.high + 1, dtype=torch.float32)
    c = c[c != 0]
    return torch.tensor(fmt.scale, dtype=torch.float32) * c


# --- the SPEC 4.2 formulas ------------------------------------------------------------------


def relative_gaps(mask: torch.Tensor, order: str = "column") -> torch.Tensor:
    """Zeros before each nonzero in its column (``order="column"``) or row, from the line start.

    >>> relative_gaps(torch.tensor([[1, 0], [0, 0], [1, 1]], dtype=torch.bool)).tolist()
    [0, 1, 2]
    """
    if order not in ("column", "row"):
        raise ValueError(f"order={order!r}; choose 'column' (EIE) or 'row'")
    lines = mask.t() if order == "column" else mask
    idx = torch.nonzero(lines)  # sorted by line, then position
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    line, pos = idx[:, 0], idx[:, 1]
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])
    starts = torch.cat([torch.ones(1, dtype=torch.bool), line[1:] != line[:-1]])
    prev = torch.where(starts, torch.full_like(prev, -1), prev)
    return pos - prev - 1


def relative_entries(gaps: torch.Tensor, index_bits: int) -> int:
    """``E = nnz + sum_j floor(d_j / 2^b_r)``: nonzeros plus filler entries.

    >>> relative_entries(torch.tensor([0, 3, 4, 9]), 2)   # fillers: 0 + 0 + 1 + 2
    7
    """
    return int(gaps.numel() + (gaps >> index_bits).sum())


def dense_bits(n: int, b: int) -> int:
    return n * b


def bitmask_bits(n: int, nnz: int, b: int) -> int:
    return n + nnz * b


def relative_bits(entries: int, lines: int, b: int, index_bits: int) -> int:
    """``E (b + b_r) + (lines + 1) ceil(log2(E + 1))`` (lines = columns, or rows for row order)."""
    return entries * (b + index_bits) + (lines + 1) * clog2(entries + 1)


def csr_bits(nnz: int, rows: int, cols: int, b: int) -> int:
    return nnz * (b + clog2(cols)) + (rows + 1) * clog2(nnz + 1)


def structured_bits(
    kept_rows: int, kept_cols: int, rows: int, cols: int, b: int, compacted: bool = False
) -> int:
    return kept_rows * kept_cols * b + (0 if compacted else rows + cols)


# --- one layer, a model ---------------------------------------------------------------------


@dataclass
class LayerStorage:
    """Storage of one weight under every scheme (``bits`` include the codebook)."""

    name: str
    shape: list[int]
    rows: int
    cols: int
    params: int
    nnz: int
    value: ValueFormat
    index_bits: int
    order: str
    entries: int
    kept_rows: int
    kept_cols: int
    bits: dict[str, int] = field(default_factory=dict)
    dense_value_bits: int = 32  # one unpruned, unquantized value: the baseline (16 for a half-precision weight)

    @property
    def best(self) -> str:
        return min(SCHEMES, key=lambda s: (self.bits[s], SCHEMES.index(s)))

    @property
    def weight_reduction(self) -> float:
        return ratio(self.params, self.nnz)

    def storage_reduction(self, scheme: str | None = None) -> float:
        return ratio(self.dense_value_bits * self.params, self.bits[scheme or self.best])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            best=self.best, weight_reduction=self.weight_reduction, storage_reduction=self.storage_reduction()
        )
        return out


# Widest relative index b_r: 32 bits already skip 4,294,967,295 zeros per entry, more than any weight matrix
# holds (a packed file's model has at most executors.packed.MAX_MODEL_ELEMENTS); wider ones overflow the int64
# skips the encoder builds.
MAX_INDEX_BITS = 32


def layer_storage(
    name: str,
    weight: torch.Tensor,
    index_bits: int | str = "best",
    order: str = "column",
    compacted: bool = False,
) -> LayerStorage:
    """Bits of ``weight`` under every SPEC 4.2 scheme; ``index_bits`` = ``b_r`` or ``"best"`` (1..16)."""
    matrix = as_matrix(weight.detach())
    rows, cols = matrix.shape
    mask = matrix != 0
    nnz = int(mask.sum())
    gaps = relative_gaps(mask, order)
    lines = cols if order == "column" else rows
    choices = range(1, 17) if index_bits == "best" else [index_bits]
    if index_bits != "best" and (
        isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= MAX_INDEX_BITS
    ):
        raise ValueError(f"index_bits={index_bits!r} must be an integer b_r in 1..{MAX_INDEX_BITS} (as packed files "
                         "take) or 'best'")
    entries_at = {r: relative_entries(gaps, r) for r in choices}
    kept_r, kept_c = mask.any(dim=1), mask.any(dim=0)
    kr, kc = int(kept_r.sum()), int(kept_c.sum())

    def layer(fmt: ValueFormat) -> LayerStorage:
        def rel(b_r: int) -> int:
            entries = entries_at[b_r]
            return relative_bits(entries, lines, fmt.zero_bits if entries > nnz else fmt.code_bits, b_r)

        b_r = min(choices, key=lambda r: (rel(r), r))
        bits = {
            "dense": dense_bits(rows * cols, fmt.zero_bits if nnz < rows * cols else fmt.code_bits),
            "bitmask": bitmask_bits(rows * cols, nnz, fmt.code_bits),
            "relative": rel(b_r),
            "csr": csr_bits(nnz, rows, cols, fmt.code_bits),
            "structured": structured_bits(
                kr, kc, rows, cols, fmt.zero_bits if kr * kc > nnz else fmt.code_bits, compacted
            ),
        }
        bits = {k: v + fmt.table_bits for k, v in bits.items()}
        return LayerStorage(
            name, list(weight.shape), rows, cols, rows * cols, nnz, fmt, b_r, order, entries_at[b_r], kr, kc, bits,
            float_bits(weight),
        )

    # The format is chosen with its zero code counted (a grid's zero code can be a bit wider than a table's).
    return min((layer(f) for f in value_formats(weight)), key=lambda s: (s.bits[s.best], s.value.kind != "grid"))


def ratio(num: float, den: float) -> float:
    """``num / den``; 1.0 when both are 0 (nothing to compress), inf when only ``den`` is."""
    if den:
        return num / den
    return math.inf if num else 1.0


def weight_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose weights are matrices or kernels (what storage counts by default).

    >>> import torch.nn as nn
    >>> weight_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)))
    ['0', '3']
    """
    out = []
    for name, module in model.named_modules():
        params = gemm_params(module)
        if params and all(getattr(module, p).dim() >= 2 for p in params):
            out.append(name)
    return out


def weight_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"layer.param": tensor}`` of every weight matrix or kernel ``weight_layers`` names (what is coded).

    >>> import torch.nn as nn
    >>> list(weight_tensors(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))))
    ['0.weight']
    """
    modules = dict(model.named_modules())
    out = {}
    for name in weight_layers(model):
        for param, tensor in layer_weights(modules[name]):
            out[f"{name}.{param}" if name else param] = tensor
    return out


def layer_weights(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the weights a layer stores: its GEMM weights (``gemm_params``), or, of a factorized
    layer (``Tucker2Conv``, ``SharedKernelConv``), its factors' weights, not the dense ``weight`` they make.

    >>> [n for n, _ in layer_weights(torch.nn.Linear(4, 3))]
    ['weight']
    """
    factors = factor_params(module)
    if factors:
        return [(p, module.get_parameter(p)) for p in factors]
    return [(p, getattr(module, p)) for p in gemm_params(module)]


__all__ = [
    "FLOAT16",
    "FLOAT32",
    "GRID_INT_BITS",
    "MAX_INDEX_BITS",
    "MAX_LEVELS",
    "SCHEMES",
    "LayerStorage",
    "ValueFormat",
    "bitmask_bits",
    "clog2",
    "codes_of",
    "csr_bits",
    "dense_bits",
    "float_bits",
    "grid_format",
    "grid_of",
    "layer_storage",
    "layer_weights",
    "levels_of",
    "ratio",
    "relative_bits",
    "relative_entries",
    "relative_gaps",
    "structured_bits",
    "table_format",
    "value_format",
    "value_formats",
    "weight_layers",
    "weight_tensors",
]

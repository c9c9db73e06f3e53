"""Quantization structures: the level sets a layer's weights may take, with Euclidean projections.

Every structure here maps a weight tensor to ``levels[codes]``: a small sorted set of nonzero
``levels`` (per layer) and one integer code per weight. Weights that are exactly zero are
*pruned* and skipped: they take no level, stay zero, and do not influence the levels (SPEC P10:
zero is not a level for the nonzero weights, so quantization never silently prunes). Ternary is the
one set with a zero level; the zeros it creates count as pruned.

================  =========================================  ==============================================
structure         level set (per layer, scale chosen freely)  how the projection is computed
================  =========================================  ==============================================
``fixed_point``   ``q * {+-1, ..., +-2^(b-1)}`` (``2^b`` levels)  exact over all ``q > 0`` (see below)
``power_of_two``  ``{+-2^(e-j) : j = 0..2^(b-1)-1}``             exact over all integer ``e``
``binary``        ``{-a, +a}``                                  ``a = mean|w|`` (exact)
``ternary``       ``{-a, 0, +a}``                               best ``k`` of the sorted ``|w|`` (exact)
``clustering``    ``k`` shared values learned by 1-D k-means    Lloyd to a fixed point (a local optimum)
================  =========================================  ==============================================

**Fixed-point interval.** ADMM-NN's released code scans ``q`` over ``[0.9, 1.1] * max|w|/n`` (SPEC
2.1). We minimize the squared error over *every* ``q > 0`` instead: with magnitudes ``a_i`` and
``n = 2^(b-1)``, the best code of ``a_i`` changes from ``c`` to ``c+1`` only where ``q`` crosses
``a_i/(c+1/2)``. Between two such breakpoints the codes are fixed and the error
``S_aa - 2q S_ac + q^2 S_cc`` is a parabola in ``q`` with minimum at ``S_ac/S_cc``; sorting all
breakpoints and scanning the intervals with running sums finds the global minimum exactly. That
costs ``N*(n-1)`` breakpoints; above ``EXACT_BREAKPOINTS`` (e.g. 8-bit on a large layer) we evaluate
ADMM-NN's 201 candidates plus 64 geometric ones between ``max|w|/(50 n)`` and ``2 max|w|/n`` and
refine the best by alternating "best codes for q" / "best q for codes" steps, each of which cannot
increase the error. For a chosen ``q`` the codes are always exact (nearest level).

>>> w = torch.tensor([0.9, -0.2, 0.0, 0.45, -1.1])
>>> FixedPoint(bits=2).project(w)          # levels q*{+-1, +-2}, q = 0.465; the pruned 0 stays 0
tensor([ 0.9300, -0.4650,  0.0000,  0.4650, -0.9300])
>>> Binary().project(w)                   # a = mean |w| over the nonzeros
tensor([ 0.6625, -0.6625,  0.0000,  0.6625, -0.6625])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from admmcompress.structures.base import Structure, register_structure
from admmcompress.structures.groups import gemm_params
from admmcompress.structures.scalars import plain_number

EXACT_BREAKPOINTS = 2_000_000  # fixed-point: exact interval search when N*(n-1) is at most this
MAX_BITS = 16


@dataclass(frozen=True)
class Quantized:
    """A quantized tensor: ``levels`` (sorted, nonzero, shape ``(K,)``) and ``codes`` (int64, -1 = zero).

    >>> Quantized(torch.tensor([-1.0, 2.0]), torch.tensor([1, -1, 0])).decode()
    tensor([ 2.,  0., -1.])
    """

    levels: torch.Tensor
    codes: torch.Tensor

    def decode(self) -> torch.Tensor:
        """The tensor itself: ``levels[codes]``, zero where ``codes == -1``."""
        if self.levels.numel() == 0:
            return torch.zeros(self.codes.shape, dtype=self.levels.dtype, device=self.levels.device)
        values = self.levels[self.codes.clamp(min=0)]
        return torch.where(self.codes >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class QuantizationStructure(Structure):
    """Base class: every nonzero weight of the layer takes one of a few per-layer levels.

    Subclasses implement ``_quantize(magnitudes or values)``; this class handles pruned zeros,
    dtypes and the plan interface (``kind``, ``check_module``, ``support``, ``project``, ``to_dict``).
    """

    quantizes: ClassVar[bool] = True
    #: How the finalizer keeps values during retraining: "hold" (frozen) or "centroids" (learned).
    update: ClassVar[str] = "hold"
    #: A quantization target removes no weight: it never lowers the sparsity a plan asks for.
    target_sparsity: ClassVar[float] = 0.0

    def with_sparsity(self, sparsity: float) -> QuantizationStructure:
        """Unchanged (gradual schedules raise sparsity targets only)."""
        return self

    @property
    def code_bits(self) -> int:
        """Bits of one stored nonzero code (zero needs no code: it is pruned)."""
        raise NotImplementedError

    # --- the plan interface -----------------------------------------------------------
    def check_module(self, module: torch.nn.Module, name: str) -> None:
        """Raise if ``module`` has no weight tensor to quantize."""
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(
                f"layer '{name}' ({type(module).__name__}) has no 'weight' tensor to quantize; "
                "narrow the rule so it matches layers with weights"
            )
        if module.weight.dim() < 2:
            raise ValueError(
                f"layer '{name}' ({type(module).__name__}) has a 1-D weight (one scale per channel): quantizing it "
                "saves no storage (the report and packed files keep it with the biases) and costs accuracy; drop it "
                "from the rule"
            )

    def params(self, module: torch.nn.Module) -> list[str]:
        """Names of the module's weight matrices this structure quantizes (one target each)."""
        return gemm_params(module)

    def bind(self, module: torch.nn.Module, param: str) -> QuantizationStructure:
        """This structure for ``module.<param>``: quantization needs no specialisation."""
        return self

    def support(self, weight: torch.Tensor) -> torch.Tensor:
        """All True: quantizing keeps every weight (hard pruning intersects masks with this)."""
        return torch.ones_like(weight, dtype=torch.bool)

    # --- the projection ---------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> Quantized:
        """Levels and codes of the projection of ``weight`` (pruned zeros get code -1)."""
        flat = weight.detach().reshape(-1)
        nonzero = flat != 0
        codes = torch.full(flat.shape, -1, dtype=torch.int64, device=flat.device)
        if not bool(nonzero.any()):
            return Quantized(flat.new_zeros(0), codes.view(weight.shape))
        values = flat[nonzero].to(torch.float64)
        if not bool(torch.isfinite(values).all()):  # one NaN made FixedPoint zero the whole layer (a review)
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(
                f"{type(self).__name__}: the weight holds {bad} NaN/inf value(s); quantization needs finite weights "
                "(training diverged: lower the learning rate or rho)"
            )
        levels, sub_codes = self._quantize(values)
        levels = storable_levels(levels, weight.dtype)
        sub_codes = _representable(self, values, levels, sub_codes, weight.dtype)
        # Levels that round to the same value in the weight's dtype are one level.
        levels, remap = torch.unique(levels, sorted=True, return_inverse=True)
        sub_codes = torch.where(sub_codes >= 0, remap[sub_codes.clamp(min=0)], sub_codes)
        used = torch.zeros(levels.numel(), dtype=torch.bool, device=flat.device)
        used[sub_codes[sub_codes >= 0]] = True
        if not bool(used.all()):  # drop unused levels and renumber
            new_index = torch.cumsum(used, 0) - 1
            levels = levels[used]
            sub_codes = torch.where(sub_codes >= 0, new_index[sub_codes.clamp(min=0)], sub_codes)
        codes[nonzero] = sub_codes
        return Quantized(levels, codes.view(weight.shape))

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest point of the level set to ``weight`` (a new tensor; zeros stay zero)."""
        return self.quantize(weight).decode().to(weight.dtype)

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``values``: the nonzero weights (float64, 1-D). Returns (levels, codes into levels)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.kind}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> QuantizationStructure:
        """From ``{"bits": b}`` (or ``{"clusters": k}``); target keys this structure does not take raise.

        >>> FixedPoint.from_dict({"structure": "fixed_point", "bits": 4})
        FixedPoint(bits=4)
        """
        cls._check_keys(spec)
        if "bits" in cls.options:
            if spec.get("bits") is None:
                raise ValueError(f"{cls.__name__}: give bits, e.g. {{structure: {cls.kind}, bits: 4}}")
            return cls(bits=spec["bits"])
        return cls()

    @classmethod
    def _check_keys(cls, spec: Mapping[str, Any]) -> None:
        """Raise if the rule gives a target key (bits, clusters, sparsity, ...) this structure does not take."""
        allowed = set(cls.options)
        given = {key for key in spec if key in QUANT_KEYS | {"sparsity", "compression"} and spec[key] is not None}
        extra = sorted(given - allowed)
        if extra:
            hint = (
                " (add a separate rule for pruning: each target gets its own Z/U)"
                if {"sparsity", "compression"} & set(extra)
                else ""
            )
            raise ValueError(
                f"structure '{cls.kind}' takes {sorted(allowed) or 'no target keys'}, not {extra}{hint}"
            )

    @classmethod
    def example(cls) -> QuantizationStructure:
        return cls()


def _plain(structure: Structure, *keys: str) -> None:
    """Numpy/torch scalars given for ``keys`` become the Python numbers they hold (frozen dataclass)."""
    for key in keys:
        object.__setattr__(structure, key, plain_number(getattr(structure, key)))


def _check_bits(name: str, bits: Any, low: int = 1) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= MAX_BITS:
        raise ValueError(
            f"{name}: bits={bits!r} must be an integer in [{low}, {MAX_BITS}], e.g. bits: 4 "
            "(bits per stored nonzero weight)"
        )


def _representable(
    structure: Structure, values: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``codes`` with every value whose level the stored dtype cannot hold (a float16 ``q * c`` past 65504 became
    inf, a tiny one 0: a review's finding) moved to the nearest level of its sign that it can hold."""
    valid = torch.isfinite(levels) & (levels != 0)
    moved = (codes >= 0) & ~valid[codes.clamp(min=0)]
    if not bool(moved.any()):
        return codes
    codes = codes.clone()
    for side, members in ((levels > 0, moved & (values > 0)), (levels < 0, moved & (values < 0))):  # keep the sign
        choice = torch.nonzero(valid & side).flatten()  # ascending, as the levels are
        if not bool(members.any()):
            continue
        if choice.numel() == 0:
            held = "float32 (its codebook's width)" if dtype == torch.float64 else str(dtype).removeprefix("torch.")
            magnitudes = values.abs()
            raise ValueError(
                f"{type(structure).__name__}: no level near the weights (|w| {float(magnitudes.min()):.3g} to "
                f"{float(magnitudes.max()):.3g}) is a finite nonzero {held} value; rescale the layer's weights"
            )
        codes[members] = choice[_nearest(values[members], levels[choice].to(torch.float64))]
    return codes


def _signed(magnitude_levels: torch.Tensor, magnitude_codes: torch.Tensor, values: torch.Tensor):
    """Levels ``-m[::-1] ++ m`` and codes for sign * magnitude (levels sorted ascending)."""
    n = magnitude_levels.numel()
    levels = torch.cat([-magnitude_levels.flip(0), magnitude_levels])
    codes = torch.where(values > 0, n + magnitude_codes, n - 1 - magnitude_codes)
    return levels, codes


# --- fixed point ----------------------------------------------------------------------------


def best_interval(magnitudes: torch.Tensor, n: int) -> float:
    """The ``q > 0`` minimizing ``sum_i min_c (a_i - q c)^2`` over codes ``c`` in ``1..n``.

    Exact (breakpoint scan, see the module docstring) when ``len(a)*(n-1) <= EXACT_BREAKPOINTS``,
    otherwise the best of 265 candidates refined by alternating minimization.

    >>> best_interval(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), 4)
    1.0
    """
    a = magnitudes.to(torch.float64)
    if n == 1:
        return float(a.mean())
    if a.numel() * (n - 1) <= EXACT_BREAKPOINTS:
        return _exact_interval(a, n)
    return _searched_interval(a, n)


def _exact_interval(a: torch.Tensor, n: int) -> float:
    k = torch.arange(1, n, dtype=torch.float64, device=a.device)  # code k -> k+1 below q = a/(k+1/2)
    breaks = (a[:, None] / (k + 0.5)).reshape(-1)
    delta_ac = a[:, None].expand(-1, n - 1).reshape(-1)
    delta_cc = (2 * k + 1).expand(a.numel(), -1).reshape(-1)
    order = torch.argsort(breaks, descending=True, stable=True)
    breaks, delta_ac, delta_cc = breaks[order], delta_ac[order], delta_cc[order]
    zero = a.new_zeros(1)
    s_ac = a.sum() + torch.cat([zero, torch.cumsum(delta_ac, 0)])  # all codes 1 as q -> infinity
    s_cc = a.numel() + torch.cat([zero, torch.cumsum(delta_cc, 0)])
    s_aa = (a * a).sum()
    hi = torch.cat([a.new_full((1,), math.inf), breaks])
    lo = torch.cat([breaks, zero])
    q = torch.minimum(torch.maximum(s_ac / s_cc, lo), hi)
    error = s_aa - 2 * q * s_ac + q * q * s_cc
    return float(q[int(torch.argmin(error))])


def _codes_for(a: torch.Tensor, q: float, n: int) -> torch.Tensor:
    return torch.clamp(torch.floor(a / q + 0.5), 1, n)


def _searched_interval(a: torch.Tensor, n: int) -> float:
    top = float(a.max()) / n
    grid = torch.cat(
        [
            top * (0.9 + 0.001 * torch.arange(201, dtype=torch.float64)),  # ADMM-NN's scan
            top * torch.logspace(math.log10(0.02), math.log10(2.0), 64, dtype=torch.float64),
        ]
    )
    best_q, best_err = top, math.inf
    for chunk in grid.split(16):
        codes = torch.clamp(torch.floor(a[None, :] / chunk[:, None] + 0.5), 1, n)
        err = ((a[None, :] - chunk[:, None] * codes) ** 2).sum(1)
        i = int(torch.argmin(err))
        if float(err[i]) < best_err:
            best_q, best_err = float(chunk[i]), float(err[i])
    for _ in range(50):  # alternating minimization: never increases the error
        codes = _codes_for(a, best_q, n)
        q = float((a * codes).sum() / (codes * codes).sum())
        err = float(((a - q * _codes_for(a, q, n)) ** 2).sum())
        if not err < best_err:
            break
        best_q, best_err = q, err
    return best_q


@register_structure("fixed_point", aliases=("fixed",))
@dataclass(frozen=True)
class FixedPoint(QuantizationStructure):
    """Symmetric fixed point, ``bits`` per nonzero: levels ``q*{+-1, ..., +-2^(bits-1)}``, best ``q``.

    Zero is not a level (it means "pruned"), so ``2^bits`` levels: one sign bit and ``bits-1``
    magnitude bits. ``bits=1`` is binary. The interval ``q`` minimizes the projection error.

    >>> FixedPoint(bits=3).project(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    tensor([0.1000, 0.2000, 0.3000, 0.4000])
    """

    bits: int = 8
    options: ClassVar[tuple[str, ...]] = ("bits",)

    def __post_init__(self) -> None:
        _plain(self, "bits")
        _check_bits(type(self).__name__, self.bits)

    @classmethod
    def example(cls) -> FixedPoint:
        return cls(bits=2)

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = 2 ** (self.bits - 1)
        a = values.abs()
        q = best_interval(a, n)
        # Levels are formed in float32 as q32 * c so that storage can recognise the integer grid.
        q32 = torch.tensor(q, dtype=torch.float32).to(torch.float64)
        magnitudes = q32 * torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
        # Nearest magnitude for the final q (midpoints between q*c and q*(c+1)).
        codes = (_codes_for(a, float(q32), n) - 1).to(torch.int64)
        return _signed(magnitudes, codes, values)

    @property
    def code_bits(self) -> int:
        return self.bits

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.kind, "bits": self.bits}


# --- power of two --------------------------------------------------------------------------


def _nearest(a: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``magnitudes`` to each ``a`` (ties to the lower one)."""
    mids = (magnitudes[1:] + magnitudes[:-1]) / 2
    return torch.bucketize(a, mids, right=False)


@register_structure("power_of_two", aliases=("pow2",))
@dataclass(frozen=True)
class PowerOfTwo(QuantizationStructure):
    """Powers of two, ``bits`` per nonzero: levels ``+-2^(e-j)``, ``j = 0..2^(bits-1)-1``, best integer ``e``.

    Every level is a power of two, so multiplying by one is a shift. The nearest level is taken in
    the value domain (not the log domain, SPEC 2.1). ``e`` is searched exactly over the only
    exponents that can be optimal: from ``floor(log2 min|w|)`` (below it, ``e+1`` is better for
    every weight) to ``ceil(log2 max|w|) + 1`` (above it, ``e-1`` is).

    >>> PowerOfTwo(bits=2).project(torch.tensor([0.3, -0.9, 0.55, 0.0]))   # levels +-{0.5, 1}
    tensor([ 0.5000, -1.0000,  0.5000,  0.0000])
    """

    bits: int = 4
    options: ClassVar[tuple[str, ...]] = ("bits",)

    def __post_init__(self) -> None:
        _plain(self, "bits")
        _check_bits(type(self).__name__, self.bits, low=1)
        if self.bits > 8:
            raise ValueError(
                f"PowerOfTwo: bits={self.bits} gives 2^{self.bits - 1} exponents, more than float32 has; "
                "use bits <= 8"
            )

    @classmethod
    def example(cls) -> PowerOfTwo:
        return cls(bits=2)

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = 2 ** (self.bits - 1)
        a = values.abs()
        low = math.floor(math.log2(float(a.min())))
        high = math.ceil(math.log2(float(a.max()))) + 1
        best = None
        for e in range(low, high + 1):
            magnitudes = 2.0 ** torch.arange(e - count + 1, e + 1, dtype=torch.float64, device=a.device)
            codes = _nearest(a, magnitudes)
            err = float(((a - magnitudes[codes]) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, magnitudes, codes)
        _, magnitudes, codes = best
        return _signed(magnitudes, codes, values)

    @property
    def code_bits(self) -> int:
        return self.bits

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.kind, "bits": self.bits}


# --- binary and ternary --------------------------------------------------------------------


@register_structure("binary")
@dataclass(frozen=True)
class Binary(QuantizationStructure):
    """``{-a, +a}`` with ``a = mean|w|`` over the nonzeros: the exact projection for a free scale.

    >>> Binary().project(torch.tensor([1.0, -3.0]))
    tensor([ 2., -2.])
    """


    @property
    def code_bits(self) -> int:
        return 1

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = values.abs().mean()
        return _signed(alpha.reshape(1), torch.zeros_like(values, dtype=torch.int64), values)


@register_structure("ternary")
@dataclass(frozen=True)
class Ternary(QuantizationStructure):
    """``{-a, 0, +a}``: keep the ``k`` largest ``|w|`` at ``+-a``, zero the rest (``a`` = their mean).

    For a fixed ``k`` the best ``a`` is the mean of the top-``k`` magnitudes and the error is
    ``sum w^2 - (sum_top_k |w|)^2 / k``, so the exact projection takes the ``k`` maximizing
    ``(sum_top_k |w|)^2 / k`` (ties to the smaller ``k``; equal magnitudes by index). The zeros it
    creates are pruned weights: 1 bit (the sign) per kept weight.

    >>> Ternary().project(torch.tensor([1.0, -0.9, 0.1, 0.05]))
    tensor([ 0.9500, -0.9500,  0.0000,  0.0000])
    """


    @property
    def code_bits(self) -> int:
        return 1

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = values.abs()
        order = torch.argsort(a, descending=True, stable=True)
        sums = torch.cumsum(a[order], 0)
        k = torch.arange(1, a.numel() + 1, dtype=torch.float64, device=a.device)
        best = int(torch.argmax(sums * sums / k))  # argmax returns the first maximum
        alpha = sums[best] / (best + 1)
        codes = torch.full_like(values, -1, dtype=torch.int64)
        top = order[: best + 1]
        codes[top] = torch.where(values[top] > 0, 1, 0)
        return torch.stack([-alpha, alpha]), codes


# --- clustering -----------------------------------------------------------------------------


def storable_levels(levels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``levels`` in ``dtype``, through float32 for a float64 weight: a codebook is stored at 32 bits, so levels
    float32 cannot hold (``q * 3`` of a float64 model) made the packed file store the layer raw, at 64 bits a
    value, while the storage report counted its codes (a review's finding).

    >>> storable_levels(torch.tensor([0.1], dtype=torch.float64), torch.float64).item() == float(torch.tensor(0.1))
    True
    """
    if dtype == torch.float64:
        levels = levels.to(torch.float32)
    return levels.to(dtype)


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's 1-D k-means, centroids initialised evenly between min and max (Han et al. style).

    Returns ``(centroids ascending, codes)``; every value is assigned to its nearest centroid and
    every centroid is the mean of its members. A local optimum. A centroid left without members (the even
    start puts some in the gap a pruned layer's kept weights leave around zero) is moved onto the value
    farthest from its own centroid, so ``k`` levels are used whenever the values hold ``k`` distinct ones; with
    at most ``k`` distinct values each is its own level (no error).

    >>> kmeans_1d(torch.tensor([1.0, 1.2, 5.0, 5.2], dtype=torch.float64), 2)[0]
    tensor([1.1000, 5.1000], dtype=torch.float64)
    >>> kmeans_1d(torch.tensor([-1.0, -0.9, 0.9, 1.0, 1.1]), 4)[0]    # the even start leaves two in the gap
    tensor([-0.9500,  0.9000,  1.0000,  1.1000])
    >>> kmeans_1d(torch.tensor([3.0, -1.0, 3.0]), 8)
    (tensor([-1.,  3.]), tensor([1, 0, 1]))
    """
    distinct = torch.unique(values)  # ascending
    if distinct.numel() <= k:  # each value its own level: exact (Lloyd from an even start merged some, review)
        return distinct, torch.searchsorted(distinct, values)
    low, high = float(values.min()), float(values.max())
    centroids = torch.linspace(low, high, k, dtype=values.dtype, device=values.device)
    codes = None
    for _ in range(max_iter):
        new_codes = _nearest(values, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, new_codes, values)
        counts = torch.zeros_like(centroids).index_add_(0, new_codes, torch.ones_like(values))
        filled = counts > 0
        centroids = torch.where(filled, sums / counts.clamp(min=1), centroids)
        if not bool(filled.all()):
            centroids = _reseed(values, centroids, new_codes, ~filled)
            codes = None  # not converged: the moved centroids take members next
            continue
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
    codes = _nearest(values, centroids)
    used = torch.zeros(centroids.numel(), dtype=torch.bool, device=values.device)
    used[codes] = True
    remap = torch.cumsum(used, 0) - 1
    return centroids[used], remap[codes]


def _reseed(values: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``centroids`` (ascending again) with each ``empty`` one moved onto the value of largest squared error to its
    own centroid (a distinct value per moved centroid; the standard repair of an empty k-means cluster)."""
    error = (values - centroids[codes]).pow(2)
    centroids = centroids.clone()
    for slot in torch.nonzero(empty).flatten().tolist():
        i = int(torch.argmax(error))
        if float(error[i]) <= 0:
            break
        centroids[slot] = values[i]
        error[values == values[i]] = 0  # that value is a centroid now
    return torch.sort(centroids).values


def _nonzero_levels(values: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """``levels`` without the centroid at 0, which a kept weight may not take (0 is a pruned weight's code): its
    cluster splits into the means of its negative and its positive members; if that makes more than ``k`` levels,
    the two neighbours whose merge (the mean of their members, never 0) adds the least squared error become one.
    Ascending and distinct, as k-means gives them.

    >>> _nonzero_levels(torch.tensor([-1.0, 1.0, 3.0]), torch.tensor([0.0, 3.0]), torch.tensor([0, 0, 1]), 3)
    tensor([-1.,  1.,  3.])
    >>> _nonzero_levels(torch.tensor([-1.0, 1.0, 4.0]), torch.tensor([0.0, 4.0]), torch.tensor([0, 0, 1]), 2)
    tensor([-1.0000,  2.5000])
    """
    zero = int(torch.nonzero(levels == 0)[0])
    members = values[codes == zero]
    sides = [members[members < 0], members[members > 0]]
    found = torch.cat([levels[levels != 0], *[side.mean().view(1) for side in sides if side.numel()]])
    found = torch.unique(found)  # sorted
    while found.numel() > k:
        near = _nearest(values, found)
        best, best_cost = None, math.inf
        for i in range(found.numel() - 1):
            pair = values[(near == i) | (near == i + 1)]
            mean = pair.mean()
            if pair.numel() and float(mean) != 0.0:
                before = sum(float(((values[near == j] - found[j]) ** 2).sum()) for j in (i, i + 1))
                cost = float(((pair - mean) ** 2).sum()) - before
                if cost < best_cost:
                    best, best_cost = (i, mean), cost
        if best is None:  # every merge would land on 0: drop the level with the fewest members instead
            best_i = int(torch.bincount(near, minlength=found.numel()).argmin())
            found = torch.cat([found[:best_i], found[best_i + 1:]])
            continue
        i, mean = best
        found = torch.unique(torch.cat([found[:i], mean.view(1), found[i + 2:]]))
    return found


@register_structure("clustering", aliases=("cluster",))
@dataclass(frozen=True)
class Clustering(QuantizationStructure):
    """``clusters`` shared values per layer, learned by 1-D k-means on the nonzeros (SPEC 2.2).

    Give ``clusters`` (k) or ``bits`` (k = 2^bits). The ADMM Z-step re-clusters ``W + U`` each
    time (so the centroids follow training); during retraining the finalizer keeps every weight on
    its cluster and moves each centroid to the mean of its members after every optimizer step.
    Pruned zeros never join a cluster. Lloyd's algorithm finds a local optimum, not necessarily
    the global one; the assignment to the nearest centroid is exact.

    >>> Clustering(clusters=2).project(torch.tensor([1.0, 1.2, 0.0, 5.0, 5.2]))
    tensor([1.1000, 1.1000, 0.0000, 5.1000, 5.1000])
    """

    clusters: int | None = None
    bits: int | None = None
    options: ClassVar[tuple[str, ...]] = ("bits", "clusters")
    update: ClassVar[str] = "centroids"

    def __post_init__(self) -> None:
        _plain(self, "clusters", "bits")
        if (self.clusters is None) == (self.bits is None):
            raise ValueError("Clustering: give exactly one of clusters=K (shared values) or bits=B (K = 2^B)")
        if self.bits is not None:
            _check_bits("Clustering", self.bits)
        elif (
            isinstance(self.clusters, bool)
            or not isinstance(self.clusters, int)
            or not 2 <= self.clusters <= 2**MAX_BITS
        ):
            raise ValueError(
                f"Clustering: clusters={self.clusters!r} must be an integer in [2, {2**MAX_BITS}], "
                "e.g. clusters: 16"
            )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Clustering:
        cls._check_keys(spec)
        return cls(clusters=spec.get("clusters"), bits=spec.get("bits"))

    @classmethod
    def example(cls) -> Clustering:
        return cls(clusters=3)

    @property
    def k(self) -> int:
        return self.clusters if self.clusters is not None else 2**self.bits

    @property
    def code_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.k)))

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels, codes = kmeans_1d(values, self.k)
        if bool((levels == 0).any()):  # members that sum to exactly 0 (-1/3 and 1/3): 0 means "pruned" here
            levels = _nonzero_levels(values, levels, codes, self.k)
            codes = _nearest(values, levels)
        return levels, codes

    def to_dict(self) -> dict[str, Any]:
        if self.bits is not None:
            return {"structure": self.kind, "bits": self.bits}
        return {"structure": self.kind, "clusters": self.clusters}


# Keys a quantization rule may carry; the ones a structure does not take are reported, not ignored.
QUANT_KEYS = {"bits", "clusters"}


__all__ = [
    "Binary",
    "Clustering",
    "FixedPoint",
    "PowerOfTwo",
    "QuantizationStructure",
    "Quantized",
    "Ternary",
    "best_interval",
    "kmeans_1d",
    "storable_levels",
]

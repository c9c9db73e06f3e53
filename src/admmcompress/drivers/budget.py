"""Budgets for automatic per-layer rates: parameters, MACs or measured latency of the structured model.

A budget is what the pruned model may cost. Cost is counted in the GEMM view (SPEC 0.1): every Linear/Conv
layer ``l`` keeps ``r_l`` rows (filters) and ``c_l`` columns (input channel x kernel position) with a nonzero
entry, and costs

- ``params``: ``r_l * c_l`` weights (the dense sub-matrix compaction keeps; biases and BN not counted);
- ``macs``: ``r_l * c_l * positions_l`` (output positions per sample, from one traced forward pass);
- ``latency``: milliseconds of the layer at ``(r_l, c_l)``, interpolated in a table measured once per
  machine (:class:`LatencyTable`, over :class:`admmcompress.timing.LatencyCache`).

A params budget counts every Linear/Conv layer; MACs and latency the layers the example input reaches (the
projections of ``nn.MultiheadAttention`` run inside its own forward, unseen: a target there is refused). A weight
several layers share (tied) is one entry, by its parameter name: its weights count once, its MACs once per use.
Layers no target touches cost their dense figure. A pruned channel that an uncoupled consumer still reads
is counted at the consumer (conservative); with ``coupling: strict`` the consumer's columns are pruned with
the channel and the count is what compaction removes.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
>>> shapes = gemm_shapes(model, torch.zeros(1, 8))
>>> [(s.name, s.rows, s.cols, s.positions) for s in shapes.values()]
[('0', 4, 8, 1), ('2', 2, 4, 1)]
>>> Budget(kind="params", reduction=2).resolve(40.0)
20.0
>>> pattern = {"0.weight": torch.eye(4, 8, dtype=torch.bool)}       # 4 rows, 4 columns survive
>>> structured_cost(shapes, pattern, "params")
24.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

# the model is called as the plan traces it
from admmcompress.plan.graph import run_example
from admmcompress.structures.groups import as_matrix
from admmcompress.structures.scalars import plain_number
from admmcompress.structures.sparsity import GEMM_MODULES
from admmcompress.timing import LatencyCache, time_interleaved

BUDGET_KINDS = ("params", "macs", "latency")


class BudgetError(ValueError):
    """A budget that cannot be met or does not make sense for the model."""


@dataclass(frozen=True)
class Budget:
    """What the pruned model may cost: ``kind`` and exactly one of ``value``, ``fraction``, ``reduction``.

    Args:
        kind: "params", "macs" or "latency" (see the module docstring for how each is counted).
        value: the cost itself (a parameter count, MACs per sample, milliseconds).
        fraction: share of the dense cost kept, in (0, 1].
        reduction: dense cost / pruned cost, >= 1 ("4x fewer MACs" is ``reduction: 4``).
    """

    kind: str = "macs"
    value: float | None = None
    fraction: float | None = None
    reduction: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"budget kind={self.kind!r}; choose one of {BUDGET_KINDS}")
        given = [k for k in ("value", "fraction", "reduction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise BudgetError(
                f"budget: give exactly one of value, fraction or reduction (got {given or 'none'}), "
                "e.g. {kind: macs, reduction: 4}"
            )
        key = given[0]
        number = plain_number(getattr(self, key))
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise BudgetError(f"budget {key}={number!r} must be a finite number")
        object.__setattr__(self, key, float(number))
        if key == "value" and not number > 0:
            raise BudgetError(f"budget value={number!r} must be > 0 ({self.kind} the pruned model may keep)")
        if key == "fraction" and not 0 < number <= 1:
            raise BudgetError(f"budget fraction={number!r} must be in (0, 1] (share of the dense {self.kind} kept)")
        if key == "reduction" and not number >= 1:
            raise BudgetError(f"budget reduction={number!r} must be >= 1 (dense {self.kind} / pruned {self.kind})")

    @classmethod
    def from_any(cls, spec: Budget | Mapping[str, Any]) -> Budget:
        if isinstance(spec, Budget):
            return spec
        if not isinstance(spec, Mapping):
            raise BudgetError(f"budget must be a mapping such as {{kind: macs, reduction: 4}}, got {spec!r}")
        unknown = sorted(set(spec) - {"kind", "value", "fraction", "reduction"})
        if unknown:
            raise BudgetError(f"budget: unknown key(s) {unknown}; allowed: kind, value, fraction, reduction")
        return cls(**spec)

    def resolve(self, dense: float) -> float:
        """The cost the pruned model may have, given the dense model's; refuses one above the dense cost."""
        if self.value is not None:
            if self.value > dense:
                raise BudgetError(
                    f"budget value={self.value:g} {self.kind} is above the dense model's {dense:g}; "
                    "give a smaller value (or a fraction / reduction)"
                )
            return self.value
        return dense * self.fraction if self.fraction is not None else dense / self.reduction

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GemmShape:
    """One Linear/Conv layer in the GEMM view, with what one forward pass of one sample saw."""

    name: str
    param: str
    rows: int
    cols: int
    positions: int  # output positions per row for one sample, summed over the layer's calls (1: a Linear on a vector)
    kind: str  # "linear" or "conv"
    # One sample's input shape at every call (a shared layer runs once per call); a layer seen without a traced
    # pass has one call of unknown shape, ((),)
    calls: tuple[tuple[int, ...], ...]
    conv: dict[str, Any] | None = None  # kernel_size, stride, padding, dilation, groups (convs)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One sample's input at the first call (``()`` without a traced pass)."""
        return self.calls[0]


def layer_weights(model: nn.Module) -> dict[str, str]:
    """``{layer: the name of its weight}`` for every Linear/Conv layer, the name as ``model.named_parameters()``
    (and so the plan) gives it: layers sharing one Parameter (tied weights) share its one name, the first.

    >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    >>> b.weight = a.weight
    >>> layer_weights(nn.Sequential(a, b))
    {'0': '0.weight', '1': '0.weight'}
    """
    canonical = {id(p): n for n, p in model.named_parameters()}  # a shared Parameter is listed once
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GEMM_MODULES):
            out[name] = canonical.get(id(m.weight), f"{name}.weight" if name else "weight")
    return out


def _static_shapes(model: nn.Module) -> dict[str, GemmShape]:
    """Every GEMM layer with one output position (no traced pass: enough for parameter budgets); a weight shared
    by several layers is counted once."""
    found = {}
    modules = dict(model.named_modules())
    for name, param in layer_weights(model).items():
        if param in found:  # tied: its weights are stored once
            continue
        m = modules[name]
        rows, cols = as_matrix(m.weight).shape
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        found[param] = GemmShape(name, param, rows, cols, 1, kind, ((),))
    return found


def gemm_shapes(model: nn.Module, example: Any | None) -> dict[str, GemmShape]:
    """Every Linear/Conv1d/Conv2d/Conv3d layer's GEMM shape and output positions per sample, by weight name
    (with ``example``: the layers the forward reaches).

    ``example`` is what the model is called on, as the plan's tracer takes it (``plan.graph.call_model``): a
    tensor, a tuple of positional inputs or a dict of keyword inputs, batch-first, or sequence-first where the
    model's recurrent, attention or cell layers say so (``plan.graph.run_example``). A layer called several times per
    sample (a shared block) counts the output positions of every call.
    Without ``example`` the positions are 1 (enough for parameter budgets, not for MACs or latency).
    Shapes are keyed by the weight's parameter name (:func:`layer_weights`): a weight several layers share (tied)
    is one entry, its weights counted once and its output positions summed over the layers that use it.
    """
    if example is None:
        return _static_shapes(model)
    names = {m: n for n, m in model.named_modules()}
    weights = layer_weights(model)
    seen: list[tuple[nn.Module, tuple[int, ...], int]] = []  # (layer, its input's shape, its output's size) per call

    def hook(module: nn.Module, inputs, output) -> None:
        seen.append((module, tuple(inputs[0].shape), output.numel()))

    samples = run_example(model, example, [(m, hook) for m in model.modules() if isinstance(m, GEMM_MODULES)])
    if samples < 1:
        raise BudgetError("the example batch holds no sample (batch size 0), so no output position can be counted; "
                          "pass at least one sample, e.g. x[:2]")
    found: dict[str, GemmShape] = {}
    for module, shape, size in seen:
        name = names[module]
        param = weights[name]
        rows, cols = as_matrix(module.weight).shape
        per_row = max(1, size // rows // samples)
        in_shape = _sample_shape(module, shape, samples)
        # called again in the same pass, or another layer sharing the weight: its MACs count once per call
        if (earlier := found.get(param)) is not None:
            found[param] = replace(earlier, positions=earlier.positions + per_row, calls=earlier.calls + (in_shape,))
            continue
        conv = None
        if not isinstance(module, nn.Linear):
            conv = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
        found[param] = GemmShape(name, param, rows, cols, per_row, "conv" if conv else "linear", (in_shape,), conv)
    return found


def budget_shapes(model: nn.Module, example: Any | None, kind: str) -> dict[str, GemmShape]:
    """The layers a ``kind`` budget counts: for ``params`` every Linear/Conv layer (its count needs no output
    positions, so it does not hang on which layers ``example`` reaches); for MACs and latency, those it reaches."""
    return gemm_shapes(model, None if kind == "params" else example)


def check_costed(model: nn.Module, names: Iterable[str], shapes: Mapping[str, GemmShape], kind: str) -> None:
    """Refuse, in one line, a pruned Linear/Conv weight among ``names`` that ``shapes`` do not count: pruning it
    would be free against the budget."""
    targeted = set(names)
    missing: dict[str, str] = {}  # weight -> the first layer using it
    for layer, param in layer_weights(model).items():
        if param in targeted and param not in shapes:
            missing.setdefault(param, layer)
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside = [layer for layer in missing.values() if any(not a or layer.startswith(f"{a}.") for a in attention)]
    if inside:  # MultiheadAttention calls its projections functionally: no forward hook of theirs fires
        raise BudgetError(
            f"layers {inside[:6]} are inside an nn.MultiheadAttention, which uses their weights without running "
            f"them, so a {kind} budget cannot see them; use a params budget, or leave them out of the plan"
        )
    if missing:
        raise BudgetError(
            f"layers {list(missing.values())[:6]} did not run on the example input, so the budget cannot count them; "
            "pass an example that reaches them, or leave them out of the plan"
        )


def _sample_shape(module: nn.Module, shape: tuple[int, ...], samples: int) -> tuple[int, ...]:
    """One sample's input shape, from a call's input shape: without dim 0 when it is the batch (or for a conv,
    which is batch-first); a sequence-first Linear input ``(L, B, ..., F)`` without its dim 1."""
    if isinstance(module, nn.Linear) and len(shape) >= 3 and shape[0] != samples and shape[1] == samples:
        return (shape[0],) + shape[2:]
    return shape[1:]


def kept_rows_cols(pattern: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of the GEMM view with at least one nonzero (True) entry."""
    m = as_matrix(pattern) != 0
    return int(m.any(dim=1).sum()), int(m.any(dim=0).sum())


def structured_cost(
    shapes: Mapping[str, GemmShape],
    patterns: Mapping[str, torch.Tensor],
    kind: str,
    latency: LatencyTable | None = None,
) -> float:
    """The model's cost in ``kind`` when weight ``name`` keeps the nonzero rows/columns of ``patterns[name]``.

    Layers without a pattern count dense.
    """
    total = 0.0
    for param, s in shapes.items():
        r, c = kept_rows_cols(patterns[param]) if param in patterns else (s.rows, s.cols)
        if kind == "params":
            total += r * c
        elif kind == "macs":
            total += r * c * s.positions
        elif latency is None:
            raise BudgetError("a latency budget needs a LatencyTable (built once per machine)")
        else:
            total += latency.ms(param, r, c)
    return float(total)


def rows_per_group(target) -> int:
    """Consecutive rows of a row target's matrix that form one group: ``head_dim`` for heads, else 1."""
    return getattr(target.structure, "head_dim", None) or 1


def drop_unread_channels(targets, patterns: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``patterns`` with every coupled channel that no consumer reads removed from its producers too.

    A channel whose consumer columns are all zero (say every column of the next conv that reads it was
    pruned) is removed by compaction with its producer filters; counting those filters would overstate the
    cost. Only coupled targets (``Plan.resolve_coupled``) know their consumers; others pass through. An
    attention head goes only when none of its output-projection columns is read (compaction removes whole heads).
    """
    from admmcompress.plan.coupled import CoupledTarget

    out = dict(patterns)
    for t in targets:
        if not isinstance(t, CoupledTarget) or not all(n in out for n in t.param_names):
            continue
        readers = {s.param for s in t.slices if s.dim == 1}  # input-channel slices of the next layers
        if not readers:
            continue
        role = {n: torch.full(out[n].shape, 1.0 if n in readers else 0.0, device=out[n].device) for n in t.param_names}
        consumer_columns = t.value(role) > 0
        read = ((t.value({n: out[n].float() for n in t.param_names}) != 0) & consumer_columns).any(dim=1)
        width = rows_per_group(t)
        if width > 1:  # attention heads: a query/key row is also read by the scores, so only whole heads go
            read = read.view(-1, width).any(dim=1).repeat_interleave(width)
        for name, mask in t.masks_for_channels(out, read).items():
            out[name] = out[name] & mask
    return out


def entry_costs(shapes: Mapping[str, GemmShape], kind: str, latency: LatencyTable | None = None) -> dict[str, float]:
    """What one weight of each layer costs in ``kind`` (dense figure / weights): weights the strength."""
    out = {}
    for param, s in shapes.items():
        if kind == "params":
            out[param] = 1.0
        elif kind == "macs":
            out[param] = float(s.positions)
        else:
            out[param] = latency.ms(param, s.rows, s.cols) / (s.rows * s.cols) if latency else 1.0
    return out


class LatencyTable:
    """Per-layer latency (ms, batch 1) against kept rows and columns, measured once per machine and cached.

    For every layer a grid of kept shares (``grid`` of rows x ``grid`` of columns) is timed as a dense layer of
    that size (a conv keeps ``ceil(cols / kernel positions)`` input channels) on the layer's input size, through
    :func:`admmcompress.timing.time_interleaved`; values in between are interpolated bilinearly. A layer called
    several times per sample (a shared block, a conv at several resolutions) costs the sum over its calls, each
    on its own input size. Entries are keyed by shape in a :class:`~admmcompress.timing.LatencyCache`, so another
    model with the same layer shapes reuses them.
    """

    def __init__(
        self,
        shapes: Mapping[str, GemmShape],
        grid: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0),
        cache: LatencyCache | None = None,
        rounds: int = 7,
    ) -> None:
        self.shapes = dict(shapes)
        self.grid = tuple(sorted(grid))
        self.cache = cache if cache is not None else LatencyCache("gemm-layer")  # an empty cache is falsy
        self.rounds = rounds
        # per layer: (calls with this input size, its table) for every distinct input size
        self._tables: dict[str, list[tuple[int, torch.Tensor]]] = {
            p: [(s.calls.count(shape), self._measure(s, shape)) for shape in dict.fromkeys(s.calls)]
            for p, s in self.shapes.items()
        }

    def _counts(self, total: int) -> list[int]:
        return [max(1, round(total * f)) for f in self.grid]

    def _measure(self, s: GemmShape, in_shape: tuple[int, ...]) -> torch.Tensor:
        rows, cols = self._counts(s.rows), self._counts(s.cols)
        table = torch.zeros(len(rows), len(cols), dtype=torch.float64)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                key, build = _layer_builder(s, r, c, in_shape)
                table[i, j] = self.cache.get_or_measure(key, lambda b=build: _time(b, self.rounds))
        return table

    def ms(self, param: str, rows: int, cols: int) -> float:
        """Interpolated milliseconds of layer ``param`` keeping ``rows`` x ``cols`` (summed over its calls)."""
        s = self.shapes[param]
        i, fi = _bracket(self._counts(s.rows), rows)
        j, fj = _bracket(self._counts(s.cols), cols)
        return sum(calls * _interpolate(table, i, fi, j, fj) for calls, table in self._tables[param])


def _interpolate(table: torch.Tensor, i: int, fi: float, j: int, fj: float) -> float:
    """Bilinear value of ``table`` between grid cells ``(i, j)`` and ``(i + 1, j + 1)`` at weights ``fi, fj``."""
    i1, j1 = min(i + 1, table.shape[0] - 1), min(j + 1, table.shape[1] - 1)
    top = table[i, j] * (1 - fj) + table[i, j1] * fj
    bottom = table[i1, j] * (1 - fj) + table[i1, j1] * fj
    return float(top * (1 - fi) + bottom * fi)


def _bracket(points: list[int], x: int) -> tuple[int, float]:
    """Index ``i`` and weight ``f`` such that ``x ~ points[i] * (1 - f) + points[i + 1] * f`` (clamped)."""
    if x <= points[0]:
        return 0, 0.0
    for i in range(len(points) - 1):
        if x <= points[i + 1]:
            span = points[i + 1] - points[i]
            return i, (x - points[i]) / span if span else 0.0
    return len(points) - 1, 0.0


def _layer_builder(s: GemmShape, rows: int, cols: int, in_shape: tuple[int, ...]):
    if s.kind == "linear":
        key = f"linear-{cols}x{rows}-in{'x'.join(map(str, in_shape))}"
        shape = in_shape[:-1] + (cols,)

        def build():
            return nn.Linear(cols, rows), torch.randn(1, *shape)
    else:
        c = s.conv
        kpos = math.prod(c["kernel_size"])
        groups = c["groups"]
        channels = max(1, math.ceil(cols / kpos)) * groups
        out = max(groups, (rows // groups) * groups)
        key = f"conv-{channels}x{out}-{c}-in{'x'.join(map(str, in_shape[1:]))}"

        def build():
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(c["kernel_size"])]
            layer = conv(channels, out, c["kernel_size"], c["stride"], c["padding"], c["dilation"], groups)
            return layer, torch.randn(1, channels, *in_shape[1:])
    return key, build


def _time(build, rounds: int) -> float:
    layer, x = build()
    layer.eval()
    return time_interleaved({"layer": lambda: layer(x)}, rounds=rounds)["layer"]


__all__ = [
    "BUDGET_KINDS", "Budget", "BudgetError", "GemmShape", "LatencyTable", "budget_shapes", "check_costed",
    "drop_unread_channels", "entry_costs", "gemm_shapes", "kept_rows_cols", "layer_weights", "rows_per_group",
    "structured_cost",
]

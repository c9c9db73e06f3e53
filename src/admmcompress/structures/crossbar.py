"""Crossbar-aligned structures (SPEC 12.1, 12.2): pruning groups that empty crossbar wordlines, bitlines and
whole tiles, and conductance-level quantization. All exact projections, driven by ADMM like any structure.

A layer's GEMM matrix ``(outputs O, inputs K)`` is mapped onto crossbar tiles of ``tile = (rows, cols)``
cells with inputs on the wordlines (rows) and outputs on the bitlines (columns); one weight takes
``columns_per_weight`` bitlines (2 for a differential pair, times the bit slices of a multi-cell weight;
:meth:`admmcompress.hardware.CrossbarSpec.columns_per_weight` computes it). One tile therefore holds a block
of ``rows`` inputs x ``cols // columns_per_weight`` outputs of the GEMM matrix, and the partitions are:

==================  ======================================================  ==================================
structure           one group                                               what pruning it frees
==================  ======================================================  ==================================
``crossbar_row``    one input x the outputs of one tile (a wordline segment)  a wordline of one tile (its DAC)
``crossbar_column`` one output x the inputs of one tile (a bitline segment)    the bitlines of one weight in a tile
``crossbar_tile``   one whole tile block                                    a whole crossbar, never instantiated
==================  ======================================================  ==================================

Edge tiles may be partly filled (no divisibility needed). Each projection keeps the ``k`` groups of largest
L2 norm (:func:`admmcompress.structures.groups.project_groups`: exact, ties to the lower index).

``conductance`` quantizes: a weight is ``q * (G+ - G-) / dG`` for a differential pair whose two cells each take
one of ``2^bits`` linear levels ``G_min + j dG`` on ``[G_min, G_max]`` (``cells`` bit slices of ``bits`` each per
polarity give ``2^(bits*cells)`` levels), so the weight levels are ``q * {+-1, ..., +-(2^(bits*cells) - 1)}``
(zero, both cells at ``G_min``, means pruned: SPEC P10). The scale ``q`` (the weight per conductance step) is
chosen exactly by the breakpoint scan of :func:`admmcompress.structures.quantization.best_interval`.

>>> w = torch.tensor([[1.0, 0.1, 2.0, 0.2], [0.3, 0.1, 3.0, 0.1]])
>>> CrossbarTile(sparsity=0.5, tile=(2, 2)).project(w)      # blocks of 2 inputs x 2 outputs: keep 1 of 2
tensor([[0.0000, 0.0000, 2.0000, 0.2000],
        [0.0000, 0.0000, 3.0000, 0.1000]])
>>> Conductance(bits=1).project(torch.tensor([0.9, -1.1, 0.0]))   # 2 levels per cell: weights +-q
tensor([ 1., -1.,  0.])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from admmcompress.structures import groups
from admmcompress.structures.base import register_structure
from admmcompress.structures.quantization import MAX_BITS, QuantizationStructure, best_interval
from admmcompress.structures.scalars import plain_number
from admmcompress.structures.sparsity import SparsityStructure


def _positive_int(value: Any, name: str, example: str) -> int:
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. {example}")
    return value


@dataclass(frozen=True)
class CrossbarStructure(SparsityStructure):
    """Base class: a partition of the GEMM matrix by crossbar tile blocks.

    Args:
        tile: crossbar size ``(rows, cols)`` in cells (wordlines x bitlines); an int means square.
        columns_per_weight: bitlines one weight takes (2 x bit slices for differential pairs).
    """

    tile: tuple[int, int] = (128, 128)
    columns_per_weight: int = 1
    # Set by bind() for a grouped conv, never written to a plan: its groups sit on the diagonal of the crossbar
    # layout (hardware.crossbar.block_diagonal), so group g's inputs start at column g * (its inputs).
    conv_groups: int = 1
    options: ClassVar[tuple[str, ...]] = ("tile", "columns_per_weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        size = self.tile
        if isinstance(size, (list, tuple)):
            size = tuple(plain_number(v) for v in size)
        else:
            size = (plain_number(size), plain_number(size))
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise ValueError(f"{name}: tile={self.tile!r} must be two positive integers (rows, cols), e.g. [128, 128]")
        object.__setattr__(self, "tile", (int(size[0]), int(size[1])))
        cpw = _positive_int(self.columns_per_weight, f"{name}: columns_per_weight", "2 for a differential pair")
        object.__setattr__(self, "columns_per_weight", cpw)
        if cpw > self.tile[1]:
            raise ValueError(
                f"{name}: columns_per_weight={cpw} is more than the tile's {self.tile[1]} columns; "
                "use a wider tile or fewer bit slices per weight"
            )

    @property
    def block(self) -> tuple[int, int]:
        """``(outputs, inputs)`` of the GEMM matrix one tile holds."""
        return self.tile[1] // self.columns_per_weight, self.tile[0]

    def bind(self, module: torch.nn.Module, param: str) -> CrossbarStructure:
        """Specialised to a grouped conv: its tiles are those of the block-diagonal crossbar layout."""
        conv_groups = getattr(module, "groups", 1)
        return replace(self, conv_groups=conv_groups) if conv_groups > 1 else self

    def _layout(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Each GEMM entry's ``(output, input)`` in the crossbar layout, as ``(rows, 1)`` and ``(rows, cols)``
        (the input depends on the row for a grouped conv), with the layout's output and input counts."""
        rows, cols = groups.as_matrix(weight).shape
        device = weight.device
        output = torch.arange(rows, device=device).view(-1, 1)
        group = output // max(1, rows // self.conv_groups)  # rows are the conv groups' outputs, in order
        inputs = group * cols + torch.arange(cols, device=device).view(1, -1)
        return output, inputs, rows, cols * self.conv_groups

    def _ids(self, first: torch.Tensor, second: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """Group ids ``first * span + second`` over the GEMM matrix, numbered 0.. over the groups that hold an
        entry (a grouped conv's layout has empty blocks off its diagonal: they are no groups)."""
        span = int(second.max()) + 1
        ids = (first * span + second).expand(shape)
        if self.conv_groups == 1:
            return ids, (int(first.max()) + 1) * span
        used, ids = torch.unique(ids, return_inverse=True)
        return ids, used.numel()

    @classmethod
    def example(cls) -> CrossbarStructure:
        return cls(sparsity=0.5, tile=(2, 2))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["tile"] = list(self.tile)
        if self.columns_per_weight != 1:
            out["columns_per_weight"] = self.columns_per_weight
        return out


@register_structure("crossbar_row", aliases=("wordline",))
@dataclass(frozen=True)
class CrossbarRow(CrossbarStructure):
    """Groups = one input (a wordline) restricted to the outputs of one tile."""

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        output, inputs, rows, _ = self._layout(weight)
        return self._ids(output // self.block[0], inputs, (rows, inputs.shape[1]))


@register_structure("crossbar_column", aliases=("bitline",))
@dataclass(frozen=True)
class CrossbarColumn(CrossbarStructure):
    """Groups = one output (its bitlines) restricted to the inputs of one tile."""

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        output, inputs, rows, _ = self._layout(weight)
        return self._ids(output, inputs // self.block[1], (rows, inputs.shape[1]))


@register_structure("crossbar_tile", aliases=("crossbar_block",))
@dataclass(frozen=True)
class CrossbarTile(CrossbarStructure):
    """Groups = whole tile blocks: a pruned group is a crossbar that is never instantiated."""

    def check_module(self, module: torch.nn.Module, name: str) -> None:
        super().check_module(module, name)
        weight = module.weight
        bound = self.bind(module, "weight")  # a grouped conv's block-diagonal crossbar layout (review: judged on
        if bound.n_groups(weight) < 2:  # the plain (O, k) matrix, a depthwise conv was refused)
            _, _, rows, cols = bound._layout(weight)
            out_block, in_block = self.block
            raise ValueError(
                f"layer '{name}': its {rows}x{cols} crossbar layout fits in one {self.tile[0]}x{self.tile[1]} tile "
                f"({out_block} outputs x {in_block} inputs), so crossbar_tile pruning cannot remove anything; "
                "use a smaller tile, crossbar_row/crossbar_column, or leave the layer out of the rule"
            )

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        output, inputs, rows, _ = self._layout(weight)
        return self._ids(output // self.block[0], inputs // self.block[1], (rows, inputs.shape[1]))


@register_structure("conductance", aliases=("conductance_levels",))
@dataclass(frozen=True)
class Conductance(QuantizationStructure):
    """Differential-pair conductance levels: weights ``q * {+-1, ..., +-(2^(bits*cells) - 1)}``, best ``q``.

    ``bits`` per cell (``2^bits`` linear levels on ``[G_min, G_max]``), ``cells`` bit slices per polarity.

    >>> Conductance(bits=2).project(torch.tensor([0.1, 0.2, 0.3, -0.3]))   # magnitudes q*{1,2,3}, q = 0.1
    tensor([ 0.1000,  0.2000,  0.3000, -0.3000])
    """

    bits: int = 2
    cells: int = 1
    options: ClassVar[tuple[str, ...]] = ("bits", "cells")

    def __post_init__(self) -> None:
        for key in ("bits", "cells"):
            object.__setattr__(self, key, plain_number(getattr(self, key)))
        _positive_int(self.bits, "Conductance: bits", "bits: 2 (4 levels per cell)")
        _positive_int(self.cells, "Conductance: cells", "cells: 1 (one cell per polarity)")
        if self.bits * self.cells >= MAX_BITS:
            raise ValueError(
                f"Conductance: bits*cells={self.bits * self.cells} must be below {MAX_BITS}; "
                "use fewer bits per cell or fewer cells"
            )

    @property
    def magnitudes(self) -> int:
        """Nonzero magnitude codes: ``2^(bits*cells) - 1`` conductance steps between the two cells."""
        return 2 ** (self.bits * self.cells) - 1

    @property
    def code_bits(self) -> int:
        return self.bits * self.cells + 1  # sign (which cell of the pair) + magnitude

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Conductance:
        cls._check_keys(spec)
        return cls(bits=spec.get("bits", 2), cells=spec.get("cells", 1))

    @classmethod
    def _check_keys(cls, spec: Mapping[str, Any]) -> None:
        extra = sorted(k for k in ("sparsity", "compression", "clusters") if spec.get(k) is not None)
        if extra:
            raise ValueError(
                f"structure 'conductance' takes ['bits', 'cells'], not {extra} "
                "(add a separate rule for pruning: each target gets its own Z/U)"
            )

    @classmethod
    def example(cls) -> Conductance:
        return cls(bits=1, cells=2)

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.magnitudes
        a = values.abs()
        q = best_interval(a, n)
        # The scale is stored in float32 like fixed_point's, so levels are exact multiples of it.
        q32 = float(torch.tensor(q, dtype=torch.float32))
        magnitudes = q32 * torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
        codes = (torch.clamp(torch.floor(a / q32 + 0.5), 1, n) - 1).to(torch.int64)
        levels = torch.cat([-magnitudes.flip(0), magnitudes])
        return levels, torch.where(values > 0, n + codes, n - 1 - codes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"structure": self.kind, "bits": self.bits}
        if self.cells != 1:
            out["cells"] = self.cells
        return out


__all__ = ["Conductance", "CrossbarColumn", "CrossbarRow", "CrossbarStructure", "CrossbarTile"]

"""Block structures (BLK-REW / RTMobile, SPEC 7.1, 8): prune whole columns or rows inside each block.

The GEMM matrix ``(R, C)`` is cut into blocks of ``r x c``. ``Block`` prunes *block-columns*
(one column restricted to one row block, ``r`` entries); ``BlockRow`` prunes *block-rows*
(one row restricted to one column block, ``c`` entries). Both are group partitions, so their
projection is :func:`admmcompress.structures.groups.project_groups` (keep the ``k`` groups of
largest L2 norm). With ``per_block=True`` every ``r x c`` block keeps the same fraction of its
groups instead (the exact projection onto that product set: top-k inside each block), which
balances the work of the block-sparse executor across row blocks.

Recurrent weights stack gates along the rows (GRU ``3H x I``); row blocks never straddle a gate
boundary (SPEC P13): the rows are first split into ``gates`` equal gate matrices and blocked
inside each. ``Plan.resolve`` sets ``gates`` from the module (3 for GRU, 4 for LSTM).

Sizes that do not divide raise ``ValueError`` naming the shape and the divisors that fit, unless
``allow_ragged=True``: then the last row block of each gate (and the last column block) is
smaller, and still a block of its own.

>>> w = torch.tensor([[1., 5., 0., 2.], [1., 5., 0., 2.], [3., 0., 4., 1.], [3., 0., 4., 1.]])
>>> Block(sparsity=0.5, block=(2, 2)).project(w)    # 8 block-columns of 2 rows, keep 4
tensor([[0., 5., 0., 2.],
        [0., 5., 0., 2.],
        [3., 0., 4., 0.],
        [3., 0., 4., 0.]])
>>> Block(sparsity=0.5, block=(2, 2), per_block=True).support(w).int()   # 1 of 2 in every block
tensor([[0, 1, 0, 1],
        [0, 1, 0, 1],
        [1, 0, 1, 0],
        [1, 0, 1, 0]], dtype=torch.int32)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from admmcompress.structures import groups
from admmcompress.structures.base import register_structure
from admmcompress.structures.scalars import plain_number
from admmcompress.structures.sparsity import GEMM_MODULES, Filter, SparsityStructure, unsupported_layer

RECURRENT_MODULES = (torch.nn.RNNBase, torch.nn.RNNCellBase)


def _divisors_near(n: int, size: int, count: int = 5) -> list[int]:
    """Divisors of ``n`` closest to ``size`` (the fixes to suggest when a block does not fit)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - size), d))[:count])


def block_starts(length: int, size: int) -> torch.Tensor:
    """Block index of each of ``length`` positions, for blocks of ``size`` (the last may be ragged)."""
    return torch.arange(length) // size


@register_structure("block", aliases=("block_column",))
@dataclass(frozen=True)
class Block(SparsityStructure):
    """Inside every ``r x c`` block of the GEMM matrix, keep or drop whole block-columns.

    Args:
        block: ``(r, c)`` block size in rows x columns of the GEMM view.
        per_block: every block keeps the same fraction of its groups (balanced), instead of
            the ``k`` largest groups of the whole matrix.
        allow_ragged: accept sizes that do not divide; the last block is then smaller.
        gates: equal gate matrices stacked along the rows (set by the plan for GRU/LSTM).

    >>> Block(compression=4, block=(16, 8)).to_dict()
    {'structure': 'block', 'compression': 4, 'block': [16, 8]}
    """

    block: tuple[int, int] = (16, 16)
    per_block: bool = False
    allow_ragged: bool = False
    gates: int = 1
    axis: ClassVar[str] = "column"
    options: ClassVar[tuple[str, ...]] = ("block", "per_block", "allow_ragged", "gates")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        size = self.block
        if isinstance(size, (tuple, list)):  # numpy/torch integers are the numbers they hold
            size = tuple(plain_number(v) for v in size)
        else:
            size = plain_number(size)
        object.__setattr__(self, "gates", plain_number(self.gates))
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
        ):
            raise ValueError(
                f"{name}: block={self.block!r} must be two positive integers (rows, cols), e.g. [16, 8]"
            )
        object.__setattr__(self, "block", (int(size[0]), int(size[1])))
        for flag in ("per_block", "allow_ragged"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}: {flag}={getattr(self, flag)!r} must be true or false")
        if not isinstance(self.gates, int) or isinstance(self.gates, bool) or self.gates < 1:
            raise ValueError(
                f"{name}: gates={self.gates!r} must be a positive integer (3 for GRU, 4 for LSTM)"
            )

    # --- which layers and parameters ------------------------------------------------------
    def check_module(self, module: torch.nn.Module, name: str) -> None:
        if not isinstance(module, GEMM_MODULES + RECURRENT_MODULES):
            allowed = ", ".join(t.__name__ for t in GEMM_MODULES) + ", GRU, LSTM, RNN and their cells"
            raise ValueError(unsupported_layer(name, module, self.kind, allowed))
        for param in self.params(module):
            gates = groups.gate_count(module, param)
            if self.gates not in (1, gates):  # 1 is the default: the module's own count is used (bind)
                raise ValueError(f"layer '{name}' {param}: gates={self.gates} but the layer stacks {gates} gate "
                                 "matrices; drop gates: (it is read from the layer)")
            bound = self.bind(module, param)
            bound.layout(getattr(module, param).shape, f"layer '{name}' {param}")

    def bind(self, module: torch.nn.Module, param: str) -> Block:
        """This structure for ``module.<param>``: the gate count comes from the module (SPEC P13)."""
        gates = groups.gate_count(module, param)
        return self if gates == self.gates else replace(self, gates=gates)

    # --- the partition --------------------------------------------------------------------
    def layout(
        self, shape: torch.Size | tuple[int, ...], where: str = "weight"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-block index of every GEMM row and column-block index of every GEMM column.

        Raises ``ValueError`` naming ``where``, the shape and the fix when the block does not fit.
        """
        rows = shape[0]
        cols = 1
        for d in shape[1:]:
            cols *= d
        r, c = self.block
        if rows % self.gates:
            raise ValueError(
                f"{where}: {rows} rows do not split into {self.gates} gate matrices; "
                f"set gates to a divisor of {rows}"
            )
        height = rows // self.gates
        gate_note = f" ({self.gates} gates of {height} rows)" if self.gates > 1 else ""
        problems = []
        if height % r and not self.allow_ragged:
            problems.append(
                f"block rows {r} do not divide {height}{' (the gate height)' if self.gates > 1 else ''}; "
                f"use one of {_divisors_near(height, r)}"
            )
        if cols % c and not self.allow_ragged:
            problems.append(f"block cols {c} do not divide {cols}; use one of {_divisors_near(cols, c)}")
        if problems:
            raise ValueError(
                f"{where}: GEMM shape {rows}x{cols}{gate_note}, block {r}x{c}: "
                + "; ".join(problems)
                + ", or set allow_ragged=True to make the last block smaller"
            )
        per_gate = (height + r - 1) // r
        gate = torch.arange(self.gates).repeat_interleave(height)
        row_block = gate * per_gate + block_starts(height, r).repeat(self.gates)
        return row_block, block_starts(cols, c)

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        ids, n, _ = self.partition(weight)
        return ids, n

    def partition(self, weight: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(group id of every entry, number of groups, block of every group)``."""
        rows, cols = groups.as_matrix(weight).shape
        row_block, col_block = self.layout(weight.shape)
        n_row_blocks, n_col_blocks = int(row_block[-1]) + 1, int(col_block[-1]) + 1
        device = weight.device
        if self.axis == "column":
            # group = (row block, column): r entries
            ids = row_block.view(-1, 1) * cols + torch.arange(cols).view(1, -1)
            n = n_row_blocks * cols
            owner = (torch.arange(n) // cols) * n_col_blocks + col_block.repeat(n_row_blocks)
        else:
            # group = (row, column block): c entries
            ids = torch.arange(rows).view(-1, 1) * n_col_blocks + col_block.view(1, -1)
            n = rows * n_col_blocks
            owner = row_block.repeat_interleave(n_col_blocks) * n_col_blocks
            owner = owner + torch.arange(n_col_blocks).repeat(rows)
        return ids.to(device), n, owner.to(device)

    # --- the projection -------------------------------------------------------------------
    def support(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.per_block:
            return super().support(weight)
        ids, n, owner = self.partition(weight)
        scores = groups.group_scores(groups.as_matrix(weight), ids, n)
        keep = top_groups_per_block(scores, owner, self.target_sparsity)
        return keep[ids].reshape(weight.shape)

    def kept_groups(self, weight: torch.Tensor) -> int:
        if not self.per_block:
            return super().kept_groups(weight)
        _, _, owner = self.partition(weight)
        sizes = torch.bincount(owner)
        return sum(groups.kept_count(int(s), self.target_sparsity) for s in sizes if s > 0)

    # --- serialisation --------------------------------------------------------------------
    @classmethod
    def example(cls) -> Block:
        return cls(sparsity=0.5, block=(2, 2))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block"] = list(self.block)
        for flag in ("per_block", "allow_ragged"):
            if getattr(self, flag):
                out[flag] = True
        if self.gates != 1:
            out["gates"] = self.gates
        return out


@register_structure("block_row")
@dataclass(frozen=True)
class BlockRow(Block):
    """Inside every ``r x c`` block, keep or drop whole block-rows (one row restricted to ``c`` columns).

    >>> BlockRow(sparsity=0.5, block=(1, 2)).project(torch.tensor([[1., 2., 0., 3.]]))
    tensor([[0., 0., 0., 3.]])
    """

    axis: ClassVar[str] = "row"


def top_groups_per_block(scores: torch.Tensor, owner: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep, in every block, its ``kept_count(size, sparsity)`` groups of largest score (ties: lower index).

    ``owner[g]`` is the block of group ``g``. This is the exact projection onto "each block keeps
    its share", the product of one top-k set per block.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(owner[order], stable=True)]  # by block, then score desc, then index
    sizes = torch.bincount(owner)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel(), device=scores.device) - starts[owner[order]]
    quota = [groups.kept_count(int(s), sparsity) if s > 0 else 0 for s in sizes.tolist()]
    quota = torch.tensor(quota, device=scores.device)
    keep = torch.zeros_like(owner, dtype=torch.bool)
    keep[order] = rank < quota[owner[order]]
    return keep


@dataclass(frozen=True)
class BlockFilter(Filter):
    """``Filter`` whose rows are split into equal blocks: every block keeps its top rows by L2 norm.

    ``blocks[r]`` is the block of row ``r``; each block keeps ``kept_count(block size, sparsity)`` rows,
    which is the exact Euclidean projection onto that set. Coupled targets over channels that a grouped
    conv splits into conv groups use it (see :mod:`admmcompress.plan.coupled`), so every conv group keeps
    the same number of channels. Not registered: its blocks come from the model's graph, not from a plan.

    >>> w = torch.tensor([[3.0], [1.0], [0.5], [2.0]])
    >>> BlockFilter(sparsity=0.5, blocks=(0, 0, 1, 1)).project(w).flatten().tolist()
    [3.0, 0.0, 0.0, 2.0]
    """

    blocks: tuple[int, ...] = ()

    def _owner(self, weight: torch.Tensor) -> torch.Tensor:
        rows = groups.as_matrix(weight).shape[0]
        if len(self.blocks) != rows:
            raise ValueError(f"BlockFilter: {len(self.blocks)} block ids for a matrix with {rows} rows")
        return torch.tensor(self.blocks, dtype=torch.long, device=weight.device)

    def support(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = groups.as_matrix(weight).detach().to(torch.float64)
        keep = top_groups_per_block((matrix * matrix).sum(dim=1), self._owner(weight), self.target_sparsity)
        return keep.view(-1, 1).expand(matrix.shape).reshape(weight.shape).clone()

    def kept_groups(self, weight: torch.Tensor) -> int:
        sizes = torch.bincount(self._owner(weight))
        return sum(groups.kept_count(int(n), self.target_sparsity) for n in sizes.tolist() if n)


__all__ = ["Block", "BlockFilter", "BlockRow", "top_groups_per_block"]

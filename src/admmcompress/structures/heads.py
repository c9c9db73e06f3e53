"""Whole attention heads: the ``heads`` structure.

A plan names an attention block by its query projection (``{match: "*attention.self.query", structure: heads,
sparsity: 0.25}`` in BERT, ``"*attention.q_lin"`` in DistilBERT, ``"*q_proj"`` in ViT/Whisper/LLaMA-style blocks,
``"*attn.c_attn"`` in GPT-2 after ``linear_from_conv1d``); ``Plan.resolve`` turns the target into one coupled
target over the block's query, key and value rows and the output projection's columns
(:mod:`admmcompress.plan.attention` finds them). With grouped-query attention a "head" here is a key/value head
with the query heads sharing it. Its GEMM view has one row per head channel, ``head_dim``
consecutive rows per head; the projection keeps the ``k`` heads of largest L2 norm over all four layers, an
exact projection (a partition into groups, like ``filter``). ``compact`` then slices the removed heads out.

>>> import torch
>>> w = torch.tensor([[1.0], [1.0], [3.0], [0.0], [0.5], [0.5]])   # 3 heads of 2 channels
>>> Heads(sparsity=0.5, head_dim=2).project(w).flatten().tolist()  # keeps round(3 * 0.5) = 2 heads
[1.0, 1.0, 3.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from admmcompress.models.conv1d import is_conv1d
from admmcompress.structures import groups
from admmcompress.structures.base import register_structure
from admmcompress.structures.scalars import plain_number
from admmcompress.structures.sparsity import SparsityStructure, unsupported_layer


@register_structure("heads", aliases=("attention_heads",))
@dataclass(frozen=True)
class Heads(SparsityStructure):
    """Keep the ``k`` attention heads of largest L2 norm; ``head_dim`` is set by ``Plan.resolve``."""

    head_dim: int | None = None
    options: ClassVar[tuple[str, ...]] = ("head_dim",)

    def __post_init__(self) -> None:
        super().__post_init__()
        size = plain_number(self.head_dim) if self.head_dim is not None else None
        # head_dim=0 divided by zero in group_ids; a float or string split rows into fractional heads (a review)
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise ValueError(f"Heads: head_dim={self.head_dim!r} must be a positive integer (channels per head), "
                             "or left out: Plan.resolve reads it from the attention block")
        object.__setattr__(self, "head_dim", size)

    def check_module(self, module: torch.nn.Module, name: str) -> None:
        if is_conv1d(module):  # GPT-2's fused c_attn: heads are read once it is an nn.Linear
            raise ValueError(unsupported_layer(name, module, "heads", "nn.Linear"))
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"layer '{name}' is {type(module).__name__}; a heads rule names an attention block's query "
                "projection (an nn.Linear such as '*attention.self.query', '*attention.q_lin' or '*q_proj')"
            )

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.head_dim is None:
            raise ValueError("heads: head_dim unknown; build heads targets with Plan.resolve, which reads the block")
        rows, cols = groups.as_matrix(weight).shape
        if rows % self.head_dim:
            raise ValueError(f"heads: {rows} channels do not split into heads of {self.head_dim}")
        return groups.row_ids(rows, cols, weight.device) // self.head_dim, rows // self.head_dim

    @classmethod
    def example(cls) -> Heads:
        return cls(sparsity=0.5, head_dim=2)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.head_dim is not None:  # normally read from the model; a plan may state it (then it is checked)
            out["head_dim"] = self.head_dim
        return out


__all__ = ["Heads"]

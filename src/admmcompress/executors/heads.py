"""Slice dead attention heads out of a model (part of ``compact``; hand-written: Torch-Pruning cannot trace heads).

A head is dead when it cannot change the block's output: its columns of the output projection are all zero,
or its value rows and value bias are all zero (its attention then averages zeros). Removing it slices its
rows out of the query, key and value projections and its columns out of the output projection, and lowers the
block's head-count attributes (``num_heads`` / ``num_attention_heads`` / ``all_head_size``); the attention code
of the built-in layouts infers the head count from the projections' width, so the outputs are unchanged, which
``compact`` checks. One head is always kept.

>>> import torch, torch.nn as nn
>>> class Attention(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.num_heads, self.head_dim = 2, 2
...         self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
...         self.o_proj = nn.Linear(4, 4)
>>> model = nn.Sequential(Attention())
>>> with torch.no_grad():
...     model[0].o_proj.weight[:, 2:] = 0  # the second head's output columns
>>> remove_dead_heads(model), model[0].num_heads, model[0].q_proj
({'0': (2, 1)}, 1, Linear(in_features=4, out_features=2, bias=True))
"""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.plan.attention import ALL_HEADS_ATTRS, HEAD_COUNT_ATTRS, AttentionLayout, attention_layouts


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def _sliced(old: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    weight = old.weight.index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if old.bias is not None:
        new.bias.copy_(old.bias.index_select(0, keep) if dim == 0 else old.bias)
    new.train(old.training)
    return new


@torch.no_grad()
def dead_heads(model: nn.Module, layout: AttentionLayout) -> torch.Tensor:
    """Boolean per head: its output columns are zero, or its value rows and bias are."""
    o, v = model.get_submodule(layout.o), model.get_submodule(layout.v)
    out_cols = o.weight.reshape(o.out_features, layout.heads, layout.head_dim)
    silent = (out_cols == 0).all(dim=2).all(dim=0)
    values = v.weight.reshape(layout.heads, -1) == 0
    if v.bias is not None:
        values = torch.cat([values, (v.bias.reshape(layout.heads, -1) == 0)], dim=1)
    return silent | values.all(dim=1)


def remove_dead_heads(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Slice every dead head out, in place; ``{block: (heads before, heads after)}`` for blocks that shrank."""
    changed = {}
    for layout in attention_layouts(model).values():
        dead = dead_heads(model, layout)
        if bool(dead.all()):
            dead[0] = False  # a block keeps one head (its output is then exactly zero, as before)
        if not bool(dead.any()):
            continue
        kept_heads = torch.nonzero(~dead).flatten()
        keep = (kept_heads[:, None] * layout.head_dim + torch.arange(layout.head_dim)).flatten()
        for name, dim in ((layout.q, 0), (layout.k, 0), (layout.v, 0), (layout.o, 1)):
            _set(model, name, _sliced(model.get_submodule(name), keep, dim))
        block = model.get_submodule(layout.module)
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(block, attr, None), int):
                setattr(block, attr, len(kept_heads))
        for attr in ALL_HEADS_ATTRS:
            if isinstance(getattr(block, attr, None), int):
                setattr(block, attr, len(kept_heads) * layout.head_dim)
        changed[layout.module] = (layout.heads, len(kept_heads))
    return changed


__all__ = ["dead_heads", "remove_dead_heads"]

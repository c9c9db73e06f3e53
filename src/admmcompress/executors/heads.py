"""Slice dead attention heads out of a model (part of ``compact``; hand-written: Torch-Pruning cannot trace heads).

A head is dead when it cannot change the block's output: its columns of the output projection are all zero,
or its value rows and value bias are all zero (its attention then averages zeros). Removing it slices its
rows out of the query, key and value projections and its columns out of the output projection, and lowers the
block's head-count attributes (``num_heads`` / ``num_attention_heads`` / ``n_heads`` / ``num_key_value_heads`` /
``all_head_size`` / ``split_size``, and the layout's ``width_attrs``: DistilBERT's ``dim``); the attention code of
the built-in layouts infers the head count from the projections' width or reads these attributes, so the outputs
are unchanged, which ``compact`` checks. One head is always kept.

With grouped-query attention the unit is a key/value head with the query heads that read it: it is dead when
its value rows are zero or every one of its query heads' output columns is. A fused projection (GPT-2's
``c_attn``) loses the query, key and value rows of the removed heads together.

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

from admmcompress.module_swap import replace_module
from admmcompress.plan.attention import (
    ALL_HEADS_ATTRS,
    HEAD_COUNT_ATTRS,
    KV_COUNT_ATTRS,
    AttentionLayout,
    attention_layouts,
)


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


def _value_rows(layout: AttentionLayout) -> slice:
    start = layout.width + layout.kv_width if layout.fused else 0
    return slice(start, start + layout.kv_width)


@torch.no_grad()
def dead_heads(model: nn.Module, layout: AttentionLayout) -> torch.Tensor:
    """Boolean per key/value head (per head without grouped-query attention): every query head of its group has
    zero output columns, or its value rows and bias are zero."""
    o, v = model.get_submodule(layout.o), model.get_submodule(layout.v)
    out_cols = o.weight.reshape(o.out_features, layout.kv_count, layout.group * layout.head_dim)
    silent = (out_cols == 0).all(dim=2).all(dim=0)
    rows = _value_rows(layout)
    values = v.weight[rows].reshape(layout.kv_count, -1) == 0
    if v.bias is not None:
        values = torch.cat([values, (v.bias[rows].reshape(layout.kv_count, -1) == 0)], dim=1)
    return silent | values.all(dim=1)


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    return (units[:, None] * size + torch.arange(size)).flatten()


def remove_dead_heads(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Slice every dead head out, in place; ``{block: (query heads before, after)}`` for blocks that shrank."""
    changed = {}
    for layout in attention_layouts(model).values():
        dead = dead_heads(model, layout)
        if bool(dead.all()):
            dead[0] = False  # a block keeps one head (its output is then exactly zero, as before)
        if not bool(dead.any()):
            continue
        kept = torch.nonzero(~dead).flatten()  # key/value heads (= heads without grouped-query attention)
        q_keep = _rows(kept, layout.group * layout.head_dim)
        kv_keep = _rows(kept, layout.head_dim)
        if layout.fused:
            stacked = torch.cat([q_keep, kv_keep + layout.width, kv_keep + layout.width + layout.kv_width])
            replace_module(model, layout.q, _sliced(model.get_submodule(layout.q), stacked, 0))
        else:
            for name, keep in ((layout.q, q_keep), (layout.k, kv_keep), (layout.v, kv_keep)):
                replace_module(model, name, _sliced(model.get_submodule(name), keep, 0))
        replace_module(model, layout.o, _sliced(model.get_submodule(layout.o), q_keep, 1))
        heads = len(kept) * layout.group
        block = model.get_submodule(layout.module)
        _lower(block, HEAD_COUNT_ATTRS, layout.heads, heads)
        _lower(block, KV_COUNT_ATTRS, layout.kv_count, len(kept))
        _lower(block, ALL_HEADS_ATTRS + layout.width_attrs, layout.width, heads * layout.head_dim)
        changed[layout.module] = (layout.heads, heads)
    return changed


def _lower(block: nn.Module, attrs: tuple[str, ...], before: int, after: int) -> None:
    """Set the block's integer attributes that held ``before`` to ``after`` (others mean something else)."""
    for attr in attrs:
        if getattr(block, attr, None) == before and isinstance(getattr(block, attr), int):
            setattr(block, attr, after)


__all__ = ["dead_heads", "remove_dead_heads"]

"""Attention heads: where a model keeps its query/key/value/output projections, and a head's channels.

Torch-Pruning's trace sees a head's channels disappear into reshapes, transposes and a matrix product, so it
cannot tie a head's query, key and value rows to the output projection's columns; this module does that by
reading the model's structure instead (hand-written here). An :class:`AttentionLayout` names the four Linear
layers of one attention block, its head count and head size, and the attributes that hold the head count, so
a ``heads`` target can prune whole heads (``plan.coupled``) and ``compact`` can slice them out.

Layouts are found by adapters, tried in order; :func:`register_attention` adds one for another architecture.
Built in:

- ``q_proj``/``k_proj``/``v_proj`` and ``o_proj``/``out_proj`` in one module with ``num_heads`` or
  ``num_attention_heads`` and ``head_dim`` (transformers' ViT, Whisper, Wav2Vec2, LLaMA-style attention);
- ``query``/``key``/``value`` with ``num_attention_heads`` and ``attention_head_size`` whose parent holds
  ``output.dense`` (BERT-style ``attention.self`` / ``attention.output``).

Grouped-query attention (fewer key/value heads than query heads) is refused with a message, as are packed
projections (``nn.MultiheadAttention``'s ``in_proj_weight``, GPT-2's fused ``c_attn``).

>>> import torch.nn as nn
>>> class Attention(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.num_heads, self.head_dim = 2, 4
...         self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
...         self.o_proj = nn.Linear(8, 8)
>>> model = nn.Sequential(Attention())
>>> layout = attention_layouts(model)["0.q_proj"]
>>> layout.heads, layout.head_dim, (layout.q, layout.k, layout.v, layout.o)
(2, 4, ('0.q_proj', '0.k_proj', '0.v_proj', '0.o_proj'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size")
ALL_HEADS_ATTRS = ("all_head_size",)  # heads * head_dim, kept in step when heads are removed


@dataclass(frozen=True)
class AttentionLayout:
    """One attention block: full names of its projections, where the head count lives, and the sizes."""

    module: str  # the module holding the head-count attributes
    q: str
    k: str
    v: str
    o: str
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


Adapter = Callable[[str, nn.Module, dict[str, nn.Module]], AttentionLayout | None]
_ADAPTERS: list[Adapter] = []


def register_attention(adapter: Adapter) -> Adapter:
    """Add an adapter ``(name, module, modules) -> AttentionLayout | None`` (tried before the built-ins)."""
    _ADAPTERS.insert(0, adapter)
    return adapter


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _check_gqa(name: str, module: nn.Module, heads: int) -> None:
    kv = getattr(module, "num_key_value_heads", None) or getattr(getattr(module, "config", None),
                                                                  "num_key_value_heads", None)
    if isinstance(kv, int) and kv != heads:
        raise ValueError(
            f"attention '{name}' shares {kv} key/value heads among {heads} query heads (grouped-query attention); "
            "head pruning supports one key/value head per query head: prune its FFN units instead"
        )


def _layout(name: str, module: nn.Module, q: str, k: str, v: str, o: str,
            modules: dict[str, nn.Module]) -> AttentionLayout | None:
    heads, head_dim = _first_attr(module, HEAD_COUNT_ATTRS), _first_attr(module, HEAD_SIZE_ATTRS)
    layers = [modules.get(n) for n in (q, k, v, o)]
    if heads is None or head_dim is None or not all(isinstance(m, nn.Linear) for m in layers):
        return None
    width = heads * head_dim
    if not all(m.out_features == width for m in layers[:3]) or layers[3].in_features != width:
        return None
    _check_gqa(name, module, heads)
    return AttentionLayout(name, q, k, v, o, heads, head_dim)


def _proj_style(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionLayout | None:
    children = dict(module.named_children())
    if not {"q_proj", "k_proj", "v_proj"} <= set(children):
        return None
    out = next((o for o in ("o_proj", "out_proj") if o in children), None)
    if out is None:
        return None
    q, k, v, o = (_join(name, c) for c in ("q_proj", "k_proj", "v_proj", out))
    return _layout(name, module, q, k, v, o, modules)


def _bert_style(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionLayout | None:
    if not {"query", "key", "value"} <= set(dict(module.named_children())) or "." not in name:
        return None
    parent = name.rpartition(".")[0]
    q, k, v = (_join(name, c) for c in ("query", "key", "value"))
    return _layout(name, module, q, k, v, _join(parent, "output.dense"), modules)


_BUILT_IN: tuple[Adapter, ...] = (_proj_style, _bert_style)


def attention_layouts(model: nn.Module) -> dict[str, AttentionLayout]:
    """Every attention block an adapter recognises, by the name of its query projection."""
    modules = dict(model.named_modules())
    found: dict[str, AttentionLayout] = {}
    for name, module in modules.items():
        for adapter in (*_ADAPTERS, *_BUILT_IN):
            layout = adapter(name, module, modules)
            if layout is not None:
                found[layout.q] = layout
                break
    return found


__all__ = ["AttentionLayout", "attention_layouts", "register_attention"]

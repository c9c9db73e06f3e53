"""Attention heads: where a model keeps its query/key/value/output projections, and a head's channels.

Torch-Pruning's trace sees a head's channels disappear into reshapes, transposes and a matrix product, so it
cannot tie a head's query, key and value rows to the output projection's columns; this module does that by
reading the model's structure instead (hand-written here). An :class:`AttentionLayout` names the four Linear
layers of one attention block, its head count and head size, and the attributes that hold the head count, so
a ``heads`` target can prune whole heads (``plan.coupled``) and ``compact`` can slice them out.

Layouts are found by adapters, tried in order; :func:`register_attention` adds one for another architecture.
Built in:

- ``q_proj``/``k_proj``/``v_proj`` and ``o_proj``/``out_proj`` in one module with ``head_dim`` and, optionally,
  ``num_heads`` or ``num_attention_heads`` (else the head count is the query width over ``head_dim``):
  transformers' ViT, Whisper, Wav2Vec2, and LLaMA/Mistral/Qwen2-style attention;
- ``query``/``key``/``value`` with ``num_attention_heads`` and ``attention_head_size`` whose parent holds
  ``output.dense`` (BERT-style ``attention.self`` / ``attention.output``);
- GPT-2's fused ``c_attn`` (query, key and value rows stacked in one Linear, split by ``split_size``) with
  ``c_proj``, once its ``Conv1D`` layers are ``nn.Linear`` (:func:`admmcompress.models.conv1d.linear_from_conv1d`);
- ``q_lin``/``k_lin``/``v_lin``/``out_lin`` with ``n_heads`` and ``dim`` (transformers' DistilBERT; the head size is
  ``attention_head_size`` where the block has it, else ``dim // n_heads``); ``dim`` is lowered with the heads.

Grouped-query attention (``kv_heads`` key/value heads, each shared by ``heads // kv_heads`` query heads) prunes
whole groups: a key head, a value head, and the query heads and output columns that read them
(:func:`head_channels` maps every layer's channels onto the key/value channels). Packed projections of
``nn.MultiheadAttention`` (``in_proj_weight``) are not read.

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

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads")  # n_heads: DistilBERT
KV_COUNT_ATTRS = ("num_key_value_heads",)
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size")
ALL_HEADS_ATTRS = ("all_head_size", "split_size")  # heads * head_dim (BERT, GPT-2), kept in step with the heads


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
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: one per query head
    fused: bool = False  # q, k and v are row blocks of one Linear (q, k and v name it), in that order
    # the block's own attributes holding heads * head_dim besides ALL_HEADS_ATTRS (DistilBERT's ``dim``: too common
    # a name to lower on every block), lowered with the heads by compaction
    width_attrs: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_count(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def kv_width(self) -> int:
        """Channels of the key (and value) projection: the unit of pruning is one key/value head's group."""
        return self.kv_count * self.head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_count


def head_channels(layout: AttentionLayout) -> list[tuple[str, int, tuple[int, ...], tuple[int, ...]]]:
    """``(layer, dim, local, root)`` per projection: weight rows (q/k/v, ``dim`` 0) or columns (o, ``dim`` 1) at
    ``local`` carry key/value channel ``root`` (with grouped-query attention a group's query heads share the root
    channels of their key/value head; for a fused projection the key and value rows follow the query rows).

    >>> layout = AttentionLayout("a", "a.q", "a.k", "a.v", "a.o", heads=4, head_dim=1, kv_heads=2)
    >>> [(layer, root) for layer, _, _, root in head_channels(layout)]
    [('a.q', (0, 0, 1, 1)), ('a.k', (0, 1)), ('a.v', (0, 1)), ('a.o', (0, 0, 1, 1))]
    """
    d, group = layout.head_dim, layout.group
    q_root = tuple((c // d) // group * d + c % d for c in range(layout.width))
    kv_root = tuple(range(layout.kv_width))
    k_off, v_off = (layout.width, layout.width + layout.kv_width) if layout.fused else (0, 0)
    return [
        (layout.q, 0, tuple(range(layout.width)), q_root),
        (layout.k, 0, tuple(c + k_off for c in kv_root), kv_root),
        (layout.v, 0, tuple(c + v_off for c in kv_root), kv_root),
        (layout.o, 1, tuple(range(layout.width)), q_root),
    ]


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


def _check_kv(name: str, module: nn.Module, kv_heads: int) -> None:
    """A block that states its key/value head count must agree with its key projection's width."""
    stated = _first_attr(module, ("num_key_value_heads",))
    if stated is not None and stated != kv_heads:
        raise ValueError(
            f"attention '{name}' says num_key_value_heads={stated} but its key projection holds {kv_heads} heads; "
            "fix the attribute (or register an adapter with admmcompress.plan.attention.register_attention)"
        )


def _layout(name: str, module: nn.Module, q: str, k: str, v: str, o: str,
            modules: dict[str, nn.Module], head_dim: int | None = None) -> AttentionLayout | None:
    """The layout of projections ``q``..``o``, or None where they are not Linear layers of one head size; the
    head size is the block's ``HEAD_SIZE_ATTRS`` (else ``head_dim``)."""
    head_dim = _first_attr(module, HEAD_SIZE_ATTRS) or head_dim
    layers = [modules.get(n) for n in (q, k, v, o)]
    if head_dim is None or head_dim <= 0 or not all(isinstance(m, nn.Linear) for m in layers):
        return None
    heads = _first_attr(module, HEAD_COUNT_ATTRS)
    if heads is None:  # LLaMA-style blocks infer the head count from the projection's width
        heads = layers[0].out_features // head_dim
    width, kv_width = heads * head_dim, layers[1].out_features
    if layers[0].out_features != width or layers[2].out_features != kv_width or layers[3].in_features != width:
        return None
    if kv_width % head_dim or not kv_width or heads % (kv_width // head_dim):
        return None
    kv_heads = kv_width // head_dim
    _check_kv(name, module, kv_heads)
    return AttentionLayout(name, q, k, v, o, heads, head_dim, kv_heads if kv_heads != heads else None)


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


def _fused_style(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionLayout | None:
    """GPT-2: ``c_attn`` stacks query, key and value rows (``split_size`` each), ``c_proj`` reads the heads."""
    children = dict(module.named_children())
    if not {"c_attn", "c_proj"} <= set(children) or "q_attn" in children:  # cross-attention splits differently
        return None
    heads, head_dim = _first_attr(module, HEAD_COUNT_ATTRS), _first_attr(module, HEAD_SIZE_ATTRS)
    qkv, out = children["c_attn"], children["c_proj"]
    if heads is None or head_dim is None or not (isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)):
        return None
    width = heads * head_dim
    if qkv.out_features != 3 * width or out.in_features != width or _first_attr(module, ("split_size",)) != width:
        return None
    qkv_name = _join(name, "c_attn")
    return AttentionLayout(name, qkv_name, qkv_name, qkv_name, _join(name, "c_proj"), heads, head_dim, fused=True)


def _distilbert_style(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionLayout | None:
    """DistilBERT: ``q_lin``/``k_lin``/``v_lin``/``out_lin`` with ``n_heads`` and ``dim`` (= heads * head size)."""
    if not {"q_lin", "k_lin", "v_lin", "out_lin"} <= set(dict(module.named_children())):
        return None
    heads, dim = _first_attr(module, ("n_heads",)), _first_attr(module, ("dim",))
    if heads is None or heads <= 0:
        return None
    # transformers 5 reads attention_head_size (taken first by _layout); older versions derive it from dim
    derived = dim // heads if dim is not None and dim % heads == 0 else None
    q, k, v, o = (_join(name, c) for c in ("q_lin", "k_lin", "v_lin", "out_lin"))
    layout = _layout(name, module, q, k, v, o, modules, head_dim=derived)
    return None if layout is None else replace(layout, width_attrs=("dim",))


_BUILT_IN: tuple[Adapter, ...] = (_proj_style, _bert_style, _fused_style, _distilbert_style)


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


def query_key_layers(model: nn.Module) -> list[str]:
    """The separate query and key projections of every attention block found (not fused ones).

    The channel trace treats their outputs as model outputs (see ``plan.graph.build_dependency_graph``): what
    follows them (rotary embeddings' slices and concatenations, the attention product) can only tie heads, which
    the layouts here handle, and Torch-Pruning 1.6.0's index propagation through LLaMA's rotary halves runs for
    minutes per layer.
    """
    try:
        layouts = attention_layouts(model)
    except ValueError:  # a block that cannot be read: traced as it is (a heads target on it is refused anyway)
        return []
    return [name for lay in layouts.values() if not lay.fused for name in (lay.q, lay.k)]


# Names of the norms on queries and keys: Qwen3/OLMo2 q_norm/k_norm, Phi's q_layernorm/k_layernorm (with a bias),
# query_norm/key_norm; not a norm on the attention output (BitNet's attn_sub_norm, a review of the change).
QK_NORM_NAME = re.compile(r"(^|_)(q|k|query|key)_?(norm|layernorm|ln)$")


def query_key_norms(model: nn.Module) -> list[str]:
    """The norms inside an attention block that act on its queries or keys (Qwen3's and OLMo2's ``q_norm`` and
    ``k_norm``): children of the block named so (``QK_NORM_NAME``) holding 1-D weights. Cut from the trace as
    the query/key projections are (their weights brought the rotary halves back into it: resolving a plan on a
    one-layer Qwen3 ran for minutes, a review's finding)."""
    try:
        layouts = attention_layouts(model)
    except ValueError:
        return []
    found = []
    for lay in layouts.values():
        if lay.fused:
            continue
        block = model.get_submodule(lay.module)
        projections = {lay.q, lay.k, lay.v, lay.o}
        for child_name, child in block.named_children():
            full = f"{lay.module}.{child_name}" if lay.module else child_name
            weights = [p for p in child.parameters(recurse=False)]
            if full not in projections and QK_NORM_NAME.search(child_name) and 1 <= len(weights) <= 2 \
                    and all(w.dim() == 1 for w in weights):
                found.append(full)
    return list(dict.fromkeys(found))


__all__ = ["AttentionLayout", "attention_layouts", "head_channels", "query_key_layers", "query_key_norms",
           "register_attention"]

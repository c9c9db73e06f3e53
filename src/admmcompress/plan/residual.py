"""Hidden size across the residual stream: channel rules for LayerNorm, Embedding and free parameters.

A transformer's hidden size is one channel group: the embeddings write it, every block's attention output
projection and second FFN layer add into it, LayerNorms rescale it, and q/k/v, the first FFN layers and the
classifier read it. Which layers share that group comes from Torch-Pruning's dependency graph, which already
follows residual adds, LayerNorm, ``nn.Embedding`` and free ``nn.Parameter`` tensors (ViT's position embeddings
and class token, ConvNeXt's layer scale) and prunes all of them (its ``LayernormPruner``, ``EmbeddingPruner``,
``ParameterPruner``). What it lacks, written here by hand:

- member roles for those layers in :mod:`admmcompress.plan.graph`'s groups (``layernorm``, ``embedding``,
  ``parameter``), with the slice of each parameter that carries a channel, so a coupled target zeroes every
  member's share of a hidden channel (word, position and token-type embedding columns, LayerNorm weight and
  bias entries, position-embedding and layer-scale entries, writer rows, reader columns);
- exactness. LayerNorm averages over all hidden channels, so slicing its weight (Torch-Pruning's way) changes
  the kept channels' outputs: it is exact only after fine-tuning. A hidden channel that is zero everywhere
  (the masked model) still counts in the divisor. :class:`WidthKeepingLayerNorm` computes the statistics of the
  full width from the kept channels (the removed ones are known zeros), so the compacted model computes the
  masked model's function; ``compact`` swaps it in for every LayerNorm whose width shrank
  (:func:`keep_norm_widths`) and updates ``config.hidden_size`` (:func:`update_hidden_size`). Channels that are
  merely unread are not removed from a group with a LayerNorm (they still move its statistics);
- RMSNorm (LLaMA, Mistral, Qwen2), which Torch-Pruning sees only as ops and a free weight: its inside is
  recognised by module (:func:`record_rms_nodes`), and after compaction it stays a standard RMSNorm with its eps
  times ``full / kept`` and its weight times ``sqrt(full / kept)``, which is exact (``config.rms_norm_eps``
  follows, so ``save_pretrained`` can say it);
- tied weights (an LM head sharing the embedding's tensor): Torch-Pruning slices both as separate tensors;
  :func:`retie` makes them one again;
- checks: a LayerNorm without a weight would re-create a pruned channel, and LayerNorm subclasses whose forward
  is unknown cannot be swapped, so both are problems of the group (one line each).

>>> import torch
>>> norm = torch.nn.LayerNorm(4)
>>> x = torch.tensor([[1.0, 2.0, 0.0, 0.0]])   # the last two channels were pruned (exactly zero)
>>> small = WidthKeepingLayerNorm.from_norm(norm, full_width=4)
>>> small.weight = torch.nn.Parameter(norm.weight[:2].detach()); small.bias = torch.nn.Parameter(norm.bias[:2].detach())
>>> small.normalized_shape = (2,)
>>> torch.allclose(small(x[:, :2]), norm(x)[:, :2], atol=1e-6)
True
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from admmcompress.module_swap import replace_module
from admmcompress.plan.channel_ops import op_name

LAYERNORM, EMBEDDING, PARAMETER = "layernorm", "embedding", "parameter"
STREAM_ROLES = (LAYERNORM, EMBEDDING, PARAMETER)


class WidthKeepingLayerNorm(nn.LayerNorm):
    """LayerNorm over ``normalized_shape`` kept channels of a stream that was ``full_width`` wide, the removed
    channels being exact zeros: mean and variance are those of the full width (hand-written; exact).

    ``channels_first`` normalizes dimension 1 (ConvNeXt's ``data_format="channels_first"``) instead of the last.
    """

    def __init__(self, normalized_shape: int, full_width: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, channels_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        if isinstance(full_width, bool) or not hasattr(full_width, "__index__"):  # int(4.5) would divide by 4
            raise ValueError(f"WidthKeepingLayerNorm: full_width={full_width!r} must be an integer, the width before "
                             "pruning")
        full_width = operator.index(full_width)
        if full_width < self.normalized_shape[-1]:
            raise ValueError(f"WidthKeepingLayerNorm: full_width={full_width} is below the width "
                             f"{self.normalized_shape[-1]}; it is the width before pruning")
        self.full_width = int(full_width)
        self.channels_first = bool(channels_first)

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm, full_width: int) -> WidthKeepingLayerNorm:
        """The same LayerNorm (weights shared, not copied) with the divisor of ``full_width`` channels."""
        new = cls(norm.normalized_shape[-1], full_width, eps=norm.eps, elementwise_affine=False,
                  channels_first=getattr(norm, "data_format", "channels_last") == "channels_first")
        new.elementwise_affine = norm.elementwise_affine
        new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_width={self.full_width}" + (", channels_first" if self.channels_first
                                                                           else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        removed = self.full_width - x.shape[-1]
        mean = x.sum(-1, keepdim=True) / self.full_width
        centred = x - mean
        # the removed channels are zeros: each adds mean^2 to the sum of squared deviations
        var = (centred.square().sum(-1, keepdim=True) + removed * mean.square()) / self.full_width
        y = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        if self.channels_first:
            y = y.movedim(-1, 1)
        return y


# RMSNorm classes of transformers' LLaMA family: ``weight * x * rsqrt(mean(x^2) + variance_epsilon)``.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm", "Phi3RMSNorm")


def is_rms_norm(module: Any) -> bool:
    """A LLaMA-style RMSNorm (its weight multiplies, its eps is ``variance_epsilon``); hand-written (Torch-Pruning
    sees only its weight, as a free parameter, and its ops)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ in RMS_NORMS and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


# Autograd nodes of a reduction: a norm holding one computes statistics (over the channels, for the norms here).
_REDUCING_NODES = ("Mean", "Var", "Std", "Sum", "Norm", "LinalgVectorNorm", "Amax", "VarMean", "StdMean")


def record_rms_nodes(found: dict[int, str], label: str = "", reducing_only: bool = False):
    """A forward hook (``with_kwargs=True``) that maps the ids of the autograd nodes an RMSNorm creates to ``label``
    in ``found``: its statistics mix channels only to scale them all alike, so inside it they are not ops of the
    channel group. ``reducing_only``: only for a module that reduces (a norm the library does not know; a frozen
    BatchNorm, ``x * scale + bias``, is per channel: a review's finding). The walk stops at every tensor input (a
    gated norm's gate comes from elsewhere in the network)."""

    def hook(module: nn.Module, args, kwargs, output) -> None:
        inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        stops = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
        stack = [output.grad_fn] if isinstance(output, torch.Tensor) and output.grad_fn is not None else []
        inside, seen = [], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in stops or id(node) in found or id(node) in seen \
                    or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(id(node))
            inside.append(node)
            stack.extend(fn for fn, _ in node.next_functions)
        if not reducing_only or any(op_name(type(n).__name__) in _REDUCING_NODES for n in inside):
            found.update({id(n): label for n in inside})

    return hook


def is_unknown_norm(module: nn.Module) -> bool:
    """A normalization layer none of the rules here knows (Gemma's ``x * (1 + w)`` RMSNorm, a user's own): a
    leaf module named like a norm that is no BatchNorm, LayerNorm or recognised RMSNorm. Its statistics span the
    channels, so the ops inside it are named as its own in a refusal, not offered as channelwise ops."""
    known = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    return ("norm" in type(module).__name__.lower() and not any(module.children()) and not isinstance(module, known)
            and not is_rms_norm(module))


def stream_role(module: Any) -> str | None:
    """The residual-stream role of a traced module (None when it has none here)."""
    if isinstance(module, nn.LayerNorm):
        return LAYERNORM
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def stream_param_dims(role: str, module: Any, dim: int) -> list[tuple[str, int]]:
    """``(parameter name, dimension)`` pairs carrying a channel; a free parameter is its own tensor (name "")."""
    if role == EMBEDDING:
        return [("weight", 1)]
    if role == LAYERNORM:
        return [(n, 0) for n in ("weight", "bias") if isinstance(getattr(module, n, None), torch.Tensor)]
    return [("", dim)]


def member_tensors(layer: str, role: str, dim: int, modules: dict[str, nn.Module]) -> list[tuple[torch.Tensor, int]]:
    """The tensors of one stream member and the dimension their channels lie along."""
    if role == PARAMETER:
        parent, _, child = layer.rpartition(".")
        return [(getattr(modules[parent], child), dim)]
    module = modules[layer]
    return [(getattr(module, n), d) for n, d in stream_param_dims(role, module, dim)]


# LayerNorm classes whose forward this library rewrites exactly: by module and name, or any class called LayerNorm
# (CLIP's, open_clip's and timm's cast to float32 around torch's; a channels-first one of that name fails the
# compaction's output check, not silently), or a subclass that keeps nn.LayerNorm's forward.
_KNOWN_LAYERNORMS = frozenset({
    "torch.nn.modules.normalization.LayerNorm",
    "admmcompress.plan.residual.WidthKeepingLayerNorm",
    "transformers.models.convnext.modeling_convnext.ConvNextLayerNorm",
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2LayerNorm",  # the same code as ConvNeXt's
})


def _known_layernorm(module: nn.Module) -> bool:
    cls = type(module)
    return (f"{cls.__module__}.{cls.__qualname__}" in _KNOWN_LAYERNORMS or cls.__name__ == "LayerNorm"
            or cls.forward is nn.LayerNorm.forward)


def stream_problem(name: str, module: Any) -> str | None:
    """Why a LayerNorm's channels cannot be removed exactly (None when they can)."""
    if not isinstance(module, nn.LayerNorm):
        return None
    if len(module.normalized_shape) != 1:
        return f"LayerNorm '{name}' normalizes over {tuple(module.normalized_shape)}; only one axis is supported"
    if module.weight is None:
        return (f"LayerNorm '{name}' has no weight (elementwise_affine=False), so it turns a removed (zero) channel "
                "back into a non-zero one; keep the channels it normalizes (exclude the layers writing them from the "
                "rule; in a transformer: keep the hidden size)")
    if not _known_layernorm(module):
        return (f"LayerNorm subclass '{name}' ({type(module).__name__}) has a forward this library cannot rewrite to "
                "keep its statistics exact; keep the channels it normalizes (exclude the layers writing them from the "
                "rule; in a transformer: keep the hidden size)")
    return None


def has_layernorm(group: Any) -> bool:
    """Whether a channel group passes through a LayerNorm or RMSNorm (then only all-zero channels can go)."""
    return any(m.role == LAYERNORM for m in group.members) or "RMSNorm" in group.ops


def norm_widths(model: nn.Module) -> dict[str, int]:
    """Every LayerNorm's full width (before pruning) and every RMSNorm's width, by module name."""
    return {
        name: getattr(m, "full_width", m.normalized_shape[-1]) if isinstance(m, nn.LayerNorm) else m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.LayerNorm) or is_rms_norm(m)
    }


@torch.no_grad()
def keep_norm_widths(model: nn.Module, widths: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Keep every norm narrower than its recorded width exact, in place; ``{name: (full, kept)}`` of those.

    A LayerNorm becomes a :class:`WidthKeepingLayerNorm`. An RMSNorm stays itself: ``mean(x^2)`` over ``kept``
    channels with ``eps * full / kept`` is ``full / kept`` times the full-width value, so the weight is scaled by
    ``sqrt(full / kept)`` and the function is unchanged (a standard layer, so ``save_pretrained`` can say it).
    """
    changed = {}
    for name, full in widths.items():
        norm = model.get_submodule(name)
        kept = norm.weight.numel() if is_rms_norm(norm) else norm.normalized_shape[-1]
        if kept == full:
            continue
        if is_rms_norm(norm):
            norm.weight.mul_((full / kept) ** 0.5)
            norm.variance_epsilon = norm.variance_epsilon * full / kept
        elif not isinstance(norm, WidthKeepingLayerNorm):
            replace_module(model, name, WidthKeepingLayerNorm.from_norm(norm, full))
        changed[name] = (full, kept)
    return changed


def tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """``(module name, attribute)`` lists of parameters that are one tensor (an LM head tied to the embedding)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None and (name, attr) not in owners.setdefault(id(param), []):
                owners[id(param)].append((name, attr))
    return [names for names in owners.values() if len(names) > 1]


@torch.no_grad()
def retie(model: nn.Module, ties: list[list[tuple[str, str]]]) -> None:
    """Make tied parameters one tensor again after pruning sliced each copy alike (Torch-Pruning prunes an
    embedding and the LM head reading it separately); copies that differ are left as they are."""
    for names in ties:
        first = getattr(model.get_submodule(names[0][0]), names[0][1])
        for module_name, attr in names[1:]:
            module = model.get_submodule(module_name)
            other = getattr(module, attr)
            if other is not first and other.shape == first.shape and torch.equal(other, first):
                setattr(module, attr, first)


def _update_stage_sizes(config: Any, shrunk: dict[str, tuple[int, int]]) -> None:
    """Per-stage widths (ConvNeXt's ``hidden_sizes``): a stage whose norms all shrank to one width takes it
    (only where the stage's width is unique, so that the norms can be told apart by width)."""
    sizes = getattr(config, "hidden_sizes", None)
    if not isinstance(sizes, list) or len(set(sizes)) != len(sizes):
        return
    for i, width in enumerate(list(sizes)):
        after = {kept for full, kept in shrunk.values() if full == width}
        if len(after) == 1:
            sizes[i] = after.pop()


def update_hidden_size(model: nn.Module, shrunk: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    """Lower ``model.config.hidden_size`` when the LayerNorms of that width all shrank to one new width;
    ``(before, after)`` or None when the config does not say the hidden size or it did not change."""
    config = getattr(model, "config", None)
    _update_stage_sizes(config, shrunk)
    before = getattr(config, "hidden_size", None)
    if not isinstance(before, int):
        return None
    after = {kept for full, kept in shrunk.values() if full == before}
    if len(after) != 1:
        return None
    heads = getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is None and isinstance(heads, int) and heads and before % heads == 0:
        # Configs that derive the head size from the hidden size (Qwen2: head_dim = hidden_size // heads) would
        # derive another one now, and so would a model rebuilt from this config (its rotary table: a crash on
        # save, a review's finding); the attention layers keep theirs, so the config states it.
        config.head_dim = before // heads
    config.hidden_size = after.pop()
    if isinstance(getattr(config, "rms_norm_eps", None), float):  # RMSNorms rescaled alike (keep_norm_widths)
        config.rms_norm_eps = config.rms_norm_eps * before / config.hidden_size
    return before, config.hidden_size


__all__ = [
    "EMBEDDING",
    "LAYERNORM",
    "PARAMETER",
    "STREAM_ROLES",
    "WidthKeepingLayerNorm",
    "has_layernorm",
    "is_rms_norm",
    "is_unknown_norm",
    "keep_norm_widths",
    "member_tensors",
    "norm_widths",
    "record_rms_nodes",
    "retie",
    "stream_param_dims",
    "stream_problem",
    "stream_role",
    "tied_parameters",
    "update_hidden_size",
]

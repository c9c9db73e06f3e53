"""Physical compaction: a structurally pruned (masked) model becomes a smaller dense model, same outputs.

Masks give no speed; ``compact`` is the explicit step that makes a model smaller. Channel groups come
from Torch-Pruning's dependency graph (residual adds, concatenation, depthwise convs, BatchNorm,
Linear after flatten), and removal uses its pruning functions. A group channel is removed when it is
provably dead (see :mod:`admmcompress.executors.channels`): unread by every consumer, or exactly
zero (filters, biases and BN shifts all zero), or a constant that was folded into the consumers'
biases (:mod:`admmcompress.executors.fold`). The result is checked against the input model on the
example inputs (eval mode, ``atol``) before it is returned; the input model is never modified.

Grouped convs that are not depthwise (``1 < groups < in_channels``) keep their ``groups``: PyTorch needs
every conv group to keep the same number of input and of output channels, so where a grouped conv splits
a channel group, the same number of channels is removed from every block (coupled targets prune that
way). Removable channels beyond that are kept (dead, harmless); pruned ones among them are an error
under ``strict`` naming the grouped conv and the fix.

An example the model cannot run, or a compacted layer that fails (one the trace did not see read the removed
channels), is one ``CompactionError`` line naming it.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
>>> with torch.no_grad():
...     model[0].weight[:4] = 0; model[1].weight[:4] = 0; model[1].bias[:4] = 0   # 4 filters pruned with BN
>>> result = compact(model, torch.randn(2, 3, 8, 8))
>>> result.model[0].out_channels, result.model[3].in_channels, result.params_after < result.params_before
(4, 4, True)
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from admmcompress.executors.channels import _covered, _zero_per_root, channel_status, may_remove_channels
from admmcompress.executors.fold import fold_constant_channels, forward
from admmcompress.executors.heads import remove_dead_heads
from admmcompress.finalize import MaskSet
from admmcompress.messages import first_line
from admmcompress.plan.graph import (
    DEPTHWISE,
    PRODUCER,
    ChannelGroup,
    _groups_with_roots,
    build_dependency_graph,
    example_problem,
    is_grouped_conv,
    output_tensors,
)
from admmcompress.plan.residual import (
    has_layernorm,
    keep_norm_widths,
    norm_widths,
    retie,
    tied_parameters,
    update_hidden_size,
)

COLUMN_MODES = ("off", "auto", "on")


class CompactionError(ValueError):
    """Pruned channels that cannot be removed, or a compacted model whose outputs differ."""


@dataclass(frozen=True)
class CompactConfig:
    """Options of ``compact``.

    Args:
        strict: raise ``CompactionError`` when a pruned filter cannot be removed (e.g. one member of a
            residual group kept it); with False the channel is kept and a warning says why.
        fold_constants: fold zero-weight channels with a bias/BN constant into consumers where exact.
        atol: largest allowed ``max |compacted - masked|`` on the example inputs (eval mode).
        extra_channelwise_ops: autograd op names (``"MyOp"`` for ``MyOpBackward0``) known to act per channel.
        columns: "off", "auto" (column executor where measured faster) or "on" (wherever columns are pruned).
    """

    strict: bool = True
    fold_constants: bool = True
    atol: float = 1e-4
    extra_channelwise_ops: tuple[str, ...] = ()
    columns: str = "off"

    def __post_init__(self) -> None:
        if self.columns not in COLUMN_MODES:
            raise ValueError(f"CompactConfig: columns={self.columns!r} must be one of {COLUMN_MODES}")
        if not self.atol >= 0:
            raise ValueError(f"CompactConfig: atol={self.atol!r} must be >= 0, e.g. 1e-4")


@dataclass
class CompactionResult:
    """The compacted model and what was done to get it."""

    model: nn.Module
    removed: dict[str, tuple[int, int]] = field(default_factory=dict)  # group label -> (removed, channels)
    folded: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float = 0.0
    columns: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)  # attention block -> (heads before, after)
    hidden: tuple[int, int] | None = None  # config.hidden_size (before, after) when the residual stream shrank

    def summary(self) -> str:
        lines = [
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_before / max(1, self.params_after):.2f}x); max |diff| {self.max_abs_diff:.2e}"
        ]
        lines += [f"  {label}: removed {r} of {n} channels" for label, (r, n) in self.removed.items() if r]
        lines += [f"  {block}: {a} -> {b} attention heads" for block, (a, b) in self.heads.items()]
        lines += [f"  folded constants of {n} channels of {label}" for label, n in self.folded.items()]
        lines += [f"  column executor on {name}: {info}" for name, info in self.columns.items()]
        lines += [f"  kept: {reason}" for reason in self.kept]
        return "\n".join(lines)


def _masked_rows(group: ChannelGroup, masks: MaskSet) -> torch.Tensor:
    """The root channels of ``group`` whose rows a mask zeroed in one of its producing layers."""
    out = torch.zeros(group.size, dtype=torch.bool)
    for m in group.members:
        name = f"{m.layer}.weight" if m.layer else "weight"
        if m.role not in (PRODUCER, DEPTHWISE) or name not in masks:
            continue
        mask = masks[name]
        if mask.dim() < 1 or max(m.local, default=-1) >= mask.shape[0]:
            continue  # a member whose mapping the trace lost (the group's problem): it is never removed
        out |= _zero_per_root(m, mask, 0, group.size) & _covered(m, group.size)
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compact(
    model: nn.Module,
    example_inputs,
    masks: MaskSet | None = None,
    config: CompactConfig | None = None,
) -> CompactionResult:
    """A physically smaller copy of ``model`` with the same outputs (the input model is not changed).

    ``masks`` (optional) are applied to the copy first, so pruned entries are exactly zero.
    ``example_inputs`` is what ``model`` is called with (a tensor, or a tuple of them). A model holding PENNI
    shared-kernel convs is refused in one line: ``executors.penni.compact_shared`` (what the ``compact``
    executor and a run's ``compact:`` call for such a model) compacts through them.
    """
    shared = [n for n, m in model.named_modules() if "coefs" in getattr(type(m), "factor_params", ())]
    if shared:  # its kernels are computed, so the trace cannot follow its channels (an IndexError further on)
        raise CompactionError(
            f"compact: '{shared[0]}' is a shared-kernel conv, which compact() cannot slice; use "
            "admmcompress.executors.penni.compact_shared(model, example, masks, config) or "
            "get_executor('compact').convert, which go through it"
        )
    config = config or CompactConfig()
    work = copy.deepcopy(model)
    # Every step below may replace parameters with new (trainable) ones: frozen ones are frozen again by name.
    frozen = {n for n, p in work.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if masks is not None:
        masks.apply(work)
    modes = {name: m.training for name, m in work.named_modules()}
    work.eval()
    reference = _reference_outputs(work, example_inputs)
    result = CompactionResult(model=work, params_before=count_params(work))
    result.heads = remove_dead_heads(work)  # before the trace: heads are not channels Torch-Pruning can follow

    traced = may_remove_channels(work)  # without a zero row/column nothing is removable: skip the trace
    graph = build_dependency_graph(work, example_inputs) if traced else None
    pairs = _groups_with_roots(work, example_inputs, tuple(config.extra_channelwise_ops), graph) if traced else []
    modules = dict(work.named_modules())
    statuses = [channel_status(g, modules) for g, _ in pairs]
    if config.fold_constants:
        requests = [(g, s.filters_zero & ~s.zero & ~s.unread) for (g, _), s in zip(pairs, statuses, strict=True)]
        fold = fold_constant_channels(work, example_inputs, requests)
        result.folded = fold.folded
        result.kept += fold.reasons
        statuses = [channel_status(g, modules) for g, _ in pairs]
    elif any(bool((s.filters_zero & ~s.zero & ~s.unread).any()) for s in statuses):
        result.kept.append("some zero filters keep a bias/BN constant and fold_constants=False, so they stay")

    plan = []
    for (group, root), status in zip(pairs, statuses, strict=True):
        removable = status.removable_now
        if group.blocks:  # grouped convs: the same number from every block, at least one kept in each
            removable = even_blocks(group.blocks, removable, status.pruned)
        elif bool(removable.all()):  # a layer needs at least one channel; a dead one changes nothing
            removable = removable.clone()
            removable[0] = False
        stuck = status.pruned & ~status.removable_now
        if masks is not None:  # zero rows the model had by itself (BART's padding row of its tied lm_head) were not
            stuck &= _masked_rows(group, masks)  # pruned: only those the masks removed must go
        if bool(stuck.any()) and not any(f"of '{group.label}'" in k for k in result.kept):
            result.kept.append(_why_kept(group, stuck, status, modules))
        uneven = status.pruned & status.removable_now & ~removable
        if group.blocks and bool(uneven.any()):
            result.kept.append(_why_uneven(group, uneven, status.removable_now))
        result.removed[group.label] = (int(removable.sum()), group.size)
        if bool(removable.any()):
            plan.append((group, root, removable))
    if result.kept and config.strict:
        raise CompactionError(
            "cannot remove every pruned channel "
            "(compact(..., config=CompactConfig(strict=False)) keeps them):\n  - " + "\n  - ".join(result.kept)
        )
    for kept in result.kept:
        warnings.warn(f"compact: {kept}", RuntimeWarning, stacklevel=2)

    widths, ties = norm_widths(work), tied_parameters(work)
    for group, (module, handler), removable in plan:
        idxs = _root_local(group, removable)
        _prune(graph, graph.get_pruning_group(module, handler, idxs))
    retie(work, ties)  # an LM head and the embedding it shares were sliced as two tensors
    result.hidden = update_hidden_size(work, keep_norm_widths(work, widths))  # LayerNorms keep their divisor

    if config.columns != "off":
        from admmcompress.executors.column import apply_column_executors

        result.columns = apply_column_executors(work, example_inputs, mode=config.columns, min_sparsity=0.0)
    for name, param in work.named_parameters(remove_duplicate=False):
        if name in frozen:
            param.requires_grad_(False)
    outputs = _compacted_outputs(work, example_inputs)
    result.max_abs_diff = _max_diff(reference, outputs)
    if not result.max_abs_diff <= config.atol:
        where = _first_divergence(model, masks, work, example_inputs, config.atol)
        raise CompactionError(
            f"the compacted model's outputs differ from the masked model's by {result.max_abs_diff:.3g} "
            f"(> atol={config.atol:g}){where}; an op in the model probably mixes channels or does not keep zero "
            "at zero. "
            "Declare an op known to act per channel with admmcompress.plan.register_channelwise_op, or report the model"
        )
    for name, m in work.named_modules():
        m.train(modes.get(name, model.training))
    result.params_after = count_params(work)
    return result


def even_blocks(blocks: tuple[int, ...], removable: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """The largest subset of ``removable`` with the same count in every block, at least one kept per block.

    Pruned channels go first within a block, then lower indices.

    >>> even_blocks((0, 0, 1, 1), torch.tensor([True, True, False, True]), torch.zeros(4, dtype=torch.bool))
    tensor([ True, False, False,  True])
    """
    owner = torch.tensor(blocks, dtype=torch.long)
    sizes = torch.bincount(owner)
    counts = torch.bincount(owner[removable], minlength=len(sizes))
    take = min(int(counts.min()), int(sizes.min()) - 1)
    out = torch.zeros_like(removable)
    if take <= 0:
        return out
    for b in range(len(sizes)):
        idx = torch.nonzero(removable & (owner == b)).flatten()
        order = torch.argsort((~pruned[idx]).to(torch.long), stable=True)  # pruned first, then by index
        out[idx[order[:take]]] = True
    return out


def _reference_outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    """The masked model's outputs; an example it cannot run (a float64 batch for a float32 model) is one line."""
    try:
        with torch.no_grad():
            return output_tensors(forward(model, example_inputs))
    except Exception as err:  # torch's error from deep inside the model: one CompactionError naming the example
        raise CompactionError(f"compact: {example_problem(model, example_inputs, err)}") from None


def _compacted_outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    """The compacted model's outputs; a layer that fails (the trace did not see it read removed channels) is one
    CompactionError naming it."""
    running: list[str] = []  # the layers now inside their forward, innermost last

    def enter(name: str):
        return lambda _module, _args: running.append(name)  # returns None: the input is unchanged

    def leave(_module, _args, _output) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            return output_tensors(forward(model, example_inputs))
    except Exception as err:
        where = f"layer '{running[-1]}' ({type(model.get_submodule(running[-1])).__name__})" if running else "forward"
        raise CompactionError(
            f"the compacted model fails in {where}: {type(err).__name__}: {first_line(err)}; the dependency trace did "
            "not see it read the channels that were removed (it runs without gradients, or on a tensor the trace "
            "cannot follow); exclude the layers that feed it from the rule, or report the model"
        ) from None
    finally:
        for handle in handles:
            handle.remove()


def _prune(graph, pruning_group) -> None:
    """``pruning_group.prune()``, with each grouped conv's input channels removed conv group by conv group.

    (Torch-Pruning slices a grouped conv's weight columns with the first conv group's pattern for all of
    them; the weight is rebuilt here from the removed input channels of every conv group.)
    """
    saved: dict[nn.Module, tuple[torch.Tensor, set[int], set[int]]] = {}
    for dep, idxs in pruning_group:
        module = dep.target.module
        if is_grouped_conv(module):
            weight, out_idx, in_idx = saved.setdefault(module, (module.weight.detach().clone(), set(), set()))
            (out_idx if graph.is_out_channel_pruning_fn(dep.handler) else in_idx).update(int(i) for i in idxs)
    pruning_group.prune()
    for module, (weight, out_idx, in_idx) in saved.items():
        if in_idx:
            module.weight = nn.Parameter(_grouped_weight(weight, out_idx, in_idx, module.groups))


def _grouped_weight(weight: torch.Tensor, out_idx: set[int], in_idx: set[int], groups: int) -> torch.Tensor:
    """A grouped conv ``weight`` without the output rows ``out_idx`` and the input channels ``in_idx``."""
    out, span = weight.shape[0], weight.shape[1]
    per_out = out // groups
    parts = []
    for b in range(groups):
        rows = [r for r in range(b * per_out, (b + 1) * per_out) if r not in out_idx]
        cols = [j for j in range(span) if b * span + j not in in_idx]
        parts.append(weight[rows][:, cols])
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:  # even_blocks guarantees equal counts; this guards the invariant
        raise CompactionError(f"grouped conv input channels removed unevenly ({sorted(widths)}); report this")
    return torch.cat(parts, dim=0).contiguous()


def _why_uneven(group, uneven: torch.Tensor, removable: torch.Tensor) -> str:
    owner = torch.tensor(group.blocks, dtype=torch.long)
    counts = torch.bincount(owner[removable], minlength=int(owner.max()) + 1).tolist()
    convs = ", ".join(f"'{layer}' (groups={g})" for layer, g in group.grouped)
    idx = torch.nonzero(uneven).flatten().tolist()
    shown = str(idx if len(idx) <= 8 else idx[:8] + ["..."])
    return (
        f"channels {shown} of '{group.label}' are pruned but grouped conv {convs} needs the same number of "
        f"channels removed from each of its conv groups, but the removable channels per block are {counts}. "
        "Prune through Plan.resolve_coupled (its coupled target keeps every conv group equal), or prune the "
        "same number of channels in every conv group"
    )


def _root_local(group, removable: torch.Tensor) -> list[int]:
    """Indices in the Torch-Pruning root layer's own numbering (root local == root channel)."""
    return torch.nonzero(removable).flatten().tolist()


def _why_kept(group, stuck: torch.Tensor, status, modules) -> str:
    idx = torch.nonzero(stuck).flatten().tolist()
    shown = str(idx if len(idx) <= 8 else idx[:8] + ["..."])
    if group.problems:
        return f"channels {shown} of '{group.label}' are pruned but " + "; ".join(group.problems)
    alive = []
    for m in group.members:
        if m.role in ("producer", "depthwise"):
            w = modules[m.layer].weight.detach()
            rows = [loc for loc, r in zip(m.local, m.root, strict=True) if stuck[r]]
            if rows and bool((w[rows].reshape(len(rows), -1) != 0).any()):
                alive.append(m.layer)
    if alive:
        return (
            f"channels {shown} of '{group.label}' have zero filters in some layers but {alive} still compute "
            "them (coupled by a residual add / concat / depthwise conv); prune coupled layers together "
            "(Plan.resolve_coupled) so the whole group can go"
        )
    if group.leaks:
        folded = " (the group has a LayerNorm, so no constant is folded)" if has_layernorm(group) else ""
        return (
            f"channels {shown} of '{group.label}' have zero filters, but {'; '.join(group.leaks[:3])}{folded}; "
            "keep these channels (exclude the group's layers from the rule)"
        )
    return (
        f"channels {shown} of '{group.label}' have zero filters but still output a constant "
        "(bias / BN shift) that was not folded"
    )


def _module_outputs(model: nn.Module, example_inputs) -> dict[str, torch.Tensor]:
    """Each named module's first tensor output on ``example_inputs``, in the order the modules returned."""
    found: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _args, output) -> None:
            tensors = output_tensors(output)
            if tensors and name not in found:
                found[name] = tensors[0].detach()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _first_divergence(model: nn.Module, masks: MaskSet | None, compacted: nn.Module, example_inputs,
                      atol: float) -> str:
    """' (first at layer 'x', by d)': the first module, in execution order, whose output keeps its shape and
    differs; layers whose width changed are skipped, so this is the first layer after the channels went wrong
    (a review's finding: the error named no layer). Only run when compaction already failed."""
    try:
        masked = copy.deepcopy(model).eval()
        if masks is not None:
            masks.apply(masked)
        before, after = _module_outputs(masked, example_inputs), _module_outputs(compacted, example_inputs)
    except Exception:  # the message stands without the pointer
        return ""
    for name, x in before.items():
        y = after.get(name)
        if y is not None and x.shape == y.shape and x.numel():
            diff = _largest_difference(x.float(), y.float())
            if not diff <= atol:
                return f", first at the output of '{name}' ({type(dict(masked.named_modules())[name]).__name__}, by " \
                       f"{diff:.3g})"
    return ""


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        shapes = ([tuple(x.shape) for x in a], [tuple(y.shape) for y in b])
        raise CompactionError(
            f"compaction changed the output shapes {shapes[0]} -> {shapes[1]}: the model returns pruned channels "
            "themselves (e.g. a bare BertModel's hidden states), so their width cannot change; prune a model with "
            "a head that reads them (BertForSequenceClassification), or exclude the layers that write the output"
        )
    return max((_largest_difference(x.float(), y.float()) for x, y in zip(a, b, strict=True) if x.numel()),
               default=0.0)


def _largest_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| where equal infinities and NaN against NaN count as equal and NaN against a number as infinitely
    different (a masked_fill(-inf) output is not a difference; a NaN where the other model has a number is; and
    Python's max would drop a NaN it is given after a number)."""
    same = (x == y) | (x.isnan() & y.isnan())
    diff = torch.where(same, torch.zeros_like(x), (x - y).abs())
    return float(diff.nan_to_num(nan=float("inf")).max())


__all__ = ["CompactConfig", "CompactionError", "CompactionResult", "compact", "count_params", "even_blocks"]

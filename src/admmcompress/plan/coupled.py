"""Coupled structured targets: filters/channels tied by residual adds, concatenation, depthwise convs or BN
are decided together.

A ``CoupledTarget`` spans one channel group (see :mod:`admmcompress.plan.graph`). Its value is a virtual
GEMM matrix with one row per group channel, holding every member's slice of that channel side by side
(producer filter rows and biases, BN gamma/beta, depthwise kernels, consumer input columns). A
``Filter`` structure on that matrix is then exactly the coupled projection: a channel's score is the
sum of its members' squared norms, and one top-k decides for all members. Drivers and ``hard_prune``
use it like any target, through ``value(params)`` and ``masks(params)``.

What it zeroes is exactly what compaction removes with the channel, so the masked model and the
compacted model compute the same function.

When a grouped (not depthwise) conv is a member, the group's channels are split into blocks (its conv
groups, see ``ChannelGroup.blocks``) and the structure is a
:class:`~admmcompress.structures.block.BlockFilter`: every block keeps the
same number of channels, its top channels by norm, so the grouped conv can be rebuilt with the same
``groups`` by compaction. Where that lets the sparsity remove no channel at all, ``couple`` raises ``PlanError``;
where it removes fewer than the sparsity asks, it warns with the counts.

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan
>>> from admmcompress.structures import Filter
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> targets = couple(model, Plan({"0": Filter(sparsity=0.5)}).resolve(model), torch.zeros(1, 3, 8, 8))
>>> [(t.key, t.members) for t in targets]
[('0:coupled-filter', ('0', '1', '3'))]
>>> sorted(targets[0].masks(dict(model.named_parameters())))
['0.bias', '0.weight', '1.bias', '1.weight', '3.weight']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from admmcompress.plan.attention import AttentionLayout, attention_layouts, head_channels
from admmcompress.plan.graph import (
    CONSUMER,
    DEPTHWISE,
    PRODUCER,
    ChannelGroup,
    cached_channel_groups,
    channel_index,
    depthwise_multiplier,
)
from admmcompress.plan.targets import PlanError, Target
from admmcompress.structures.base import Structure
from admmcompress.structures.block import BlockFilter
from admmcompress.structures.groups import kept_count
from admmcompress.structures.sparsity import Filter

COUPLING_MODES = ("strict", "extend")
COUPLED_KINDS = ("filter", "channel")
SHORTFALL = 0.1  # the share of a group's channels its grouped convs may keep beyond the sparsity before a warning


@dataclass(frozen=True)
class ChannelSlice:
    """Entries of parameter ``param`` along ``dim`` at ``local[i]`` belong to group channel ``root[i]``."""

    param: str
    dim: int
    local: tuple[int, ...]
    root: tuple[int, ...]
    groups: int = 1  # a grouped conv's weight read along its input side (see graph.channel_index)


@dataclass(frozen=True)
class CoupledTarget(Target):
    """One filter/channel target over a whole channel group (``layer`` is the group's label).

    ``members`` names the member layers, ``slices`` the parameter slices, ``size`` the number of
    group channels and ``sources`` the keys of the plan targets it replaced.
    """

    size: int = 0
    members: tuple[str, ...] = ()
    slices: tuple[ChannelSlice, ...] = ()
    sources: tuple[str, ...] = ()
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.layer}:coupled-{self.structure.kind}"

    @property
    def param_name(self) -> str:
        """Not one parameter: code that reads ``params[t.param_name]`` must use ``t.value(params)``."""
        names = ", ".join(self.param_names[:4]) + (", ..." if len(self.param_names) > 4 else "")
        raise TypeError(
            f"coupled target '{self.key}' spans {len(self.param_names)} parameters ({names}); this code "
            "reads one parameter per target. Use ADMM, GradualMagnitude or hard_prune (they call "
            "target.value() and target.masks()), or Plan.resolve for uncoupled targets"
        )

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.param for s in self.slices))

    def with_structure(self, structure: Structure) -> CoupledTarget:
        return replace(self, structure=structure)

    # --- the virtual GEMM matrix ------------------------------------------------------------
    def _gather_index(self, s: ChannelSlice, shape: torch.Size, device: torch.device) -> torch.Tensor:
        cache_key = (s, tuple(shape), str(device))
        if cache_key not in self._index:
            self._index[cache_key] = _gather_index(s, shape, self.size).to(device)
        return self._index[cache_key]

    def value(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(size, width)`` matrix, row ``c`` = every member's entries of channel ``c`` (differentiable)."""
        columns = []
        for s in self.slices:
            p = params[s.param]
            flat = torch.cat([p.reshape(-1), p.new_zeros(1)])  # the last entry pads uneven slices
            columns.append(flat[self._gather_index(s, p.shape, p.device)])
        return torch.cat(columns, dim=1)

    @torch.no_grad()
    def masks(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep-masks by parameter name from the structure's support of ``value(params)``."""
        keep = self.structure.support(self.value(params)).any(dim=1)
        return self.masks_for_channels(params, keep)

    def masks_for_channels(
        self, params: Mapping[str, torch.Tensor], keep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Keep-masks that keep exactly the group channels where ``keep`` (bool, ``size``) is True."""
        out: dict[str, torch.Tensor] = {}
        for s in self.slices:
            p = params[s.param]
            index = self._gather_index(s, p.shape, p.device)
            flat = torch.ones(p.numel() + 1, dtype=torch.bool, device=p.device)
            flat[index[~keep.to(p.device)].reshape(-1)] = False
            mask = flat[:-1].view(p.shape)
            out[s.param] = out[s.param] & mask if s.param in out else mask
        return out


def _gather_index(s: ChannelSlice, shape: torch.Size, size: int) -> torch.Tensor:
    """Flat indices into ``param`` (numel = padding) laying out the slice as ``(size, count * width)``."""
    numel = math.prod(shape)
    rows = channel_index(shape, s.dim, s.groups)
    local = torch.tensor(s.local, dtype=torch.long)
    root = torch.tensor(s.root, dtype=torch.long)
    order = torch.argsort(root * (shape[s.dim] + 1) + local)
    local, root = local[order], root[order]
    counts = torch.bincount(root, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(root)) - starts[root]
    width = rows.shape[1]
    index = torch.full((size, int(counts.max()), width), numel, dtype=torch.long)
    index[root, slot] = rows[local]
    return index.view(size, -1)


def couple(
    model: nn.Module,
    targets: Sequence[Target],
    example_inputs,
    mode: str = "strict",
    extra_channelwise_ops: Iterable[str] | None = None,
    groups: list[ChannelGroup] | None = None,
) -> list[Target]:
    """Replace the filter/channel targets of ``targets`` by one ``CoupledTarget`` per channel group.

    Targets on layers whose channels are tied are merged; they must share one sparsity. With
    ``mode="strict"`` a group is pruned only if the plan names all its producers (filter targets) or
    all its consumers (channel targets); otherwise ``PlanError`` lists the missing layers, since the
    pruned filters could not be removed by compaction. ``mode="extend"`` prunes the whole group.
    Other targets (unstructured, column, ...) pass through unchanged. ``groups`` defaults to the model's
    cached channel groups (:func:`~admmcompress.plan.graph.cached_channel_groups`); most callers want
    :meth:`Plan.resolve_coupled <admmcompress.plan.Plan.resolve_coupled>`, which calls this.
    """
    if mode not in COUPLING_MODES:
        raise PlanError(f"coupling mode {mode!r} is unknown; use one of {COUPLING_MODES}")
    if groups is None:
        if example_inputs is None:  # else torch's TypeError from deep inside the model's forward
            raise PlanError(
                "coupled targets need an example input to trace the model's tied channels, got None; pass one "
                "batch the model accepts, e.g. resolve_coupled(model, torch.zeros(1, 3, 32, 32))"
            )
        groups = cached_channel_groups(model, example_inputs, extra_channelwise_ops or ())
    modules = dict(model.named_modules())
    errors: list[str] = []
    buckets: dict[str, list[Target]] = {}
    by_label = {g.label: g for g in groups}
    for t in targets:
        if t.structure.kind not in COUPLED_KINDS or isinstance(t, CoupledTarget):
            continue
        found, error = _find_groups(groups, t, modules)
        if error:
            errors.append(error)
        for group in found:  # a conv reading a concat reads several groups: the rule's rate holds in each
            buckets.setdefault(group.label, []).append(t)
    modules = dict(model.named_modules())
    for label, members in buckets.items():
        errors += _check_bucket(by_label[label], members, mode) + _check_blocks(by_label[label], members, modules)
    if errors:
        raise PlanError.listing("the coupled plan does not fit this model", errors)
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied tensor has one name (the first)
    coupled = {
        label: _coupled_target(by_label[label], members, modules, canonical) for label, members in buckets.items()
    }
    placed: set[str] = set()
    out: list[Target] = []
    for t in targets:
        labels = [lbl for lbl, ms in buckets.items() if any(m is t for m in ms)]
        if not labels:
            out.append(t)
        for label in labels:
            if label not in placed:
                placed.add(label)
                out.append(coupled[label])
    return out


def _find_groups(groups: list[ChannelGroup], t: Target, modules) -> tuple[list[ChannelGroup], str]:
    """Every channel group ``t``'s layer plays its role in (a channel target on a conv that reads a concatenation
    is in one group per part: each was pruned alone before 2026-12-07, silently), or an error."""
    roles = (PRODUCER, DEPTHWISE) if t.structure.kind == "filter" else (CONSUMER, DEPTHWISE)
    found = [g for g in groups if any(m.layer == t.layer and m.role in roles for m in g.members)]
    for g in found:
        if g.problems:
            return [], (
                f"{t.structure.kind} target on '{t.layer}': its channels cannot be removed: " + "; ".join(g.problems)
            )
    if found:
        return found, ""
    module = modules[t.layer]
    for g in groups:
        if g.root == t.layer and g.problems:
            return [], (
                f"{t.structure.kind} target on '{t.layer}': "
                + "; ".join(g.problems)
                + "; drop the target, or prune it uncoupled (Plan.resolve)"
            )
    return [], (
        f"{t.structure.kind} target on '{t.layer}' ({type(module).__name__}): the dependency graph has no "
        f"channel group where it is a {' or '.join(roles)}; drop the target or prune it uncoupled "
        "(Plan.resolve)"
    )


def _check_bucket(group: ChannelGroup, members: list[Target], mode: str) -> list[str]:
    errors = []
    sparsities = {t.structure.target_sparsity for t in members}
    if len(sparsities) > 1:
        listed = ", ".join(f"'{t.layer}' {t.structure.kind} {t.structure.target_sparsity:g}" for t in members)
        errors.append(f"coupled layers must share one sparsity, got {listed}; give them one value")
    if mode == "strict":
        filtered = {t.layer for t in members if t.structure.kind == "filter"}
        channeled = {t.layer for t in members if t.structure.kind == "channel"}
        producers = group.producers + group.layers(DEPTHWISE)
        missing_p = sorted(n for n in producers if n not in filtered)
        missing_c = sorted(n for n in group.consumers if n not in channeled)
        if missing_p and (missing_c or not group.consumers):
            named = ", ".join(f"'{t.layer}'" for t in members)
            errors.append(
                f"{named} share channels (residual add / concat / BN / depthwise) with "
                f"{', '.join(repr(n) for n in missing_p)}, which have no filter target; pruned filters could "
                "not be removed. Give all of them the same filter target (one rule matching them), or "
                "couple with mode='extend' to prune the whole group"
            )
    return errors


def _check_blocks(group: ChannelGroup, members: list[Target], modules: Mapping[str, nn.Module]) -> list[str]:
    """An error when the grouped convs' blocks let the sparsity remove no channel; a warning when the channels
    they remove differ from the sparsity's by more than ``SHORTFALL`` of the group's channels."""
    if not group.blocks:
        return []
    sparsity = members[0].structure.target_sparsity
    sizes = torch.bincount(torch.tensor(group.blocks)).tolist()
    plain = group.size - kept_count(group.size, sparsity)  # without blocks
    removed = sum(n - kept_count(n, sparsity) for n in sizes)  # keeping every block equal
    if removed == plain:
        return []
    grouped = [f"'{layer}' (groups={g})" for layer, g in group.grouped]
    plural = len(grouped) > 1
    convs, verb = f"grouped conv{'s' if plural else ''} {', '.join(grouped)}", "" if plural else "s"
    span = min(sizes)
    if removed == 0:
        named = ", ".join(f"'{t.layer}'" for t in members)
        if span == 1 and any(depthwise_multiplier(modules[layer]) for layer, _ in group.grouped if layer in modules):
            return [f"{members[0].structure.kind} target on {named}: these {group.size} channels are read by "
                    f"{convs}, a depthwise conv with a channel multiplier, whose input channels cannot be removed "
                    "here; prune its own filters instead (a filter rule on it keeps the same number per input "
                    "channel), or drop the target"]
        return [f"{members[0].structure.kind} target on {named}: {convs} split{verb} these {group.size} channels into "
                f"blocks of {span} that each keep the same number and at least one, so sparsity {sparsity:g} removes "
                "none of them; drop the target, or give the grouped conv fewer groups"]
    if abs(plain - removed) / group.size > SHORTFALL:
        warnings.warn(f"coupled target '{group.label}': {convs} keep{verb} the same number of channels in each "
                      f"block of {span}, so sparsity {sparsity:g} removes {removed} of {group.size} channels, not "
                      f"{plain}", UserWarning, stacklevel=4)
    return []


def couple_heads(model: nn.Module, targets: Sequence[Target]) -> list[Target]:
    """Replace every ``heads`` target (on an attention block's query projection) by one coupled target over the
    block's query, key and value rows and its output projection's columns (blocks found by
    :func:`~admmcompress.plan.attention.attention_layouts`; no trace needed)."""
    if not any(t.structure.kind == "heads" and not isinstance(t, CoupledTarget) for t in targets):
        return list(targets)
    try:
        layouts = attention_layouts(model)
    except ValueError as err:  # grouped-query attention and other layouts heads cannot be cut from
        raise PlanError(str(err)) from None
    out, errors = [], []
    for t in targets:
        if t.structure.kind != "heads" or isinstance(t, CoupledTarget):
            out.append(t)
            continue
        layout = layouts.get(t.layer)
        if layout is None:
            known = ", ".join(sorted(layouts)[:6]) or "none found"
            errors.append(
                f"heads target on '{t.layer}': not the query projection of an attention block this library can read "
                f"(query projections found: {known}); name the block's query Linear, or register an adapter with "
                "admmcompress.plan.attention.register_attention"
            )
            continue
        given = getattr(t.structure, "head_dim", None)
        if given is not None and given != layout.head_dim:
            errors.append(f"heads target on '{t.layer}': head_dim={given} but the block's heads have {layout.head_dim}")
            continue
        units, sparsity = layout.kv_count, getattr(t.structure, "target_sparsity", None)  # compression: too
        if sparsity and kept_count(units, sparsity) == units:  # a silent no-op otherwise (MQA; review)
            shared = f"share {units} key/value head(s)" if layout.kv_heads is not None else f"are {units} heads"
            errors.append(f"heads target on '{t.layer}': the block's {layout.heads} query heads {shared}, pruned as "
                          f"whole key/value groups with at least one kept, so sparsity {sparsity:g} removes none; "
                          + (f"give a sparsity of at least {1 / units:g}" if units > 1 else "drop the target")
                          + " (the rate counts key/value groups)")
            continue
        out.append(_head_target(t, layout, dict(model.named_modules())))
    if errors:
        raise PlanError.listing("the plan does not fit this model", errors)
    return out


def _head_target(t: Target, layout: AttentionLayout, modules) -> CoupledTarget:
    slices = []
    for layer, dim, local, root in head_channels(layout):  # one row per key/value channel (GQA: groups share)
        slices.append(ChannelSlice(f"{layer}.weight", dim, local, root))
        if dim == 0 and modules[layer].bias is not None:
            slices.append(ChannelSlice(f"{layer}.bias", 0, local, root))
    return CoupledTarget(
        layer=layout.module,
        param="weight",
        structure=replace(t.structure, head_dim=layout.head_dim),
        rule=t.rule,
        size=layout.kv_width,
        members=tuple(dict.fromkeys((layout.q, layout.k, layout.v, layout.o))),
        slices=tuple(slices),
        sources=(t.key,),
    )


def _coupled_target(group: ChannelGroup, members: list[Target], modules, canonical: dict[int, str]) -> CoupledTarget:
    slices = []
    for m in group.members:
        module = modules.get(m.layer)  # None for a free parameter (its member names the parameter itself)
        for pname, dim in m.param_dims(module):
            full = ".".join(part for part in (m.layer, pname) if part)
            if module is not None:  # tied weights (an LM head sharing the token embedding): one slice, one name
                full = canonical.get(id(getattr(module, pname)), full)
            piece = ChannelSlice(full, dim, m.local, m.root, m.groups if m.role == CONSUMER else 1)
            if piece not in slices:
                slices.append(piece)
    first = members[0]
    sparsity = first.structure.target_sparsity
    structure = BlockFilter(sparsity=sparsity, blocks=group.blocks) if group.blocks else Filter(sparsity=sparsity)
    return CoupledTarget(
        layer=group.label,
        param="weight",
        structure=structure,
        rule=min(t.rule for t in members),
        size=group.size,
        members=tuple(dict.fromkeys(m.layer for m in group.members)),
        slices=tuple(slices),
        sources=tuple(t.key for t in members),
    )


__all__ = [
    "COUPLED_KINDS", "COUPLING_MODES", "BlockFilter", "ChannelSlice", "CoupledTarget", "couple", "couple_heads",
]

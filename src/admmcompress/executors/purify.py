"""Network purification and unused-path removal (P-RM, SPEC section 6), on the masked model.

After ADMM and hard pruning some weights can no longer matter:

- a removed filter makes the matching input columns of every consumer multiply zero (or a constant,
  which is folded into their biases first, SPEC P6): those columns are dead;
- input columns removed in every consumer make the producing filters (and their BN entries and
  biases) compute something nobody reads: those filters are dead.

``remove_unused_paths`` zeroes both kinds, pass after pass until nothing changes (one removal can
kill the next layer's groups), and extends the masks so retraining keeps them zero. It never changes
the model's outputs (each pass is checked on the example inputs). ``purify`` first removes kept
filters/columns whose L2 norm is below ``threshold`` times the layer's mean kept norm (the
purification step: it does change outputs a little, so retrain after it), then removes unused paths.
``compact`` afterwards turns all of it into a smaller model.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
>>> with torch.no_grad():
...     model[2].weight[:, 1] = 0                      # channel 1 is read by nobody ...
>>> report = remove_unused_paths(model, torch.randn(2, 1, 8, 8))
>>> report.passes[0].filters, bool(model[0].weight[1].abs().sum() == 0)   # ... so filter 1 goes
({'0': 1}, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from admmcompress.executors.channels import channel_status
from admmcompress.executors.compact import _largest_difference
from admmcompress.executors.fold import fold_constant_channels, forward, zeroed_index
from admmcompress.finalize import MaskSet
from admmcompress.plan.graph import CONSUMER, NORM, ChannelGroup, channel_groups, channel_index, output_tensors


@dataclass
class PassReport:
    """What one pass zeroed: filters (rows) and input channels (columns) per layer, and weights in all."""

    name: str
    filters: dict[str, int] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    weights: int = 0
    folded: dict[str, int] = field(default_factory=dict)
    max_output_change: float = 0.0

    def describe(self) -> str:
        parts = [f"{self.name}: {self.weights:,} weights zeroed"]
        if self.filters:
            parts.append("filters " + ", ".join(f"{k} -{v}" for k, v in self.filters.items()))
        if self.channels:
            parts.append("input channels " + ", ".join(f"{k} -{v}" for k, v in self.channels.items()))
        if self.folded:
            parts.append("constants folded " + ", ".join(f"{k} {v}" for k, v in self.folded.items()))
        parts.append(f"max output change {self.max_output_change:.2e}")
        return "; ".join(parts)


@dataclass
class PurifyReport:
    """Every pass, nonzero weights before/after, and the extended masks."""

    passes: list[PassReport]
    nonzero_before: int
    nonzero_after: int
    masks: MaskSet

    def describe(self) -> str:
        lines = [f"nonzero parameters {self.nonzero_before:,} -> {self.nonzero_after:,}"]
        return "\n".join(lines + ["  " + p.describe() for p in self.passes])


def nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def remove_unused_paths(
    model: nn.Module,
    example_inputs,
    masks: MaskSet | None = None,
    max_passes: int = 20,
    atol: float = 1e-4,
    groups: list[ChannelGroup] | None = None,
) -> PurifyReport:
    """Zero dead filters and dead input channels in place until nothing changes; outputs stay the same.

    Returns the report with ``masks`` extended by everything zeroed (a new ``MaskSet``; attach it
    for retraining). Raises ``RuntimeError`` if a pass changed the outputs by more than ``atol``.
    """
    if groups is None:
        groups = channel_groups(model, example_inputs)
    masks = masks.copy() if masks is not None else MaskSet()  # a QuantizedMaskSet keeps its levels
    before = nonzero_params(model)
    passes = []
    for i in range(max_passes):
        reference = _outputs(model, example_inputs)
        report = _one_pass(model, example_inputs, groups, masks, f"unused paths, pass {i + 1}")
        report.max_output_change = _change(reference, _outputs(model, example_inputs))
        if report.max_output_change > atol:
            raise RuntimeError(
                f"unused-path removal changed the outputs by {report.max_output_change:.3g} "
                f"in {report.name}; "
                "an op of the model is probably not channelwise: please report the model"
            )
        if not report.weights and not report.folded:
            break
        passes.append(report)
    masks.apply(model)
    return PurifyReport(passes, before, nonzero_params(model), masks)


def _one_pass(model, example_inputs, groups, masks: MaskSet, name: str) -> PassReport:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    report = PassReport(name)
    statuses = [channel_status(g, modules) for g in groups]
    requests = [(g, s.filters_zero & ~s.zero & ~s.unread) for g, s in zip(groups, statuses, strict=True)]
    fold = fold_constant_channels(model, example_inputs, requests)
    report.folded = fold.folded
    for layer, local, weights in fold.zeroed:  # the consumers' columns of folded channels: masked from now on
        name = f"{layer}.weight" if layer else "weight"
        keep = torch.ones(params[name].numel(), dtype=torch.bool, device=params[name].device)
        keep[zeroed_index(modules[layer], local)] = False
        keep = keep.view(params[name].shape)
        report.weights += weights
        masks.intersect(name, keep)
        report.channels[layer] = report.channels.get(layer, 0) + len(local)
    if report.folded:
        statuses = [channel_status(g, modules) for g in groups]
    for group, status in zip(groups, statuses, strict=True):
        dead_inputs = status.zero  # exactly zero: consumers' columns multiply zero
        unread = status.unread  # nobody reads: producers, BN and depthwise entries are dead
        for member in group.members:
            module = modules[member.layer]
            roots = dead_inputs if member.role == CONSUMER else unread | dead_inputs
            local = [loc for loc, r in zip(member.local, member.root, strict=True) if roots[r]]
            if not local:
                continue
            for pname, dim in member.param_dims(module):
                full = f"{member.layer}.{pname}" if member.layer else pname
                groups = member.groups if member.role == CONSUMER else 1
                zeroed, slices = _zero_slices(params[full], dim, local, masks, full, groups)
                report.weights += zeroed
                if slices and pname == "weight" and member.role != NORM:
                    bucket = report.channels if member.role == CONSUMER else report.filters
                    bucket[member.layer] = bucket.get(member.layer, 0) + slices
    return report


def _zero_slices(
    param: torch.Tensor, dim: int, local: list[int], masks: MaskSet, name: str, groups: int = 1
) -> tuple[int, int]:
    """Zero ``param``'s slices at ``local`` along ``dim`` (and mask them); (weights, slices) newly zeroed.

    ``groups > 1``: ``param`` is a grouped conv weight read along its input side (``dim == 1``).
    """
    index = channel_index(param.shape, dim, groups).to(param.device)[torch.tensor(local, dtype=torch.long)]
    rows = param.reshape(-1)[index]
    slices = int((rows != 0).any(dim=1).sum())
    weights = int(torch.count_nonzero(rows))
    keep = torch.ones(param.numel(), dtype=torch.bool, device=param.device)
    keep[index.reshape(-1)] = False
    keep = keep.view(param.shape)
    param.mul_(keep.to(param.dtype))
    masks.intersect(name, keep)
    return weights, slices


@torch.no_grad()
def purify(
    model: nn.Module,
    example_inputs,
    masks: MaskSet,
    threshold: float = 0.0,
    max_passes: int = 20,
) -> PurifyReport:
    """Network purification, then unused-path removal; in place, returns the report and extended masks.

    Purification looks at every layer ``masks`` prunes: kept filters (rows) and kept columns whose L2
    norm is below ``threshold`` times the mean norm of the layer's kept rows (columns) are zeroed.
    ``threshold=0`` removes nothing there, so only exact unused-path removal runs.
    """
    if threshold < 0:
        raise ValueError(
            f"purify: threshold={threshold!r} must be >= 0 (0 keeps every nonzero filter/column)"
        )
    masks = masks.copy()  # a QuantizedMaskSet keeps its levels
    passes = []
    before = nonzero_params(model)
    if threshold > 0:
        reference = _outputs(model, example_inputs)
        report = PassReport("purification")
        params = dict(model.named_parameters())
        for name in list(masks.masks):
            weight = params[name]
            if weight.dim() < 2:
                continue
            layer = name.rsplit(".", 1)[0]
            matrix = weight.reshape(weight.shape[0], -1)
            for axis, bucket in ((1, report.filters), (0, report.channels)):
                norms = matrix.norm(dim=axis)
                kept = norms > 0
                if not bool(kept.any()):
                    continue
                weak = kept & (norms < threshold * norms[kept].mean())
                if bool(weak.any()):
                    keep = torch.ones_like(matrix, dtype=torch.bool)
                    if axis == 1:
                        keep[weak] = False
                    else:
                        keep[:, weak] = False
                    report.weights += int(torch.count_nonzero(matrix * ~keep))
                    # the weight itself: reshape copies a channels-last weight, whose zeros then came only at the end
                    weight.mul_(keep.view_as(weight).to(weight.dtype))
                    matrix = weight.reshape(weight.shape[0], -1)  # columns are ranked on the rows left
                    masks.intersect(name, keep.view_as(weight))
                    bucket[layer] = int(weak.sum())
        report.max_output_change = _change(reference, _outputs(model, example_inputs))
        passes.append(report)
    unused = remove_unused_paths(model, example_inputs, masks, max_passes=max_passes)
    return PurifyReport(passes + unused.passes, before, unused.nonzero_after, unused.masks)


def _outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        out = forward(model, example_inputs)
    finally:
        model.train(was_training)
    # every tensor, nested ones and a dict's / ModelOutput's values too: iterating a dict gave its keys, so a model
    # returning one was never checked
    return [t.detach().clone() for t in output_tensors(out)]


def _change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest output change; NaN where the other had a number counts as infinite (``nan > atol`` is False)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max((_largest_difference(x.float(), y.float()) for x, y in zip(a, b, strict=True) if x.numel()),
               default=0.0)


__all__ = ["PassReport", "PurifyReport", "nonzero_params", "purify", "remove_unused_paths"]

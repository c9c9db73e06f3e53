"""Fold constant channels into the next layers' biases (SPEC P6).

A filter whose weights are all zero still outputs a constant: its bias, or the BN shift
``beta - gamma * mean / sqrt(var + eps)``, through the activation. Its consumers see that constant
``v`` on the channel, so their output gains ``W[:, channel] * v``; adding exactly that to their bias
and zeroing the channel's input columns leaves the function unchanged, after which the channel is
unread and can go. This is exact only when a consumer sees ``v`` at every position: a Linear, or a
Conv without zero padding (a padded border would see 0, not ``v``). Elsewhere the channel is kept and
the reason is reported; prune the BN with the filter (a coupled target) to avoid it.

>>> from admmcompress.plan.graph import channel_groups
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 1, 3)).eval()
>>> with torch.no_grad():
...     model[0].weight[0] = 0; model[0].bias[0] = 0.5          # channel 0 is the constant relu(0.5)
>>> x = torch.randn(1, 1, 8, 8)
>>> before = model(x)
>>> group = channel_groups(model, x)[0]
>>> fold_constant_channels(model, x, [(group, torch.tensor([True, False]))]).folded
{'0': 1}
>>> bool(torch.allclose(model(x), before, atol=1e-6)), bool(model[2].weight[:, 0].abs().sum() == 0)
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from admmcompress.plan.graph import (
    CONSUMER,
    ChannelGroup,
    call_model,
    channel_index,
    example_samples,
    is_grouped_conv,
    map_tensors,
    output_tensors,
)


@dataclass
class FoldResult:
    """Channels folded per group, refused requests, consumer columns zeroed ``(layer, indices, weights)``."""

    folded: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    zeroed: list[tuple[str, list[int], int]] = field(default_factory=list)


forward = call_model  # the one way every executor calls a model on its example inputs


def fold_blocker(module: nn.Module, name: str) -> str | None:
    """Why a constant input channel of ``module`` cannot be folded into its bias (None if it can)."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed:
        padding = module.padding
        if padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding)):
            return None
        return f"'{name}' pads its input with zeros (padding={padding}): its border would miss the constant"
    return f"'{name}' ({type(module).__name__}) is not a Linear or an unpadded Conv"


@torch.no_grad()
def fold_constant_channels(
    model: nn.Module,
    example_inputs,
    requests: Sequence[tuple[ChannelGroup, torch.Tensor]],
    rtol: float = 1e-5,
) -> FoldResult:
    """Fold the requested channels (bool over each group's channels) into their consumers.

    The model is changed in place: consumer biases gain the constant's contribution (a bias is
    created where the layer had none) and the folded channels' input columns become zero (listed in
    ``FoldResult.zeroed`` so masks can follow).
    """
    modules = dict(model.named_modules())
    result = FoldResult()
    reasons = result.reasons
    todo = [(g, w) for g, w in requests if bool(w.any())]
    if not todo:
        return result
    consumers = {m.layer for g, _ in todo for m in g.members if m.role == CONSUMER}
    inputs = [capture_inputs(model, example_inputs, consumers)]
    # y + t, where t is a literal or a buffer, or the model's input (a time step shared by the batch): the
    # example alone cannot tell them apart, so a constant must also hold on the example with noise added
    varied = _varied(example_inputs)
    if varied is not None:
        try:
            inputs.append(capture_inputs(model, varied, consumers))
        except Exception:  # a model that refuses noisy inputs (a range check): judged on the example alone
            varied = None
    for group, wanted in todo:
        if group.leaks and varied is None and example_samples(example_inputs) < 2:
            reasons.append(f"channels {_few(wanted)} of '{group.label}': {group.leaks[0]}, and an example of one "
                           "sample cannot show that value to be the same for every input; pass two or more samples")
            continue
        values, why = _constants(group, wanted, inputs, rtol, modules)
        if why:
            reasons.append(f"channels {_few(wanted)} of '{group.label}': {why}")
            continue
        nonzero = torch.zeros_like(wanted)
        for _, _, root, value in values:  # a zero constant (e.g. a negative shift after ReLU) needs no bias
            nonzero[root[value != 0]] = True
        blockers = [b for b in (fold_blocker(modules[n], n) for n in group.consumers) if b]
        if blockers and bool(nonzero.any()):
            reasons.append(
                f"channels {_few(nonzero)} of '{group.label}' output a nonzero constant (bias / BN shift) "
                f"that cannot be folded exactly: {'; '.join(blockers)}. Prune the BN/bias with the filter "
                "(a coupled target does) to remove them"
            )
            wanted = wanted & ~nonzero
        for member, local, root, value in values:
            keep = wanted[root]
            if bool(keep.any()):
                weights = _fold_into(modules[member], local[keep], value[keep])
                result.zeroed.append((member, local[keep].tolist(), weights))
        if bool(wanted.any()):
            result.folded[group.label] = int(wanted.sum())
    return result


def _varied(example_inputs):
    """The example with seeded noise added to every floating tensor (None when it has none to vary)."""
    if not any(t.is_floating_point() for t in output_tensors(example_inputs)):
        return None
    generator = torch.Generator().manual_seed(0)

    def vary(value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value
        noise = torch.randn(value.shape, generator=generator).to(value.dtype)
        return value + noise * (value.detach().float().std().nan_to_num(0.0) + 1.0).to(value.dtype)

    return map_tensors(vary, example_inputs)


def capture_inputs(model: nn.Module, example_inputs, names: set[str]) -> dict[str, torch.Tensor]:
    """The first input each module in ``names`` receives on ``example_inputs`` (one forward in eval mode, no
    gradients; a module whose first argument is not a tensor is left out)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            if args and isinstance(args[0], torch.Tensor):
                captured.setdefault(name, args[0].detach())

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n in names]
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode (e.g. frozen BatchNorm) comes back
    model.eval()  # no batch-norm statistics updated, no dropout
    try:
        with torch.no_grad():
            forward(model, example_inputs)
    finally:
        for module, training in modes:
            module.training = training
        for h in handles:
            h.remove()
    return captured


def _constants(group: ChannelGroup, wanted: torch.Tensor, inputs: list[dict[str, torch.Tensor]], rtol: float,
               modules: dict[str, nn.Module]):
    """``[(consumer, local indices, root channels, constant values)]``, or a reason they are not constant (over
    every position of every captured forward in ``inputs``)."""
    out = []
    for m in group.members:
        if m.role != CONSUMER:
            continue
        pairs = [(loc, r) for loc, r in zip(m.local, m.root, strict=True) if wanted[r]]
        if not pairs:
            continue
        local = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        root = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        last = isinstance(modules[m.layer], nn.Linear)
        seen = torch.cat([_by_channel(captured[m.layer], last).index_select(0, local) for captured in inputs], dim=1)
        value = seen[:, 0]
        spread = (seen.max(dim=1).values - seen.min(dim=1).values).abs()
        if bool((~(spread <= rtol * (value.abs() + 1.0))).any()):  # NaN (log of a noisy input) is no constant
            cause = (f"{group.leaks[0]}, with a value that changes with the input" if group.leaks else
                     "an op between producer and consumer is not channelwise")
            return [], f"the input of '{m.layer}' is not constant on them (spread {float(spread.max()):.3g}): {cause}"
        out.append((m.layer, local, root, value))
    return out, ""


def _by_channel(x: torch.Tensor, last: bool) -> torch.Tensor:
    """A consumer's input as ``(channels, positions)``: channels last for a Linear (also when fed ``(batch,
    sequence, features)``: taking dim 1 there read sequence positions as channels), else at dim 1 (conv)."""
    return x.reshape(-1, x.shape[-1]).t() if last or x.dim() <= 2 else x.movedim(1, 0).reshape(x.shape[1], -1)


def _fold_into(module: nn.Module, local: torch.Tensor, value: torch.Tensor) -> int:
    """Add the constant inputs' contribution to the bias, zero their columns; returns weights zeroed."""
    weight = module.weight
    if is_grouped_conv(module):  # only zero constants reach a grouped conv (fold_blocker refuses the others)
        if bool((value != 0).any()):
            raise ValueError("a nonzero constant cannot be folded into a grouped conv")  # pragma: no cover
        index = zeroed_index(module, local)
        zeroed = int(torch.count_nonzero(weight.reshape(-1)[index]))
        flat = weight.detach().reshape(-1).clone()  # reshape, not view: a channels-last weight has no flat view
        flat[index] = 0.0
        weight.detach().copy_(flat.view(weight.shape))
        return zeroed
    cols = weight.index_select(1, local.to(weight.device))
    zeroed = int(torch.count_nonzero(cols))
    if cols.dim() > 2:
        cols = cols.sum(dim=tuple(range(2, cols.dim())))
    shift = cols @ value.to(weight.dtype)
    if not bool((shift != 0).any()):
        weight.index_fill_(1, local.to(weight.device), 0.0)
        return zeroed
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    module.bias.add_(shift)
    weight.index_fill_(1, local.to(weight.device), 0.0)
    return zeroed


def zeroed_index(module: nn.Module, local: torch.Tensor | list[int]) -> torch.Tensor:
    """Flat indices of ``module.weight`` that read the input channels ``local`` (grouped convs included)."""
    groups = module.groups if is_grouped_conv(module) else 1
    rows = channel_index(module.weight.shape, 1, groups).to(module.weight.device)
    return rows[torch.as_tensor(local, dtype=torch.long, device=rows.device)].reshape(-1)


def _few(mask: torch.Tensor, limit: int = 8) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    return str(idx if len(idx) <= limit else idx[:limit] + ["..."])


__all__ = ["FoldResult", "fold_blocker", "fold_constant_channels", "forward", "zeroed_index"]

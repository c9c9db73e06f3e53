"""Per-channel facts about a channel group, read from the weights: which channels are dead, and why.

A group channel can be removed without changing the model's function when

- **no one reads it**: every consumer's input columns for it are zero (``unread``), or
- **it is exactly zero**: every producer's filter row and bias entry is zero, every BN maps a zero
  input to zero (``beta - gamma * mean / sqrt(var + eps) == 0``) and every depthwise bias is zero,
  and every op in the group keeps zero at zero (``zero``), or
- **it is a constant that can be folded** into the consumers' biases (``filters_zero`` but not
  ``zero``: a bias or a BN shift survives; see ``fold.py``).

``pruned`` marks channels some producer or depthwise conv has a zero filter for: what structured
pruning asked to remove.

>>> from admmcompress.plan.graph import channel_groups
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 3))
>>> with torch.no_grad():
...     model[0].weight[1] = 0          # filter 1 is zero: channel 1 is exactly zero
...     model[2].weight[:, 3] = 0       # channel 3 is read by nobody
>>> group = channel_groups(model, torch.zeros(1, 3, 8, 8))[0]
>>> status = channel_status(group, dict(model.named_modules()))
>>> status.zero.tolist(), status.unread.tolist()
([False, True, False, False], [False, False, False, True])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from admmcompress.plan.graph import CONSUMER, DEPTHWISE, NORM, PRODUCER, ChannelGroup, Member, channel_rows
from admmcompress.plan.residual import STREAM_ROLES, has_layernorm, member_tensors


@dataclass
class ChannelStatus:
    """Boolean vectors over the group's channels (see the module docstring)."""

    filters_zero: torch.Tensor
    zero: torch.Tensor
    unread: torch.Tensor
    pruned: torch.Tensor

    @property
    def removable_now(self) -> torch.Tensor:
        return self.zero | self.unread


def _zero_per_root(member: Member, tensor: torch.Tensor, dim: int, size: int, groups: int = 1) -> torch.Tensor:
    """True at root channel r when every entry of ``tensor`` at the member's locals for r is zero.

    ``groups > 1``: ``tensor`` is a grouped conv weight read along its input side (``dim == 1``).
    """
    local = torch.tensor(member.local, dtype=torch.long, device=tensor.device)
    root = torch.tensor(member.root, dtype=torch.long)
    rows = channel_rows(tensor.detach(), dim, groups).index_select(0, local)
    nonzero = (rows != 0).any(dim=1).cpu()
    out = torch.ones(size, dtype=torch.bool)
    out[root[nonzero]] = False
    return out


def _covered(member: Member, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.bool)
    out[torch.tensor(member.root, dtype=torch.long)] = True
    return out


def bn_zero_response(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """What an eval-mode BN outputs for a zero input, per channel."""
    with torch.no_grad():
        if bn.track_running_stats and bn.running_mean is not None:
            out = -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        else:
            out = torch.zeros(bn.num_features)
        if bn.affine:
            out = out * bn.weight + bn.bias
    return out


def _width(member: Member, module: nn.Module) -> int:
    """How many channels the member's layer has on its side of the group."""
    if member.role == CONSUMER:
        return channel_rows(module.weight.detach(), 1, member.groups).shape[0]
    if member.role == NORM:
        return module.num_features
    return module.weight.shape[0]


def channel_status(group: ChannelGroup, modules: dict[str, nn.Module]) -> ChannelStatus:
    """Read the dead/pruned facts of ``group`` from the current weights of ``modules``."""
    n = group.size
    filters_zero = torch.ones(n, dtype=torch.bool)
    shifts_zero = torch.ones(n, dtype=torch.bool)
    produced = torch.zeros(n, dtype=torch.bool)
    pruned = torch.zeros(n, dtype=torch.bool)
    unread = torch.ones(n, dtype=torch.bool)
    read = torch.zeros(n, dtype=torch.bool)
    for m in group.members:
        if m.role in STREAM_ROLES:  # embeddings, LayerNorm weights, free parameters: all zero, or the channel lives
            tensors = member_tensors(m.layer, m.role, m.dim, modules)
            if group.problems and any(max(m.local, default=-1) >= t.shape[d] for t, d in tensors):
                continue  # lost mapping, as below (T5's relative position bias in the q/k/v group: an IndexError)
            for tensor, dim in tensors:
                filters_zero &= _zero_per_root(m, tensor, dim, n)
            produced |= _covered(m, n)
            continue
        module = modules[m.layer]
        if group.problems and max(m.local, default=-1) >= _width(m, module):
            continue  # the trace lost this member's channel mapping (a problem of the group); it is never removed
        if m.role in (PRODUCER, DEPTHWISE):
            rows_zero = _zero_per_root(m, module.weight, 0, n)
            pruned |= rows_zero & _covered(m, n)
            if m.role == PRODUCER:
                filters_zero &= rows_zero
                produced |= _covered(m, n)
            if module.bias is not None:
                shifts_zero &= _zero_per_root(m, module.bias, 0, n)
        elif m.role == NORM:
            response = bn_zero_response(module)
            shifts_zero &= _zero_per_root(m, response, 0, n)
        elif m.role == CONSUMER:
            unread &= _zero_per_root(m, module.weight, 1, n, m.groups)
            read |= _covered(m, n)
    filters_zero &= produced
    zero = filters_zero & shifts_zero if group.zero_preserving else torch.zeros(n, dtype=torch.bool)
    unread &= read
    if has_layernorm(group):  # a LayerNorm's statistics see every channel: only all-zero ones can go, none folded
        filters_zero, unread = zero.clone(), torch.zeros(n, dtype=torch.bool)
    if group.problems:
        none = torch.zeros(n, dtype=torch.bool)
        return ChannelStatus(filters_zero, none, none.clone(), pruned)
    return ChannelStatus(filters_zero, zero, unread, pruned)


@torch.no_grad()
def may_remove_channels(model: nn.Module) -> bool:
    """False only when no channel of ``model`` can be dead: no Linear/Conv weight has an all-zero row or column,
    and no other weight or free parameter holds an exact zero (a removable channel needs one of these). Then
    compaction skips the dependency trace (slow on some models, e.g. LLaMA's rotary embeddings)."""
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and weight is not None and weight.dim() >= 2:
            nonzero = weight != 0
            if not bool(nonzero.flatten(1).any(1).all()) or not bool(nonzero.transpose(0, 1).flatten(1).any(1).all()):
                return True
            continue
        for name, param in module._parameters.items():
            if param is not None and name != "bias" and bool((param == 0).any()):
                return True
    return False


__all__ = ["ChannelStatus", "bn_zero_response", "channel_status", "may_remove_channels"]

"""Plans: which structure each layer must reach, resolved into targets, coupled over tied channels.

- :mod:`~admmcompress.plan.rules`: ``Plan`` and ``Rule`` (from Python, a dict or YAML), ``Plan.resolve``
  and ``Plan.resolve_coupled``, the one entry point for coupled targets;
- :mod:`~admmcompress.plan.targets`: ``Target`` (one constrained parameter) and ``PlanError``;
- :mod:`~admmcompress.plan.coupled`: ``CoupledTarget`` (one target over a channel group) and ``couple``;
- :mod:`~admmcompress.plan.graph`: channel groups from Torch-Pruning's dependency graph, cached per model.

>>> import torch.nn as nn
>>> from admmcompress.structures import Unstructured
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> [t.key for t in Plan({"0": Unstructured(sparsity=0.5)}).resolve(model)]
['0.weight:unstructured']
"""

from admmcompress.plan.channel_ops import register_channelwise_op, unregister_channelwise_op
from admmcompress.plan.coupled import COUPLING_MODES, ChannelSlice, CoupledTarget, couple
from admmcompress.plan.graph import cached_channel_groups, channel_groups, clear_channel_group_cache
from admmcompress.plan.rules import GEMM_MODULES, RULE_KEYS, Plan, Rule, prunable_layers, resolve_targets
from admmcompress.plan.targets import PlanError, Target

__all__ = [
    "COUPLING_MODES",
    "GEMM_MODULES",
    "RULE_KEYS",
    "ChannelSlice",
    "CoupledTarget",
    "Plan",
    "PlanError",
    "Rule",
    "Target",
    "cached_channel_groups",
    "channel_groups",
    "clear_channel_group_cache",
    "couple",
    "prunable_layers",
    "register_channelwise_op",
    "resolve_targets",
    "unregister_channelwise_op",
]

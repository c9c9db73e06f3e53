"""Shared builders for the compaction/purification tests: random structured masks on any model."""

import torch
from torch import nn

from admmcompress.finalize import hard_prune
from admmcompress.models import create_model, list_models
from admmcompress.plan import Plan, Rule
from admmcompress.plan.coupled import couple
from admmcompress.plan.graph import channel_groups
from admmcompress.structures import Column, Filter


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so BN shifts are never accidentally zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def random_structured_masks(model: nn.Module, x: torch.Tensor, sparsity: float = 0.5, columns: bool = True):
    """Coupled filter pruning of every removable group (extend mode) plus column pruning of a few convs."""
    groups = channel_groups(model, x)
    outputs = {g.root for g in groups if g.problems}
    types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))})
    plan = Plan([Rule(Filter(sparsity=sparsity), type=t) for t in types])
    targets = [t for t in plan.resolve(model) if t.layer not in outputs]
    targets = couple(model, targets, x, mode="extend", groups=groups)
    if columns:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        picked = convs[1::3]
        if picked:
            targets += Plan([Rule(Column(sparsity=0.3), match=n) for n in picked]).resolve(model)
    return hard_prune(model, targets)


def declares_image_input(name: str) -> bool:
    """Registered models that say what they take (``input_shape``); others (e.g. RNNs) are not CNNs."""
    try:
        return getattr(create_model(name), "input_shape", None) is not None
    except (TypeError, ValueError):
        return False


IMAGE_MODELS = [n for n in list_models() if declares_image_input(n)]

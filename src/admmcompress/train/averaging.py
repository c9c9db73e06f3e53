"""Weight averaging over the last epochs of a phase (stochastic weight averaging, Izmailov et al. 2018).

The average of masked models is masked too (a pruned weight is zero in every snapshot), so a
retrain phase can end on the average without touching the sparsity pattern. Weights a quantization
holds on fixed values stay on them (they are the same in every snapshot); a clustered layer keeps its
codes while its centroids train, so its average has one value per cluster, the mean centroid, which the
runner makes the layer's level (``QuantizedMaskSet.refit_centroids``). Straight-through (STE) weights
would leave their levels, and are refused by the config. BatchNorm statistics do not average:
:meth:`WeightAverage.apply` re-estimates them with ``torch.optim.swa_utils.update_bn`` (under torchrun
the runner gives it one process's batches, or merges the ranks' estimates).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class WeightAverage:
    """Running mean of a model's floating-point parameters, one snapshot per :meth:`update`.

    >>> model = nn.Linear(2, 1)
    >>> average = WeightAverage()
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(1.0); average.update(model)
    ...     _ = model.weight.fill_(3.0); average.update(model)
    >>> average.apply(model); model.weight.tolist()
    [[2.0, 2.0]]
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the mean."""
        self.count += 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.is_floating_point():
                    continue
                if name not in self.mean:
                    self.mean[name] = p.detach().clone()
                else:
                    self.mean[name] += (p.detach() - self.mean[name]) / self.count

    def apply(self, model: nn.Module, loader: Iterable | None = None) -> None:
        """Load the mean into ``model``; with ``loader``, re-estimate its BatchNorm statistics on it."""
        if self.count == 0:
            raise RuntimeError("WeightAverage.apply: no snapshot was taken; call update() at least once")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.mean.items():
                params[name].copy_(value)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and loader is not None:
            device = next(model.parameters()).device
            torch.optim.swa_utils.update_bn(loader, model, device=device)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": dict(self.mean)}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = {name: t.clone() for name, t in state["mean"].items()}

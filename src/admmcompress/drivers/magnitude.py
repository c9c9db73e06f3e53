"""Magnitude baselines driven by the same plan: one-shot and gradual (iterative) pruning.

One-shot: project the trained weights once (``hard_prune``), then masked retraining.
Gradual: raise each target's sparsity along the cubic schedule of Zhu & Gupta,
``s_t = s_final * (1 - (1 - t/T)^3)``, re-pruning by magnitude at each of ``T`` updates,
so a baseline gets the same epoch budget as an ADMM phase.

>>> import torch.nn as nn
>>> from admmcompress.structures import Unstructured
>>> model = nn.Linear(10, 10)
>>> gradual = GradualMagnitude(model, Plan({"": Unstructured(sparsity=0.9)}), updates=3)
>>> [round(gradual.sparsity_at(i, final=0.9), 3) for i in (1, 2, 3)]
[0.633, 0.867, 0.9]
"""

from __future__ import annotations

import torch

from admmcompress.drivers.schedule import MaskSchedule
from admmcompress.finalize import hard_prune
from admmcompress.masks import MaskSet
from admmcompress.plan import Plan, Target


def one_shot(model: torch.nn.Module, plan: Plan | list[Target], frozen: MaskSet | None = None) -> MaskSet:
    """Prune every target to its final structure at once, by magnitude."""
    targets = plan.resolve(model) if isinstance(plan, Plan) else list(plan)
    return hard_prune(model, targets, frozen)


class GradualMagnitude(MaskSchedule):
    """Prune in ``updates`` steps of growing sparsity; call ``step()`` at each update."""

    def sparsity_at(self, iteration: int, final: float = 1.0) -> float:
        progress = min(1.0, iteration / self.updates)
        return final * (1.0 - (1.0 - progress) ** 3)

    def step(self) -> MaskSet:
        """Prune to the next sparsity level; returns the masks (re-attach them to keep them)."""
        self.iteration = min(self.iteration + 1, self.updates)
        staged = [self._at(t, self.iteration) for t in self.targets]
        # Zero what earlier updates pruned first, so it can never come back (once pruned, stays pruned).
        self.masks.apply(self.model)
        self.masks = hard_prune(self.model, staged, self.masks)
        return self.masks

    def _at(self, target: Target, iteration: int) -> Target:
        sparsity = max(1e-9, self.sparsity_at(iteration, target.structure.target_sparsity))
        return target.with_structure(target.structure.with_sparsity(sparsity))

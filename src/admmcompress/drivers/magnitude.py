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

from dataclasses import dataclass
from typing import Any

import torch

from admmcompress.drivers.base import Driver, DriverContext, register_driver
from admmcompress.drivers.schedule import MaskSchedule
from admmcompress.finalize import MaskSet, hard_prune, mask_set_from_state
from admmcompress.plan import Plan, Target, resolve_targets


@dataclass(frozen=True)
class MagnitudeConfig:
    """Methods ``magnitude`` and ``gradual`` have no options (gradual's steps are the phase's updates)."""


def one_shot(model: torch.nn.Module, plan: Plan | list[Target], frozen: MaskSet | None = None) -> MaskSet:
    """Prune every target to its final structure at once, by magnitude."""
    targets = resolve_targets(model, plan, "one_shot")
    return hard_prune(model, targets, frozen)


@register_driver("magnitude", MagnitudeConfig)
class OneShotMagnitude(Driver):
    """One-shot magnitude pruning as a driver: prunes when its phase starts, then holds the masks.

    The phase (usually 0 epochs, or a short masked fine-tune) trains with the masks attached;
    ``finalize()`` returns them.
    """

    needs_updates = False  # prunes once, when built
    supports_coupling = True

    def __init__(self, model: torch.nn.Module, targets: list[Target], frozen: MaskSet | None = None,
                 resuming: bool = False):
        self.model, self.targets, self.frozen = model, resolve_targets(model, targets, type(self).__name__), frozen
        self.accept_targets(self.targets)
        self.history: list[dict[str, Any]] = []
        # Resuming a phase begun before drivers kept state: the carried masks already hold the pruning.
        self.masks = frozen if resuming and frozen is not None else one_shot(model, self.targets, frozen)

    @classmethod
    def from_config(cls, model: torch.nn.Module, targets: list[Target], config: MagnitudeConfig,
                    context: DriverContext) -> OneShotMagnitude:
        return cls(model, targets, context.frozen, context.resuming)

    def step(self) -> MaskSet:
        return self.masks

    def finalize(self) -> MaskSet:
        return self.masks

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = mask_set_from_state(state["masks"])


@register_driver("gradual", MagnitudeConfig)
class GradualMagnitude(MaskSchedule):
    """Prune in ``updates`` steps of growing sparsity; call ``step()`` at each update."""

    supports_coupling = True

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

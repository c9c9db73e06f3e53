"""Iterative quantization (ADMM-NN, SPEC 2.3): freeze a growing share of each layer on its levels.

At each of ``updates`` steps a further ``1/updates`` of every quantized layer's nonzero weights
(those closest to a level, bin by bin) is snapped to its level and frozen; the weights not yet
frozen keep training and can make up for the error of those that were. After the last step
every kept weight sits on a level. The levels are fixed at the first step (the structure's
projection of the weights then), pruned zeros stay zero. A layer whose every entry is frozen is
fully quantized: a following phase with ``quantized_weights: ste`` retrains it straight-through on
those levels, as after a hard quantization (the phase itself keeps its own rounds held).

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan
>>> from admmcompress.structures import FixedPoint
>>> model = nn.Linear(8, 8)
>>> driver = IterativeQuantization(model, Plan({"": FixedPoint(bits=2)}), updates=4)
>>> [round(driver.frozen_share_at(i), 2) for i in (1, 2, 3, 4)]
[0.25, 0.5, 0.75, 1.0]
>>> masks = driver.finalize()
>>> int(masks.held["weight"].frozen.sum()), len(model.weight.unique())
(64, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

from admmcompress.drivers.base import register_driver
from admmcompress.drivers.schedule import MaskSchedule
from admmcompress.finalize import QuantizedMaskSet, partial_quantize
from admmcompress.plan import PlanError, Target


@dataclass(frozen=True)
class IterativeQuantizationConfig:
    """Method ``iterative_quantization`` has no options: its rounds are the phase's updates (its cadence)."""


@register_driver("iterative_quantization", IterativeQuantizationConfig)
class IterativeQuantization(MaskSchedule):
    """Quantize in ``updates`` rounds of partial freezing; call ``step()`` at each update."""

    @classmethod
    def check_targets(cls, targets: list[Target]) -> None:
        check_quantization_only(targets)

    def frozen_share_at(self, iteration: int) -> float:
        """Share of each layer's nonzero weights frozen on a level after ``iteration`` updates."""
        return min(1.0, iteration / self.updates)

    def step(self) -> QuantizedMaskSet:
        """Freeze the next share; returns the masks with held values (re-attach them to keep them)."""
        self.iteration = min(self.iteration + 1, self.updates)
        # partial_quantize freezes a fraction of what is still free: 1/(T - i + 1) of it makes the
        # frozen share i/T after update i (1.0 at the last one: everything on a level).
        fraction = 1.0 / (self.updates - self.iteration + 1)
        self.masks.apply(self.model)
        self.masks = partial_quantize(self.model, self.targets, fraction, self.masks)
        return self.masks


def check_quantization_only(targets: list[Target]) -> None:
    """Iterative quantization quantizes; pruning rules belong to an earlier stage."""
    pruning = [t.param_name for t in targets if not t.structure.quantizes]
    if pruning:
        raise PlanError(
            f"method 'iterative_quantization' only quantizes, but the plan prunes {pruning}; "
            "prune in an earlier stage (its masks carry over) and give this stage quantization rules only"
        )

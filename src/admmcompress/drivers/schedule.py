"""What the mask-replacing drivers share: ``T`` updates, each of which returns a new mask set.

Gradual magnitude pruning and iterative quantization both move a plan's targets toward their
structure in ``updates`` steps; after each step the caller re-attaches the returned masks.
Subclasses implement :meth:`MaskSchedule.step` (and may refuse targets in ``check_targets``).
"""

from __future__ import annotations

from typing import Any

import torch

from admmcompress.drivers.base import Driver, DriverContext
from admmcompress.finalize import MaskSet, QuantizedMaskSet, mask_set_from_state
from admmcompress.plan import Plan, Target, resolve_targets
from admmcompress.structures.scalars import plain_number


class MaskSchedule(Driver):
    """``updates`` steps over ``plan``'s targets, starting from the masks (and held values) of ``frozen``.

    As a registered driver it takes ``context.updates`` (the number of updates its phase makes) and
    replaces ``masks`` at every ``step()``.
    """

    @classmethod
    def from_config(cls, model: torch.nn.Module, targets: list[Target], config: Any,
                    context: DriverContext) -> MaskSchedule:
        return cls(model, targets, updates=context.updates, frozen=context.frozen)

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan | list[Target],
        updates: int,
        frozen: MaskSet | None = None,
    ):
        updates = plain_number(updates)  # np.int64(4) or a 0-d tensor: the int it holds
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
            raise ValueError(f"{type(self).__name__}: updates={updates!r} must be a whole number >= 1 (the driver's "
                             "updates of the phase)")
        self.model = model
        self.targets = resolve_targets(model, plan, type(self).__name__)
        self.accept_targets(self.targets)
        self.updates = updates
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.masks = carry(frozen)

    def step(self) -> MaskSet:
        """Take the next update; returns the masks (re-attach them to keep them)."""
        raise NotImplementedError

    def finalize(self) -> MaskSet:
        """Take the remaining updates (to the final structure) and return the masks."""
        while self.iteration < self.updates:
            self.step()
        return self.masks

    def state_dict(self) -> dict[str, Any]:
        """Iteration and masks, with the values a ``QuantizedMaskSet`` holds (tensors only)."""
        return {"iteration": self.iteration, "masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; held quantized values come back held."""
        self.iteration = int(state["iteration"])
        self.masks = mask_set_from_state(state["masks"])


def carry(frozen: MaskSet | None) -> MaskSet:
    """A copy of an earlier stage's set to start from: its masks and, if any, its held values."""
    if frozen is None:
        return MaskSet()
    if isinstance(frozen, QuantizedMaskSet) and frozen.held:
        return QuantizedMaskSet(frozen.masks, frozen.held)
    return MaskSet(frozen.masks)


__all__ = ["MaskSchedule", "carry"]

"""When a driver updates: the one place that turns a phase's ``update_every_epochs``/``update_every_steps``
into optimizer-step counts.

>>> from admmcompress.train.config import ADMMPhaseConfig
>>> c = Cadence.of(ADMMPhaseConfig(epochs=4, update_every_steps=50), steps_per_epoch=100)
>>> c.period, c.updates, c.due(100), c.due(120)
(50, 8, True, False)
>>> Cadence.of(ADMMPhaseConfig(epochs=3, update_every_epochs=1), steps_per_epoch=10).updates
3
>>> Cadence.of(ADMMPhaseConfig(epochs=1, update_every_steps=500), steps_per_epoch=100).fires
False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cadence:
    """A driver's ``step()`` runs after every ``period`` optimizer steps of its phase (``updates`` in all)."""

    period: int
    total_steps: int

    @classmethod
    def of(cls, cfg: Any, steps_per_epoch: int) -> Cadence:
        """The cadence of a phase config; phases without an update cadence span the whole phase."""
        total = max(1, cfg.epochs * steps_per_epoch)
        steps, epochs = getattr(cfg, "update_every_steps", None), getattr(cfg, "update_every_epochs", None)
        if steps is not None:
            return cls(steps, total)
        if epochs is not None:
            return cls(epochs * steps_per_epoch, total)
        return cls(total, total)

    @property
    def updates(self) -> int:
        """How many updates the phase makes (at least one: ``finalize`` completes a schedule)."""
        return max(1, self.total_steps // self.period)

    @property
    def fires(self) -> bool:
        """Whether an update falls inside the phase at all (a period longer than the phase never comes)."""
        return self.period <= self.total_steps

    def due(self, step: int) -> bool:
        """True after optimizer step ``step`` (1-based within the phase) if an update falls there."""
        return step % self.period == 0


__all__ = ["Cadence"]

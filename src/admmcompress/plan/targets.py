"""A plan's resolved constraint on one parameter, and the error of a plan that does not fit.

Drivers and the finalizer see a plan only through targets: ``value(params)`` (the tensor to constrain),
``masks(params)`` (the structure's support) and ``structure.project``. A
:class:`~admmcompress.plan.coupled.CoupledTarget` spans several parameters behind the same calls.

>>> import torch.nn as nn
>>> from admmcompress.structures import Unstructured
>>> model = nn.Linear(4, 2)
>>> t = Target(layer="", param="weight", structure=Unstructured(sparsity=0.5), rule=0)
>>> t.key, int(t.masks(dict(model.named_parameters()))["weight"].sum())
('weight:unstructured', 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from admmcompress.structures.base import Structure


class PlanError(ValueError):
    """A plan that does not fit the model; the message lists every problem and its fix."""

    @classmethod
    def listing(cls, heading: str, problems: list[str]) -> PlanError:
        """One line for one problem (``heading: problem``); several go one per line under the heading.

        >>> str(PlanError.listing("invalid plan", ["rule #0: no sparsity"]))
        'invalid plan: rule #0: no sparsity'
        >>> print(PlanError.listing("invalid plan", ["a", "b"]))
        invalid plan:
          - a
          - b
        """
        if len(problems) == 1:
            return cls(f"{heading}: {problems[0]}")
        return cls(f"{heading}:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Target:
    """One concrete constraint: parameter ``param`` of module ``layer`` must lie in ``structure``."""

    layer: str
    param: str
    structure: Structure
    rule: int

    @property
    def key(self) -> str:
        """Stable name of this target, unique within a plan (used in state dicts)."""
        return f"{self.param_name}:{self.structure.kind}"

    @property
    def param_name(self) -> str:
        return f"{self.layer}.{self.param}" if self.layer else self.param

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter the target constrains: its one here, a channel group's in ``CoupledTarget``."""
        return (self.param_name,)

    # The driver/finalizer interface (a CoupledTarget spans several parameters behind the same three calls).
    def value(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensor this target constrains, from ``dict(model.named_parameters())``."""
        return params[self.param_name]

    def masks(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep-masks by parameter name of the structure's support of ``value(params)``."""
        return {self.param_name: self.structure.support(params[self.param_name])}

    def with_structure(self, structure: Structure) -> Target:
        """The same target with another structure (e.g. a gradual schedule's intermediate sparsity)."""
        return Target(self.layer, self.param, structure, self.rule)


__all__ = ["PlanError", "Target"]

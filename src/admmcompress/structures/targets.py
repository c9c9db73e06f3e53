"""A plan's resolved constraint on one parameter, and the error of a plan that does not fit.

Lives beside the structures (and :class:`~admmcompress.structures.coupled.CoupledTarget`, which
builds targets of its own) so that nothing in ``structures/`` imports the plan that uses it;
:mod:`admmcompress.plan` re-exports both names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from admmcompress.structures.sparsity import SparsityStructure


class PlanError(ValueError):
    """A plan that does not fit the model; the message lists every problem and its fix."""


@dataclass(frozen=True)
class Target:
    """One concrete constraint: parameter ``param`` of module ``layer`` must lie in ``structure``."""

    layer: str
    param: str
    structure: SparsityStructure
    rule: int

    @property
    def key(self) -> str:
        """Stable name of this target, unique within a plan (used in state dicts)."""
        return f"{self.param_name}:{self.structure.kind}"

    @property
    def param_name(self) -> str:
        return f"{self.layer}.{self.param}" if self.layer else self.param

    # The driver/finalizer interface (a CoupledTarget spans several parameters behind the same three calls).
    def value(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensor this target constrains, from ``dict(model.named_parameters())``."""
        return params[self.param_name]

    def masks(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep-masks by parameter name of the structure's support of ``value(params)``."""
        return {self.param_name: self.structure.support(params[self.param_name])}

    def with_structure(self, structure: SparsityStructure) -> Target:
        """The same target with another structure (e.g. a gradual schedule's intermediate sparsity)."""
        return Target(self.layer, self.param, structure, self.rule)


__all__ = ["PlanError", "Target"]

"""Reweighted group lasso (BLK-REW, SPEC 7.2): push whole groups toward zero, then threshold.

For every target the driver keeps one weight ``P_g`` per group ``g`` of the structure's
partition and adds to the loss

    ``lambda * sum_g P_g * ||W_g||_2 ** power``,  with  ``P_g = 1 / (||W_g||_2 ** power + eps)``

recomputed from the current weights by ``step()`` (every K iterations: the Runner calls it at the
stage's ``update_every_epochs``/``update_every_steps``). ``power=1`` is the verified form of the
authors' code (group norm, not squared; default); ``power=2`` the squared form quoted for
BLK-REW. Norms are taken of ``|w|`` (SPEC P11: never ``1/(w + eps)`` with a signed ``w``), and the
gradient of a group that is exactly zero is 0 (a subgradient), never ``inf * 0 = NaN``.
The reweighting makes the penalty approximate a count of nonzero groups, so large groups are
barely shrunk while small ones are driven to zero; ``finalize()`` then hard-prunes every target to
its rate (``finalize.hard_prune``). Like ADMM, the driver never knows which structure it drives: it
only reads the structure's group partition.

Three lines in your own loop::

    rew = Reweighted(model, plan, penalty=1e-4)          # P from the pretrained weights
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y) + rew.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
        rew.step()                                       # reweight: P = 1 / (||W_g||^power + eps)
    masks = rew.finalize()                               # hard prune; masks.attach(model, new_opt)

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan
>>> from admmcompress.structures import Column
>>> layer = nn.Linear(3, 2)
>>> with torch.no_grad():
...     _ = layer.weight.copy_(torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]]))
>>> rew = Reweighted(layer, Plan({"": Column(sparsity=0.5)}), penalty=ReweightedConfig(penalty=1.0))
>>> round(rew.penalty().item(), 3)    # columns of norm 5, 0, 1: 5/(5+eps) + 0 + 1/(1+eps)
1.999
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from admmcompress.drivers.base import Driver, DriverContext, register_driver
from admmcompress.finalize import MaskSet, hard_prune
from admmcompress.plan import Plan, Target, resolve_targets
from admmcompress.structures.groups import as_matrix
from admmcompress.structures.scalars import plain_number

# Squared norms below this count as zero: their gradient is 0 instead of w / 0.
_TINY = 1e-30


@dataclass(frozen=True)
class ReweightedConfig:
    """Strength and form of the reweighted penalty.

    Args:
        penalty: lambda, the penalty's weight against the (batch-mean) loss; e.g. 1e-4.
        power: 1 for ``P_g * ||W_g||`` (verified code; default) or 2 for ``P_g * ||W_g||^2``.
        eps: > 0, keeps ``P_g = 1 / (||W_g||^power + eps)`` finite; 1e-3 in the authors' code.

    >>> ReweightedConfig(penalty=1e-4, power=2).to_dict()
    {'penalty': 0.0001, 'power': 2, 'eps': 0.001}
    """

    penalty: float = 1e-4
    power: int = 1
    eps: float = 1e-3

    def __post_init__(self) -> None:
        for key in ("penalty", "power", "eps"):  # numpy/torch scalars: the Python numbers they hold
            object.__setattr__(self, key, plain_number(getattr(self, key)))
        if (
            isinstance(self.penalty, bool)
            or not isinstance(self.penalty, (int, float))
            or not (self.penalty >= 0 and math.isfinite(self.penalty))
        ):
            raise ValueError(f"reweighted penalty={self.penalty!r} must be a finite number >= 0, e.g. 1e-4")
        if not isinstance(self.power, (int, float)) or isinstance(self.power, bool) or self.power not in (1, 2):
            raise ValueError(f"reweighted power={self.power!r} must be 1 (group norm) or 2 (squared norm)")
        if (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, (int, float))
            or not (self.eps > 0 and math.isfinite(self.eps))
        ):
            raise ValueError(f"reweighted eps={self.eps!r} must be a finite number > 0, e.g. 1e-3")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ReweightedConfig:
        unknown = sorted(set(spec) - {"penalty", "power", "eps"})
        if unknown:
            raise ValueError(f"reweighted: unknown key(s) {unknown}; allowed: ['eps', 'penalty', 'power']")
        return cls(**spec)


def group_norms(weight: torch.Tensor, ids: torch.Tensor, n_groups: int, power: int) -> torch.Tensor:
    """``||W_g||_2 ** power`` for every group, differentiable; a zero group has gradient 0.

    >>> w = torch.tensor([[3.0, 0.0], [4.0, 0.0]], requires_grad=True)
    >>> group_norms(w, torch.tensor([[0, 1], [0, 1]]), 2, power=1).tolist()
    [5.0, 0.0]
    """
    # float32 at least: in float16 the squares of small entries and _TINY itself round to 0, and sqrt's backward
    # at 0 is inf * 0 = NaN (exactly where the penalty drives groups)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    flat = as_matrix(weight).reshape(-1).to(dtype)
    squares = torch.zeros(n_groups, dtype=dtype, device=weight.device)
    squares = squares.index_add(0, ids.reshape(-1).to(weight.device), flat * flat)
    if power == 2:
        return squares
    return squares.clamp_min(_TINY).sqrt() * (squares > _TINY)


@register_driver("reweighted", ReweightedConfig)
class Reweighted(Driver):
    """Reweighted group-lasso state for every target of a plan (shaped like ``ADMM``).

    Args:
        model: the model being trained; ``P`` is initialised from its current (pretrained) weights.
        plan: a ``Plan`` or the resolved targets.
        penalty: lambda, or a full ``ReweightedConfig``.
        frozen: masks from an earlier stage (progressive pruning); merged into ``finalize()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan | list[Target],
        penalty: float | ReweightedConfig = 1e-4,
        frozen: MaskSet | None = None,
    ):
        self.model = model
        self.targets: list[Target] = resolve_targets(model, plan, type(self).__name__)
        self.accept_targets(self.targets)
        self.config = penalty if isinstance(penalty, ReweightedConfig) else ReweightedConfig(penalty=penalty)
        self.frozen = frozen
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._params = dict(model.named_parameters())
        self._groups: dict[str, tuple[torch.Tensor, int]] = {}
        self.state: dict[str, dict[str, Any]] = {}
        for t in self.targets:
            self._groups[t.key] = t.structure.group_ids(self._params[t.param_name])
            self.state[t.key] = {"P": self._weights(t)}

    @classmethod
    def from_config(cls, model: torch.nn.Module, targets: list[Target], config: ReweightedConfig,
                    context: DriverContext) -> Reweighted:
        return cls(model, targets, penalty=config, frozen=context.frozen)

    # --- the penalty --------------------------------------------------------------------------
    def _norms(self, target: Target, detach: bool = False) -> torch.Tensor:
        w = self._params[target.param_name]
        ids, n = self._groups[target.key]
        return group_norms(w.detach() if detach else w, ids, n, self.config.power)

    @torch.no_grad()
    def _weights(self, target: Target) -> torch.Tensor:
        return 1.0 / (self._norms(target, detach=True) + self.config.eps)

    def penalty(self) -> torch.Tensor:
        """``lambda * sum_targets sum_g P_g * ||W_g||^power`` as a differentiable scalar."""
        self._params = dict(self.model.named_parameters())  # replaced parameters (assign=True loads) are followed
        total = None
        for t in self.targets:
            norms = self._norms(t)
            term = (self.state[t.key]["P"].to(norms.device) * norms).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.config.penalty * total

    # --- reweighting --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """Recompute ``P_g = 1 / (||W_g||^power + eps)`` from the current weights; returns the log entry.

        The entry gives, per target, the penalty term and ``||W - project(W)|| / ||W||`` (how far the
        weights are from the structure: hard pruning will remove that much).
        """
        entry: dict[str, Any] = {"iteration": self.iteration + 1, "penalty": {}, "residual": {}}
        self._params = dict(self.model.named_parameters())
        for t in self.targets:
            norms = self._norms(t, detach=True)
            entry["penalty"][t.key] = float((self.state[t.key]["P"].to(norms.device) * norms).sum())
            self.state[t.key]["P"] = self._weights(t)
        entry["residual"] = self.residuals()
        self.iteration += 1
        self.history.append(entry)
        return entry

    @torch.no_grad()
    def residuals(self) -> dict[str, float]:
        """``||W - project(W)|| / ||W||`` per target (0 when W already has the structure)."""
        out = {}
        for t in self.targets:
            w = self._params[t.param_name].detach()
            norm = float(w.norm())
            out[t.key] = float((w - t.structure.project(w)).norm()) / norm if norm > 0 else 0.0
        return out

    def finalize(self) -> MaskSet:
        """Hard-prune every target to its rate from the current weights; returns the masks."""
        return hard_prune(self.model, self.targets, self.frozen)

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "history": list(self.history),
            "config": self.config.to_dict(),
            "state": {k: {"P": s["P"].clone()} for k, s in self.state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.state) - set(state["state"]))
        extra = sorted(set(state["state"]) - set(self.state))
        if missing or extra:
            raise ValueError(
                f"reweighted state does not match the plan: missing {missing}, unexpected {extra}"
            )
        for k, s in state["state"].items():
            if s["P"].shape != self.state[k]["P"].shape:
                raise ValueError(
                    f"reweighted state for {k}: {s['P'].numel()} group weights, the plan gives "
                    f"{self.state[k]['P'].numel()} groups; was the structure or the model changed?"
                )
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        for k, s in state["state"].items():
            self.state[k] = {"P": s["P"].clone()}


__all__ = ["Reweighted", "ReweightedConfig", "group_norms"]

"""What the training-framework callbacks (Lightning, Hugging Face Trainer) share: argument checks, the end of
the driving phase, and keeping masks on a framework's optimizers."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from admmcompress.drivers.base import Driver, ModuleTransform, get_driver, list_drivers
from admmcompress.finalize import MaskSet
from admmcompress.plan import COUPLING_MODES, Plan, resolve_targets
from admmcompress.plan.coupled import CoupledTarget

COUPLINGS = ("none", *COUPLING_MODES)


def is_positive_int(value: Any) -> bool:
    """An ``int`` (not a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_admm_epochs(admm_epochs: Any) -> None:
    if not is_positive_int(admm_epochs):
        raise ValueError(f"admm_epochs={admm_epochs!r} must be an integer >= 1 (epochs of the driving phase)")


def check_coupling(coupling: Any, plan: Any, who: str, driver: Any = None) -> None:
    """One line for a coupling a framework callback cannot use (checked when the callback is made)."""
    if coupling not in COUPLINGS:
        raise ValueError(f"{who}: coupling={coupling!r}; choose one of {COUPLINGS}")
    if coupling != "none" and driver is not None and not driver.cls.supports_coupling:
        coupled = [m for m in list_drivers() if get_driver(m).cls.supports_coupling]
        raise ValueError(f"{who}: coupling={coupling!r} needs a method that drives coupled targets, one of {coupled} "
                         f"({driver.name} drives one parameter per target); change the method, or use coupling='none'")
    if coupling != "none" and not isinstance(plan, Plan):
        raise ValueError(f"{who}: coupling={coupling!r} resolves a Plan over the model's channel groups; give the "
                         "Plan, not resolved targets (or coupling='none')")


def resolve_for_callback(model: nn.Module, plan: Any, coupling: str, example: Callable[[], Any], who: str,
                         can_couple: bool = True) -> list:
    """The driver's targets: per layer (``coupling="none"``), or coupled over channel groups from ``example()`` (a
    training batch, read only when needed). Per layer, filter/channel targets on layers whose channels are tied
    (SwiGLU's gate and up projections, a residual add) prune different channels and the model cannot be compacted
    afterwards (a review's finding: the README's one-rule SwiGLU plan trained, then compaction refused): warned."""
    if coupling != "none":
        with torch.random.fork_rng():  # reading a batch draws from the global generator: training order unchanged
            batch = example()
        return plan.resolve_coupled(model, batch, coupling)
    targets = resolve_targets(model, plan, who)
    channel = [t for t in targets if getattr(t.structure, "kind", "") in ("filter", "channel")]
    if not channel or not isinstance(plan, Plan) or not can_couple:
        return targets
    try:
        with torch.random.fork_rng():  # reading a batch draws from the global generator: training order unchanged
            batch = example()
        coupled = plan.resolve_coupled(model, batch, "extend")
    except Exception:  # noqa: BLE001 - only a hint: the per-layer targets stand
        return targets
    tied = [t for t in coupled if isinstance(t, CoupledTarget) and len(t.sources) > 1]
    if tied:
        layers = ", ".join(f"'{s.split(':')[0].rsplit('.', 1)[0]}'" for s in tied[0].sources[:3])
        warnings.warn(f"{who}: filter/channel targets on layers whose channels are tied ({layers}) are resolved per "
                      "layer, so they prune different channels and the model cannot be compacted afterwards; pass "
                      "coupling='strict' (or 'extend') to prune them together", RuntimeWarning, stacklevel=3)
    return targets


def finish_driving(driver: Driver, method: str, who: str) -> MaskSet:
    """Close the driver and hard-prune; a driver that rewrites modules is refused (the framework's optimizer
    would keep training the old parameters)."""
    driver.close()
    outcome = driver.finalize()
    if isinstance(outcome, ModuleTransform):
        raise ValueError(
            f"{who}: method '{method}' rewrites modules, which would leave the trainer's optimizer on old parameters; "
            "use a masking method (admm, reweighted, magnitude) here, or admmcompress run"
        )
    return outcome


def hold_masks(masks: MaskSet, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], clear: bool) -> None:
    """Masks on the model (gradient hooks, pruned weights zeroed) and re-applied after every step of each
    optimizer; ``clear`` drops their moments so stale momentum cannot revive pruned weights."""
    masks.attach(model)
    for optimizer in optimizers:
        if clear:
            optimizer.state.clear()
        masks.watch(optimizer)

"""What the training-framework callbacks (Lightning, Hugging Face Trainer) share: argument checks, the end of
the driving phase, and keeping masks on a framework's optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from admmcompress.drivers.base import Driver, ModuleTransform
from admmcompress.finalize import MaskSet


def is_positive_int(value: Any) -> bool:
    """An ``int`` (not a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_admm_epochs(admm_epochs: Any) -> None:
    if not is_positive_int(admm_epochs):
        raise ValueError(f"admm_epochs={admm_epochs!r} must be an integer >= 1 (epochs of the driving phase)")


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

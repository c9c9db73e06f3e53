"""PyTorch Lightning callback: ADMM (or any registered driver) in a ``Trainer`` (extra: ``admmcompress[lightning]``).

The callback runs a stage of the reference pipeline inside ``trainer.fit``:

* epochs ``[0, admm_epochs)``: the driver's penalty is part of every training step (its gradient is added to
  the step's gradients after the backward pass; it is equal on every rank, so under the DDP strategy this is
  what averaging it would give), and its update (ADMM's Z/U step) runs every ``update_every_epochs`` epochs or
  ``update_every_steps`` optimizer steps;
* at the end of epoch ``admm_epochs``: ``finalize`` (hard prune), masks attached to the model and to the
  trainer's optimizers, whose moment estimates are cleared (no stale momentum revives pruned weights);
* the remaining epochs (``Trainer(max_epochs=...)``): masked fine-tuning; pruned weights stay exactly zero.

The penalty and the driver's progress (ADMM: rho, residual ``||W - Z|| / ||W||`` per layer) are logged through
``pl_module.log`` to whatever logger the trainer has (TensorBoard, CSV). Its state (driver, masks) is saved in
Lightning checkpoints. Limits: one optimizer step per batch (``accumulate_grad_batches`` is honoured by
scaling the penalty), and no fp16 gradient scaler (use ``precision="32"`` or ``"bf16-mixed"``).

Example (see examples/lightning_admm.py)::

    callback = ADMMCallback(Plan({"fc1": Unstructured(compression=20)}), admm_epochs=3, submodule="net")
    trainer = lightning.pytorch.Trainer(max_epochs=5, callbacks=[callback])
    trainer.fit(module, train_loader)          # 3 epochs with ADMM, hard prune, 2 epochs masked fine-tune
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "admmcompress.train.lightning needs PyTorch Lightning: pip install 'admmcompress[lightning]'"
    ) from None

from admmcompress.drivers.base import Driver, DriverContext, get_driver
from admmcompress.finalize import MaskSet, mask_set_from_state
from admmcompress.plan import Plan, Target, resolve_targets
from admmcompress.plan.graph import map_tensors
from admmcompress.train.framework_hooks import (
    check_admm_epochs,
    check_coupling,
    finish_driving,
    hold_masks,
    is_positive_int,
    resolve_for_callback,
)
from admmcompress.train.logging import numeric_scalars


class ADMMCallback(pl.Callback):
    """Drive ``plan`` with method ``method`` for ``admm_epochs`` epochs, hard-prune, then fine-tune with masks.

    Args:
        plan: the layers and structures (names relative to ``submodule``).
        admm_epochs: epochs of the driving phase (>= 1); later epochs fine-tune with masks.
        method: a registered driver (``admm``, ``reweighted``, a plugin's); ``options`` its config mapping.
        update_every_epochs / update_every_steps: the driver's update cadence (default: every epoch).
        submodule: the attribute path of the network inside the LightningModule (None: the module itself).
        coupling / example: ``"strict"``/``"extend"`` resolve filter/channel targets over channel groups
            (``Plan.resolve_coupled``) by tracing the network on ``example`` (what it is called with), so the
            model compacts afterwards; ``"none"`` (default) resolves per layer, and warns, given ``example``, where
            tied layers would prune different channels.
    """

    def __init__(
        self,
        plan: Plan | list[Target],
        admm_epochs: int,
        method: str = "admm",
        options: dict[str, Any] | None = None,
        update_every_epochs: int | None = None,
        update_every_steps: int | None = None,
        submodule: str | None = None,
        coupling: str = "none",
        example: Any = None,
    ):
        check_admm_epochs(admm_epochs)
        if coupling != "none" and example is None:
            raise ValueError(f"ADMMCallback: coupling={coupling!r} traces the network: give example=... (an input "
                             "it is called with, e.g. one training batch's inputs)")
        self.coupling, self.example = coupling, example
        if update_every_epochs is not None and update_every_steps is not None:
            raise ValueError("give update_every_epochs or update_every_steps, not both")
        for name, value in (("update_every_epochs", update_every_epochs), ("update_every_steps", update_every_steps)):
            if value is not None and not is_positive_int(value):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.spec = get_driver(method)  # an unknown method: one line listing the registered ones
        check_coupling(coupling, plan, "ADMMCallback", self.spec)
        self.config = self.spec.make_config(options)
        self.plan, self.admm_epochs, self.submodule = plan, admm_epochs, submodule
        self.every_epochs = update_every_epochs if update_every_steps is None else None
        self.every_epochs = self.every_epochs or (None if update_every_steps else 1)
        self.every_steps = update_every_steps
        self.driver: Driver | None = None
        self.masks: MaskSet | None = None
        self._steps = 0  # optimizer steps of the driving phase
        self._pending: dict[str, Any] | None = None

    # --- setup ------------------------------------------------------------------------------
    def _net(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module.get_submodule(self.submodule) if self.submodule else pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        precision = str(trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"ADMMCallback: precision={precision!r} scales gradients, which the penalty's gradient would miss; "
                "use precision='32' or 'bf16-mixed'"
            )
        net = self._net(pl_module)
        pending, self._pending = self._pending, None
        if pending is not None and pending.get("masks") is not None:  # resumed after the hard prune
            self.masks = mask_set_from_state(pending["masks"])
        if self.masks is not None:  # fine-tuning (resumed, or a further fit): the masks hold, no new driver
            self._attach(trainer, net, clear=False)
            return
        device = next(net.parameters()).device
        example = None if self.example is None else map_tensors(lambda t: t.to(device), self.example)
        targets = (resolve_for_callback(net, self.plan, self.coupling, lambda: example, type(self).__name__,
                                        self.spec.cls.supports_coupling) if example is not None
                   else resolve_targets(net, self.plan, type(self).__name__))
        self.spec.cls.accept_targets(targets)
        steps_per_epoch = max(1, int(trainer.num_training_batches) // trainer.accumulate_grad_batches)
        total = self.admm_epochs * steps_per_epoch
        period = self.every_steps or self.every_epochs * steps_per_epoch
        context = DriverContext(updates=max(1, total // period), steps_per_epoch=steps_per_epoch,
                                resuming=pending is not None)
        # The weights are equal on every rank here (the DDP strategy copied rank 0's), so is the driver's state.
        self.driver = self.spec.cls.from_config(net, targets, self.config, context)
        if pending is not None and pending.get("driver") is not None:
            self.driver.load_state_dict(pending["driver"])
            self._steps = int(pending.get("steps", 0))
        self.driver.prepare(net)

    # --- the driving phase ------------------------------------------------------------------------
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.driver is None:
            return
        penalty = self.driver.penalty()
        if penalty.requires_grad:
            # Lightning divides the step's loss by accumulate_grad_batches: the penalty likewise.
            (penalty / trainer.accumulate_grad_batches).backward()
        pl_module.log("admm/penalty", float(penalty.detach()), on_step=True, on_epoch=True, sync_dist=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.driver is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self._steps += 1
        if self.every_steps is not None and self._steps % self.every_steps == 0:
            self.driver.step()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.driver is None:
            return
        epoch = trainer.current_epoch + 1
        if self.every_epochs is not None and epoch % self.every_epochs == 0:
            self.driver.step()
        for key, value in numeric_scalars(self.driver.progress()).items():
            pl_module.log(f"admm/{key}", value, sync_dist=False)
        if epoch >= self.admm_epochs:
            self._finalize(trainer, self._net(pl_module))

    def _finalize(self, trainer: pl.Trainer, net: nn.Module) -> None:
        """Hard prune (or the driver's module transform), then masks on the model and the optimizers."""
        self.masks, self.driver = finish_driving(self.driver, self.spec.name, "ADMMCallback"), None
        self._attach(trainer, net, clear=True)

    def _attach(self, trainer: pl.Trainer, net: nn.Module, clear: bool) -> None:
        hold_masks(self.masks, net, trainer.optimizers, clear)

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "driver": self.driver.state_dict() if self.driver is not None else None,
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "steps": self._steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)


def masked_weights_zero(net: nn.Module, masks: MaskSet) -> bool:
    """True when every pruned weight of ``net`` is exactly zero (a fine-tune's invariant)."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        return all(bool((params[name][~mask] == 0).all()) for name, mask in masks.items())


__all__ = ["ADMMCallback", "masked_weights_zero"]

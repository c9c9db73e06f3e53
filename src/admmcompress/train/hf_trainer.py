"""Hugging Face ``Trainer`` callback: ADMM (or any registered driver) inside ``trainer.train()`` (extra: ``hf``).

One ``train()`` call runs a stage of the reference pipeline, as the Lightning callback does:

* epochs ``[0, admm_epochs)``: the driver's penalty joins every optimizer step (its gradient is added right
  before ``optimizer.step()``, once per step whatever ``gradient_accumulation_steps`` is, which is what adding it
  to the loss would give), and its update (ADMM's Z/U step) runs every ``update_every_steps`` optimizer steps
  or at every epoch end;
* at the end of epoch ``admm_epochs``: ``finalize`` (hard prune), masks attached to the model and the trainer's
  optimizer, whose moments are cleared (no stale momentum revives a pruned weight);
* the remaining epochs (``TrainingArguments(num_train_epochs=...)``): masked fine-tuning, pruned weights exactly 0.

The penalty and the driver's progress (ADMM: rho, residual ``||W - Z|| / ||W||``) join the trainer's
``state.log_history`` and the ``logs`` passed to the callbacks after this one (``admm/...``); the ``report_to``
integrations are called before user callbacks, so they do not see them: a logging callback listed after this one
does. Limits: ``max_grad_norm`` clips the data
gradient only (the trainer clips before the penalty's gradient is added); fp16 gradient scaling is refused (use
fp32 or bf16); ``resume_from_checkpoint`` is refused (the ADMM state is not in the trainer's checkpoints); a driver
that rewrites modules (``penni``) cannot run here, since the trainer's optimizer would keep
the old parameters (use ``admmcompress run``).

Example (a transformers model pruned to 2:4 in its FFNs, 3 epochs of ADMM then 2 of masked fine-tuning)::

    plan = Plan([Rule(NM(n=2, m=4), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=3, options={"rho": 1e-3})
    args = TrainingArguments("out", num_train_epochs=5, report_to=[])
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
    callback.masks  # the MaskSet; every pruned weight of model is 0
"""

from __future__ import annotations

from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("admmcompress.train.hf_trainer needs transformers: pip install 'admmcompress[hf]'") from None

from admmcompress.drivers.base import Driver, DriverContext, get_driver
from admmcompress.finalize import MaskSet
from admmcompress.plan import Plan, Target
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


class ADMMTrainerCallback(TrainerCallback):
    """Drive ``plan`` with ``method`` for ``admm_epochs`` epochs, hard-prune, then fine-tune with masks.

    Args:
        plan: the layers and structures (names as in ``model.named_modules()``), or resolved targets.
        admm_epochs: epochs of the driving phase (>= 1); the trainer's later epochs fine-tune with masks.
        method: a registered driver (``admm``, ``reweighted``, a plugin's); ``options`` its config mapping.
        update_every_steps: the driver's update cadence in optimizer steps (default: once per epoch).
        coupling: ``"strict"``/``"extend"``: filter/channel targets become one target per channel group
            (``Plan.resolve_coupled`` on the first training batch), so the model compacts afterwards; ``"none"``
            (default): per layer, with a warning where tied layers would prune different channels.
    """

    def __init__(
        self,
        plan: Plan | list[Target],
        admm_epochs: int,
        method: str = "admm",
        options: dict[str, Any] | None = None,
        update_every_steps: int | None = None,
        coupling: str = "none",
    ):
        check_admm_epochs(admm_epochs)
        self.coupling = coupling
        if update_every_steps is not None and not is_positive_int(update_every_steps):
            raise ValueError(f"update_every_steps={update_every_steps!r} must be a positive integer (or None)")
        self.spec = get_driver(method)  # an unknown method: one line listing the registered ones
        check_coupling(coupling, plan, type(self).__name__, self.spec)
        self.config = self.spec.make_config(options)
        self.plan, self.admm_epochs, self.every_steps = plan, admm_epochs, update_every_steps
        self.driver: Driver | None = None
        self.masks: MaskSet | None = None
        self._model: nn.Module | None = None
        self._penalty = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if getattr(args, "fp16", False):
            raise ValueError(
                "ADMMTrainerCallback: fp16 scales gradients, which the penalty's gradient would miss; "
                "train in fp32 or with bf16=True"
            )
        self._model = model
        if state.global_step > 0 and self.driver is None and self.masks is None:
            # The trainer's checkpoints are JSON for callbacks: Z, U and masks are not in them.
            raise ValueError(
                "ADMMTrainerCallback: resuming a Trainer from a checkpoint would restart ADMM from scratch (Z, U and "
                "masks are not in the trainer's checkpoint); rerun train() from the start, or save the masks "
                "(callback.masks.state_dict()) after the driving phase and fine-tune with them"
            )
        if self.masks is not None:  # a further train() call: fine-tune with the masks already found
            self._attach(model, optimizer, clear=False)
            return
        targets = resolve_for_callback(model, self.plan, self.coupling, lambda: _first_batch(train_dataloader, model),
                                       type(self).__name__, self.spec.cls.supports_coupling)
        self.spec.cls.accept_targets(targets)
        batches = len(train_dataloader) if train_dataloader is not None else max(1, state.max_steps)
        steps_per_epoch = max(1, batches // max(1, args.gradient_accumulation_steps))
        period = self.every_steps or steps_per_epoch
        context = DriverContext(updates=max(1, self.admm_epochs * steps_per_epoch // period),
                                steps_per_epoch=steps_per_epoch)
        self.driver = self.spec.cls.from_config(model, targets, self.config, context)
        self.driver.prepare(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.driver is None:
            return
        penalty = self.driver.penalty()
        if penalty.requires_grad:
            penalty.backward()  # adds d(penalty)/dW to the accumulated data gradient, once per optimizer step
        self._penalty = float(penalty.detach())

    def on_step_end(self, args, state, control, **kwargs):
        if self.driver is not None and self.every_steps is not None and state.global_step % self.every_steps == 0:
            self.driver.step()

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if self.driver is None:
            return
        if self.every_steps is None:
            self.driver.step()
        if round(state.epoch) >= self.admm_epochs:
            self._finalize(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.driver is None or logs is None:
            return
        extra = {"admm/penalty": self._penalty}
        extra.update({f"admm/{key}": value for key, value in numeric_scalars(self.driver.progress()).items()})
        logs.update(extra)  # seen by the callbacks after this one
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the trainer appended its copy of logs before calling us

    def on_train_end(self, args, state, control, **kwargs):
        if self.driver is not None:  # the run ended inside the driving phase: finish it so the result holds
            self._finalize(None)

    def _finalize(self, optimizer) -> None:
        self.masks, self.driver = finish_driving(self.driver, self.spec.name, "ADMMTrainerCallback"), None
        self._attach(self._model, optimizer, clear=True)

    def _attach(self, model: nn.Module, optimizer, clear: bool) -> None:
        # accelerate wraps the torch optimizer; the step hooks go on the one inside
        optimizers = [] if optimizer is None else [getattr(optimizer, "optimizer", optimizer)]
        hold_masks(self.masks, model, optimizers, clear)


def _first_batch(loader, model: nn.Module) -> Any:
    """The trainer's first batch (a dict of tensors) on the model's device, without labels: the example a coupled
    plan is traced with."""
    if loader is None:
        raise ValueError("ADMMTrainerCallback: coupling needs the trainer's train_dataloader to trace the model")
    batch = next(iter(loader))
    if isinstance(batch, dict):
        batch = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    device = next(model.parameters()).device
    return map_tensors(lambda t: t.to(device), batch)


__all__ = ["ADMMTrainerCallback"]

"""Reference training pieces: optimizers, learning-rate schedules, one epoch, evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.train.config import DistillConfig, OptimizerConfig, PhaseConfig
from admmcompress.train.precision import cpu_autocast


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """The dropout probability of every dropout layer (and multi-layer RNN) of ``model``, by name."""
    return {
        name: float(m.p if isinstance(m, nn.modules.dropout._DropoutNd) else m.dropout)
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.RNNBase))
    }


def set_dropout(model: nn.Module, rate: float | dict[str, float]) -> None:
    """Set every dropout layer's probability to ``rate`` (or per name, from :func:`dropout_rates`).

    >>> from admmcompress.models import LeNet5
    >>> model = LeNet5(dropout=0.5)
    >>> set_dropout(model, 0.0); dropout_rates(model)
    {'dropout': 0.0}
    """
    for name, m in model.named_modules():
        value = rate.get(name) if isinstance(rate, dict) else rate
        if value is None:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = float(value)
        elif isinstance(m, nn.RNNBase) and m.num_layers > 1:  # single-layer RNNs reject dropout
            m.dropout = float(value)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last checkpoint is intact."""


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """A fresh optimizer (each phase gets its own, so stale momentum cannot revive pruned weights)."""
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def update_period_steps(cfg: PhaseConfig, steps_per_epoch: int) -> int:
    """Optimizer steps between two ADMM updates (the whole phase for non-ADMM phases)."""
    from admmcompress.train.cadence import Cadence  # the one place the cadence is decided

    return Cadence.of(cfg, steps_per_epoch).period


def learning_rate(cfg: PhaseConfig, step: int, steps_per_epoch: int) -> float:
    """LR at optimizer step ``step`` of a phase; a pure function of the counters (so resume is exact).

    ``cosine`` anneals over the phase; ``admm_reset`` restarts at the base LR at every ADMM
    update and divides it by 10 at each third of the ADMM iteration (SPEC 1.4, P9).
    """
    base = cfg.optimizer.lr
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.lr_schedule == "constant":
        return base
    if cfg.lr_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    period = update_period_steps(cfg, steps_per_epoch)
    position = (step % period) / period
    return base * 0.1 ** math.floor(3 * position)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    hard: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) (Hinton et al.; T^2 keeps gradient scale).

    ``hard``: the cross-entropy of ``student_logits`` if the caller already has it.
    """
    t = cfg.temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    if hard is None:
        hard = nn.functional.cross_entropy(student_logits, labels)
    return (1.0 - cfg.alpha) * hard + cfg.alpha * t * t * soft


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.x[start : start + batch_size])
        correct += (logits.argmax(1) == data.y[start : start + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(1, len(data))


LossFn = Callable[[Any, Any, nn.Module], torch.Tensor]
"""``loss_fn(batch, output, model) -> scalar tensor``: the custom data loss of :func:`train_epoch`."""


def train_epoch(
    model: nn.Module,
    loader: BatchLoader | Iterable[Any],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    first_step: int,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
    label_smoothing: float = 0.0,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    loss_fn: LossFn | None = None,
    max_grad_norm: float | None = None,
    loss_weight: Callable[[Any], float] | None = None,
    all_ranks: Callable[[bool], bool] | None = None,
) -> dict[str, float]:
    """One epoch of cross-entropy (+ optional penalty) training; returns mean losses.

    ``after_step(global_step)`` runs after every optimizer step (ADMM cadence in steps). With
    ``teacher`` and ``distill`` the data loss is :func:`distillation_loss`; the reported ``loss`` is
    always the plain cross-entropy, so runs with and without distillation compare (label smoothing
    changes the trained loss only, likewise). ``autocast`` (e.g. ``torch.bfloat16``) runs forward passes
    in that precision; ``channels_last`` feeds 4-D batches in that memory layout (faster convs on CPU).

    ``loss_fn(batch, output, model)`` replaces the cross-entropy: ``batch`` is what ``loader`` yields
    (any shape; the model's input is ``batch[0]`` for a tuple or list, else the batch itself),
    ``output = model(input)`` as the model returns it (under ``autocast``: in that precision), and the
    reported ``loss`` is the mean of ``loss_fn``'s values. It cannot be combined with distillation or
    label smoothing (both are cross-entropy terms: put them in ``loss_fn``).
    ``max_grad_norm`` clips the gradient's global L2 norm before each step (e.g. 1.0 for LSTMs).
    ``loader`` may be any iterable; without ``len()`` the progress bar shows no total.
    ``loss_weight(batch)`` scales the data loss (not the penalty) of each batch: a distributed rank's share of
    the global batch (:class:`admmcompress.train.distributed.ShardedLoader`), so DDP's gradient average is the
    global batch's gradient. ``all_ranks(flag)`` is True when ``flag`` is True on every distributed rank
    (:meth:`admmcompress.train.distributed.Distributed.all_true`): with it, a loss that is NaN/inf on one rank
    stops every rank at the same step, instead of leaving the others waiting in the gradient all-reduce.

    Example: a custom loss on (inputs, labels) batches (here mean squared error on one-hot labels).

    >>> from admmcompress.models import LeNet300100
    >>> model = LeNet300100()
    >>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    >>> def mse(batch, output, model):
    ...     return nn.functional.mse_loss(output, nn.functional.one_hot(batch[1], 10).float())
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> out = train_epoch(model, batches, opt, lambda step: 0.1, 0, progress=False, loss_fn=mse)
    >>> sorted(out)
    ['loss', 'penalty']
    """
    if (teacher is None) != (distill is None):
        raise ValueError("distillation needs both a teacher model and a DistillConfig")
    if loss_fn is not None and (teacher is not None or label_smoothing):
        raise ValueError(
            "loss_fn replaces the cross-entropy, so it cannot be combined with distillation or label smoothing; "
            "compute those terms inside loss_fn"
        )
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0 (e.g. 1.0), or None for no clipping")
    model.train()
    step = first_step
    data_sum = penalty_sum = 0.0
    total = len(loader) if hasattr(loader, "__len__") else None
    batches = tqdm(loader, total=total, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if loss_fn is None:
            x, y = _pair(batch)
        else:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with cpu_autocast(autocast):
            output = model(x)
        if loss_fn is not None:
            data_loss = loss = _scalar(loss_fn(batch, output, model), desc)
        else:
            logits = output.float()
            data_loss = nn.functional.cross_entropy(logits, y)
            loss = data_loss
            if label_smoothing:
                loss = nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = distillation_loss(logits, teacher_logits, y, distill, hard=loss)
        weight = 1.0 if loss_weight is None else loss_weight(batch)
        loss = loss * weight if loss_weight is not None else loss
        if penalty is not None:
            extra = penalty()
            loss = loss + extra
            penalty_sum += extra.item()
        finite = bool(torch.isfinite(loss))
        if all_ranks is not None and not all_ranks(finite) and finite:
            raise TrainingDiverged(
                f"{desc}: the loss became NaN/inf on another rank at step {step}; lower the learning rate "
                f"(now {lr_at(step):.3g}) or rho"
            )
        if not finite:
            raise TrainingDiverged(
                f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate "
                f"(now {lr_at(step):.3g}) or rho"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        data_sum += data_loss.item() * weight  # weighted like the gradient: the mean over ranks is the global one
        step += 1
        if after_step is not None:
            after_step(step)
    n = max(1, step - first_step)
    return {"loss": data_sum / n, "penalty": penalty_sum / n}


def _pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) of a cross-entropy batch, or one clear error for any other batch shape."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    kind = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(
        f"the loader yielded {kind}; without loss_fn a batch must be an (inputs, labels) pair: "
        "pass loss_fn(batch, output, model) for other batch shapes"
    )


def _scalar(loss: Any, desc: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{desc}: loss_fn must return a scalar tensor (e.g. its mean), got {shape}")
    return loss.reshape(())

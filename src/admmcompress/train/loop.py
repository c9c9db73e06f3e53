"""Reference training pieces: optimizers, learning-rate schedules, one epoch, evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.train.config import ADMMPhaseConfig, DistillConfig, OptimizerConfig, PhaseConfig


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
    if isinstance(cfg, ADMMPhaseConfig):
        if cfg.update_every_steps is not None:
            return cfg.update_every_steps
        return cfg.update_every_epochs * steps_per_epoch
    return max(1, cfg.epochs * steps_per_epoch)


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


def train_epoch(
    model: nn.Module,
    loader: BatchLoader,
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
) -> dict[str, float]:
    """One epoch of cross-entropy (+ optional penalty) training; returns mean losses.

    ``after_step(global_step)`` runs after every optimizer step (ADMM cadence in steps). With
    ``teacher`` and ``distill`` the data loss is :func:`distillation_loss`; the reported ``loss`` is
    always the plain cross-entropy, so runs with and without distillation compare (label smoothing
    changes the trained loss only, likewise). ``autocast`` (e.g. ``torch.bfloat16``) runs forward passes
    in that precision; ``channels_last`` feeds 4-D batches in that memory layout (faster convs on CPU).
    """
    if (teacher is None) != (distill is None):
        raise ValueError("distillation needs both a teacher model and a DistillConfig")
    model.train()
    step = first_step
    data_sum = penalty_sum = 0.0
    batches = tqdm(loader, total=len(loader), desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for x, y in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(x).float()
        data_loss = nn.functional.cross_entropy(logits, y)
        loss = data_loss
        if label_smoothing:
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = distillation_loss(logits, teacher_logits, y, distill, hard=loss)
        if penalty is not None:
            extra = penalty()
            loss = loss + extra
            penalty_sum += extra.item()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate "
                f"(now {lr_at(step):.3g}) or rho, then rerun with --resume from the last checkpoint"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        data_sum += data_loss.item()
        step += 1
        if after_step is not None:
            after_step(step)
    n = max(1, len(loader))
    return {"loss": data_sum / n, "penalty": penalty_sum / n}

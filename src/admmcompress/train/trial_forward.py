"""Trial forwards a run makes before it trains, each leaving the model as it found it (modes, buffers, RNG):
``check_model_reads`` (the model reads the training inputs and has an output per class) and ``share_needs``
(under torchrun, how many samples each rank's share of a batch needs for the model's BatchNorm layers).

>>> import torch
>>> from torch import nn
>>> from admmcompress.train.config import RunConfig
>>> config = RunConfig.from_dict({"model": {"name": "lenet300100"}, "data": {"dataset": "mnist"},
...                               "pretrain": {"epochs": 1}})
>>> share_needs(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), torch.zeros(2, 4), config)[0]
2
>>> share_needs(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), torch.zeros(2, 1, 6, 6), config)
(1, '')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from admmcompress.messages import first_line
from admmcompress.plan.graph import describe_input
from admmcompress.train.config import AUTOCAST_DTYPES, RunConfig
from admmcompress.train.distributed import (
    BATCHNORM_NEEDS_TWO,
    batchnorm_inputs,
    batchnorm_needs_two,
    min_share,
    plain_batchnorm,
)
from admmcompress.train.precision import cpu_autocast


def check_model_reads(model: nn.Module, example: Any, train: Any, config: RunConfig, classifies: bool = True) -> None:
    """One forward of the example batch (eval mode, no gradient, the run's autocast; buffers left as they were):
    a model that cannot read the training inputs,
    or (``classifies``: the loss is cross-entropy) has fewer outputs than the labels have classes, is refused in
    one line before anything is written."""
    dtype = AUTOCAST_DTYPES[config.autocast]
    try:
        # buffers a forward may update even in eval mode (quantization observers and the like) are put back
        with _left_as_found(model), torch.no_grad(), cpu_autocast(dtype):
            model.eval()
            out = model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(
            f"model '{config.model['name']}' cannot read the training inputs ({describe_input(example)}): "
            f"{first_line(err)}; {_reading_fix(model, example)}"
        ) from None
    labels = getattr(train, "y", None)
    if not (classifies and isinstance(out, torch.Tensor) and out.dim() == 2 and isinstance(labels, torch.Tensor)):
        return
    if labels.dtype not in (torch.int64, torch.int32) or not labels.numel():  # class indices only
        return
    classes = int(labels.max()) + 1
    if classes > out.shape[1]:
        raise ValueError(
            f"model '{config.model['name']}' has {out.shape[1]} outputs but the training labels have {classes} "
            f"classes; give the model num_classes: {classes} (or data with its classes)"
        )


def share_needs(model: nn.Module, example: Any, config: RunConfig) -> tuple[int, str]:
    """Under torchrun: the fewest samples each rank's share of a batch may hold for ``model`` to train, and why
    (the text of a refusal): 2 when a plain BatchNorm layer sees one value per channel from each sample (an
    ``(N, C)`` input, a 1x1 map: torch cannot normalize a single sample there), else 1 (a conv BatchNorm on HxW > 1
    maps trains on one sample per rank).

    Told apart by one forward of ``example`` in training mode (so layers only training runs, such as auxiliary
    heads, are seen) with the run's autocast and no gradient, that records what each BatchNorm layer reads
    (``batchnorm_inputs``); the model's buffers, modes and the random generator are put back as they were. Where
    that forward fails, or SyncBatchNorm is present (its training forward would communicate), the conservative rule
    holds: 2 with any plain BatchNorm (``min_share``)."""
    if not plain_batchnorm(model):
        return 1, ""
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return min_share(model), BATCHNORM_NEEDS_TWO
    try:  # (training-mode BatchNorm updates its running statistics: _left_as_found puts them back)
        with (_left_as_found(model), torch.random.fork_rng(devices=[]), torch.no_grad(),
              cpu_autocast(AUTOCAST_DTYPES[config.autocast]), batchnorm_inputs(model) as seen):
            model.train()
            model(example)
    except Exception:  # any failure of this trial forward: the conservative rule
        return min_share(model), BATCHNORM_NEEDS_TWO
    single = next((name for name, values in seen.items() if values == 1), None)
    return (2, batchnorm_needs_two(single)) if single is not None else (1, "")


@contextlib.contextmanager
def _left_as_found(model: nn.Module) -> Iterator[None]:
    """Put back, however the block ends, every module's train/eval mode and every buffer (a trial forward's
    changes: running statistics, observers) as they were when it began."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = _snapshot_buffers(model)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        _restore_buffers(buffers)


def _reading_fix(model: nn.Module, example: Any) -> str:
    """The fix for a model that cannot read the example: its weights' dtype where that differs from the inputs'."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if isinstance(example, torch.Tensor) and example.is_floating_point() and weights not in (None, example.dtype):
        return (f"the model's weights are {str(weights).removeprefix('torch.')} and the inputs "
                f"{str(example.dtype).removeprefix('torch.')}: convert one, e.g. model.float()")
    return "choose a model for this data, or data for this model"


_BufferSlot = tuple[nn.Module, str, torch.Tensor, torch.Tensor]


def _snapshot_buffers(model: nn.Module) -> list[_BufferSlot]:
    """Every buffer of every module: ``(module, name, the tensor, a copy of its values)``. A tensor that several
    modules share is copied once, so restoring it keeps them sharing one tensor. Buffers a forward creates (caches
    such as rotary tables, which their modules track in plain attributes) are left to it."""
    copies: dict[int, torch.Tensor] = {}
    slots: list[_BufferSlot] = []
    for module in model.modules():
        for name, tensor in module._buffers.items():
            if tensor is not None:
                if id(tensor) not in copies:
                    copies[id(tensor)] = tensor.detach().clone()
                slots.append((module, name, tensor, copies[id(tensor)]))
    return slots


def _restore_buffers(slots: list[_BufferSlot]) -> None:
    """Put every buffer slot back as :func:`_snapshot_buffers` found it after a trial forward: the same tensor
    (a forward that assigned a new one does not leave it there, nor part the modules that shared the old one)
    holding the same values (the copy itself where the forward changed the tensor's shape or type in place)."""
    with torch.no_grad():
        for module, name, tensor, values in slots:
            if tensor.shape == values.shape and tensor.dtype == values.dtype:
                tensor.copy_(values)
                module._buffers[name] = tensor
            else:
                module._buffers[name] = values


__all__ = ["check_model_reads", "share_needs"]

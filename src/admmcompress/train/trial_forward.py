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
from admmcompress.plan.graph import describe_input, output_tensors
from admmcompress.train.config import AUTOCAST_DTYPES, RunConfig
from admmcompress.train.distributed import (
    BATCHNORM_NEEDS_TWO,
    batchnorm_inputs,
    batchnorm_needs_two,
    min_share,
    plain_batchnorm,
)
from admmcompress.train.precision import cpu_autocast


def check_model_reads(model: nn.Module, example: Any, train: Any, config: RunConfig,
                      classifies: bool = True) -> list[str]:
    """One forward of the example batch (eval mode, no gradient, the run's autocast; buffers left as they were):
    a model that cannot read the training inputs, or (``classifies``: the loss is cross-entropy) labels that
    cross-entropy cannot take or more classes than the model has outputs, is refused in one line before anything
    is written. Returns the names of the layers whose outputs the model returns as they are (its classifier)."""
    dtype = AUTOCAST_DTYPES[config.autocast]
    written: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # held until the forward returns: a freed tensor's id is reused by the next

    def record(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                written[id(output)] = name
                alive.append(output)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
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
    finally:
        for handle in handles:
            handle.remove()
    outputs = [written[id(t)] for t in output_tensors(out) if id(t) in written]
    alive.clear()
    if classifies and isinstance(out, torch.Tensor) and out.dim() >= 2:
        _check_labels(first_labels(train), out, config)
    return outputs


def _check_labels(labels: Any, out: torch.Tensor, config: RunConfig) -> None:
    if not isinstance(labels, torch.Tensor) or not labels.numel():
        return
    problem = _label_problem(labels, tuple(out.shape))
    if problem:
        raise ValueError(f"the training labels {problem}; the loss is cross-entropy")
    if labels.is_floating_point():  # class probabilities shaped like the outputs
        return
    classes = int(labels.max()) + 1
    if classes > out.shape[1]:
        raise ValueError(
            f"model '{config.model['name']}' has {out.shape[1]} outputs but the training labels have {classes} "
            f"classes; give the model {classes} outputs (num_classes: {classes} for a registered model), or data "
            "with its classes"
        )


def first_labels(train: Any, n: int = 64) -> torch.Tensor | None:
    """The training labels (a ``Split``'s ``y``), or those of a ``Dataset``'s first ``n`` samples (None when its
    items are not ``(input, label)`` pairs of tensors or numbers)."""
    labels = getattr(train, "y", None)
    if isinstance(labels, torch.Tensor) or not isinstance(train, torch.utils.data.Dataset):
        return labels
    try:
        size = len(train)  # type: ignore[arg-type]
        items = [train[i] for i in range(min(n, size))]
        return torch.utils.data.default_collate([item[1] for item in items])
    except Exception:  # an iterable dataset, items that are not pairs, labels that do not collate: not checked here
        return None


def _label_problem(labels: torch.Tensor, out_shape: tuple[int, ...]) -> str:
    """What makes ``labels`` unusable as cross-entropy targets of outputs shaped ``out_shape`` (N, C, ...), or ''."""
    batchless = (out_shape[0], *out_shape[2:])  # class indices: the outputs' shape without the class axis
    if labels.dtype == torch.bool or labels.is_complex():
        return f"are {labels.dtype}: give integer class indices (y.long())"
    if labels.is_floating_point():
        if labels.shape[1:] == torch.Size(out_shape[1:]):
            return ""
        fix = "y.long()" if labels.shape[1:] == torch.Size(batchless[1:]) else "class indices"
        shape = ", ".join(map(str, out_shape[1:]))
        return (f"are {labels.dtype} shaped {tuple(labels.shape)}: give integer class indices ({fix}), or class "
                f"probabilities shaped like the model's outputs (N, {shape})")
    if labels.shape[1:] != torch.Size(batchless[1:]):
        one_hot = labels.dim() == len(out_shape) and labels.shape[1] == out_shape[1]
        hint = "they look one-hot: give y.argmax(1)" if one_hot else "give one class index per output position"
        return f"are shaped {tuple(labels.shape)} for outputs shaped (N, {', '.join(map(str, out_shape[1:]))}): {hint}"
    wrong = labels[(labels < 0) & (labels != -100)]  # -100: cross-entropy's ignore_index
    if wrong.numel():
        return f"hold the negative class {int(wrong[0])}: class indices run from 0 (-100 marks an ignored target)"
    return ""


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


__all__ = ["check_model_reads", "first_labels", "share_needs"]

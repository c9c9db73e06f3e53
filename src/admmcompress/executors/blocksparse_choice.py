"""Per-shape choice of a block-sparse layer's implementation, from latencies measured once per machine.

Which implementation of a block-pruned layer is fastest depends on the machine (cache sizes, cores),
the layer's shape and sparsity pattern, the batch and the thread count (the torch path, say, can beat
dense at batch 1 on one thread and lose to it at batch 32 or on two threads). So
``to_blocksparse(model, choose="measured", batches=(1, 8, 32))`` times every candidate of
:data:`CANDIDATES` on each layer at each batch,
round-robin (:func:`admmcompress.timing.time_interleaved`), caches the milliseconds in a
:class:`~admmcompress.timing.LatencyCache` table (``"blocksparse-choice"``; keyed by the layer, its input
shape, its pattern's size, the batch and the thread count) and replaces the layer with the
implementation that was fastest, or, where the fastest differs between batches, with a
:class:`MeasuredChoice` that runs for each batch the one fastest at the nearest timed batch not above it.

:func:`pick` is the whole decision and a pure function of the table: the smallest time wins, ties go to
the earlier candidate (dense first). Dense is always a candidate, so at the batches it was timed on a
converted layer is never slower than dense (up to timing noise); :func:`choice_report` says how often
dense won (a choice that is always dense is not a kernel).

>>> table = {1: {"dense": 2.0, "torch": 0.5, "cpp": 0.4}, 32: {"dense": 1.0, "torch": 3.0, "cpp": 1.0}}
>>> pick(table)                       # batch 32: a tie goes to dense
{1: 'cpp', 32: 'dense'}
>>> layer = MeasuredChoice({"dense": nn.Linear(4, 2)}, {1: "dense"}, batch_dim=0, batched_ndim=2)
>>> layer.implementation(7), tuple(layer(torch.ones(7, 4)).shape)
('dense', (7, 2))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from admmcompress.executors.fold import capture_inputs
from admmcompress.timing import LatencyCache, time_interleaved

CANDIDATES = ("dense", "torch", "cpp", "bsr")
TABLE = "blocksparse-choice"
TRAIN_ERROR = (
    "MeasuredChoice runs inference only (its implementations copy one weight); call model.eval() to run it, and to "
    "fine-tune, train the masked dense model before converting it with choose='measured'"
)


class Table(Protocol):
    """What the choice reads and writes: a :class:`LatencyCache` or any object with ``get``/``put``."""

    def get(self, key: str) -> float | None: ...

    def put(self, key: str, ms: float) -> None: ...


def pick(table: Mapping[int, Mapping[str, float]]) -> dict[int, str]:
    """``{batch: implementation}``: the fastest per batch, ties to the earlier of :data:`CANDIDATES`."""
    choice = {}
    for batch, times in sorted(table.items()):
        if "dense" not in times:
            raise ValueError(f"pick: batch {batch} has no 'dense' time; dense is the reference every choice needs")
        unknown = sorted(set(times) - set(CANDIDATES))
        if unknown:
            raise ValueError(f"pick: unknown implementation(s) {unknown}; the candidates are {CANDIDATES}")
        choice[batch] = min((times[name], CANDIDATES.index(name), name) for name in times)[2]
    return choice


def batch_axis(module: nn.Module) -> tuple[int, int]:
    """``(batch_dim, batched_ndim)`` of the module's input: where the batch is when it has one."""
    if isinstance(module, nn.RNNBase):
        return (0 if module.batch_first else 1), 3
    if isinstance(module, nn.Conv2d):
        return 0, 4
    return 0, 2  # Linear (leading dims: the first counts) and RNN cells


class MeasuredChoice(nn.Module):
    """A layer with one or more implementations, the one to run picked by the input's batch size (inference only).

    Its implementations hold copies of one weight, so it cannot learn: training would update the dense copy
    alone and the outputs would then depend on the batch size. The dense implementation's parameters are
    frozen, the layer starts in eval mode, and a call in train mode with gradients enabled is refused:
    fine-tune the masked dense model, then convert it.

    Args:
        impls: the implementations in use (``{name: module}``, names from :data:`CANDIDATES`).
        choice: ``{timed batch: name}``; a batch runs the choice of the largest timed batch not above it
            (the smallest timed batch below all of them).
        batch_dim, batched_ndim: the input's batch dimension, and its rank when batched (else batch 1).
    """

    def __init__(self, impls: Mapping[str, nn.Module], choice: Mapping[int, str], batch_dim: int, batched_ndim: int):
        super().__init__()
        missing = sorted(set(choice.values()) - set(impls))
        if not choice or missing:
            raise ValueError(f"MeasuredChoice: the choice names {missing or 'nothing'}; pass those implementations")
        self.impls = nn.ModuleDict(dict(impls))
        self.impls.requires_grad_(False)  # only the dense copy has parameters; training them alone splits the copies
        self.batches = sorted(int(b) for b in choice)
        self.names = [choice[b] for b in self.batches]
        self.batch_dim, self.batched_ndim = batch_dim, batched_ndim
        self.eval()  # a converted layer runs inference; a fresh nn.Module would start in train mode and refuse it

    @property
    def choice(self) -> dict[int, str]:
        return dict(zip(self.batches, self.names, strict=True))

    def implementation(self, batch: int) -> str:
        """The implementation that runs at ``batch``."""
        chosen = self.names[0]
        for timed, name in zip(self.batches, self.names, strict=True):
            if timed <= batch:
                chosen = name
        return chosen

    def forward(self, x, *args, **kwargs):
        if self.training and torch.is_grad_enabled():  # a training step would silently fit one copy only
            raise ValueError(TRAIN_ERROR)
        batch = x.shape[self.batch_dim] if isinstance(x, torch.Tensor) and x.dim() >= self.batched_ndim else 1
        return self.impls._modules[self.implementation(batch)](x, *args, **kwargs)

    def extra_repr(self) -> str:
        return "choice=" + ", ".join(f"batch {b}: {n}" for b, n in zip(self.batches, self.names, strict=True))


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s floating-point weights, which its input must have (torch's default without any)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def input_shape(module: nn.Module, name: str, shape: Sequence[int] | None, batch: int, steps: int) -> list[int]:
    """The input shape to time ``module`` at ``batch``: the recorded ``shape`` with its batch replaced, or a default."""
    batch_dim, batched_ndim = batch_axis(module)
    if shape is None:
        if isinstance(module, nn.Conv2d):
            raise ValueError(
                f"layer '{name}' (Conv2d): choose='measured' needs the image size; pass example=<a model input>"
            )
        if isinstance(module, nn.RNNBase):
            shape = [batch, steps, module.input_size] if module.batch_first else [steps, batch, module.input_size]
        else:
            shape = [batch, getattr(module, "in_features", None) or module.input_size]
    else:
        shape = list(shape)
        if len(shape) >= batched_ndim:
            shape[batch_dim] = batch
        else:
            shape.insert(batch_dim, batch)
    return shape


def recorded_shapes(model: nn.Module, example, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The first input shape each named layer sees when the model runs ``example``."""
    return {name: tuple(x.shape) for name, x in capture_inputs(model, example, set(names)).items()}


def measure(
    name: str,
    impls: Mapping[str, nn.Module],
    key: str,
    batches: Sequence[int],
    shape: Sequence[int] | None,
    table: Table,
    rounds: int = 9,
    steps: int = 16,
) -> dict[int, dict[str, float]]:
    """``{batch: {implementation: ms}}`` from ``table``, timing (interleaved) only batches it lacks.

    ``key`` names the layer (type, settings, pattern size); the batch, thread count and implementation are
    appended to it.
    """
    dense = impls["dense"]
    input_shape(dense, name, shape, 1, steps)  # fails early (with the fix) when the shape cannot be known
    measured: dict[int, dict[str, float]] = {}
    threads = torch.get_num_threads()
    for batch in batches:
        keys = {impl: f"{key}|batch={batch}|threads={threads}|{impl}" for impl in impls}
        found = {impl: table.get(k) for impl, k in keys.items()}
        if any(ms is None for ms in found.values()):
            # in the weights' dtype: a float64 layer refuses float32 inputs (and is timed as it will run)
            x = torch.randn(*input_shape(dense, name, shape, batch, steps), dtype=weight_dtype(dense))
            with torch.inference_mode():
                found = time_interleaved({impl: (lambda m=m, x=x: m(x)) for impl, m in impls.items()}, rounds=rounds)
            for impl, ms in found.items():  # one interleaved pass: the ratios between them are consistent
                table.put(keys[impl], ms)
        measured[batch] = {impl: float(ms) for impl, ms in found.items()}
    return measured


def check_batches(batches: Sequence[int]) -> None:
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise ValueError(f"choose='measured': batches={list(batches)!r} must be positive integers, e.g. (1, 8, 32)")


def choose_layer(
    name: str,
    impls: Mapping[str, nn.Module],
    key: str,
    batches: Sequence[int],
    shape: Sequence[int] | None,
    table: Table | None = None,
    rounds: int = 9,
    steps: int = 16,
) -> nn.Module:
    """The layer that runs the fastest of ``impls`` (``{name: module}``, "dense" included) at each batch."""
    check_batches(batches)
    table = LatencyCache(TABLE) if table is None else table
    choice = pick(measure(name, impls, key, batches, shape, table, rounds, steps))
    return chosen_layer(impls, choice)


def chosen_layer(impls: Mapping[str, nn.Module], choice: Mapping[int, str]) -> nn.Module:
    """The layer that runs ``choice``: the one implementation itself when every batch chose it (no dispatch
    on each call; it carries the choice as ``measured_choice``), else a :class:`MeasuredChoice`."""
    names = set(choice.values())
    if len(names) == 1:
        module = impls[names.pop()]
        module.measured_choice = dict(sorted(choice.items()))
        return module
    used = {impl: impls[impl] for impl in CANDIDATES if impl in names}
    return MeasuredChoice(used, choice, *batch_axis(impls["dense"]))


@dataclass
class ChoiceReport:
    """What the measured choice picked: per layer ``{batch: implementation}``, and how often dense won."""

    layers: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def dense_layers(self) -> float:
        """Share of layers that run dense at every timed batch."""
        if not self.layers:
            return 0.0
        return sum(set(c.values()) == {"dense"} for c in self.layers.values()) / len(self.layers)

    @property
    def dense_points(self) -> float:
        """Share of (layer, batch) points where dense was fastest."""
        points = [impl for c in self.layers.values() for impl in c.values()]
        return sum(impl == "dense" for impl in points) / len(points) if points else 0.0


def choice_report(model: nn.Module) -> ChoiceReport:
    """The choices of every layer of ``model`` converted with ``choose="measured"``."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, MeasuredChoice):
            layers[name] = module.choice
        elif isinstance(getattr(module, "measured_choice", None), dict):
            layers[name] = dict(module.measured_choice)
    return ChoiceReport(layers)


__all__ = [
    "CANDIDATES",
    "TABLE",
    "TRAIN_ERROR",
    "ChoiceReport",
    "MeasuredChoice",
    "Table",
    "check_batches",
    "choice_report",
    "chosen_layer",
    "choose_layer",
    "measure",
    "pick",
    "input_shape",
    "recorded_shapes",
    "weight_dtype",
]

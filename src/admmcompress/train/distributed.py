"""Runs under ``torch.distributed`` (``torchrun --nproc-per-node N admmcompress run CONFIG.yaml``).

One process per rank trains a DistributedDataParallel copy of the model on its share of every global batch.
What keeps N processes equal to one:

* **Data**: every rank draws the *same* seeded permutation (and augmentation) of the whole training set as a
  single process would (``BatchLoader`` seeded with the run's seed), then keeps its contiguous share of each
  global batch (:class:`ShardedLoader`: a distributed sampler whose order does not depend on N). The global
  batch is ``data.batch_size``, whatever N is; a rank's loss is weighted by its share so the averaged gradient
  is the gradient of the global batch's mean loss. The loader's state is the shared generator's, so a
  checkpoint resumes with any number of processes. This holds for the bundled in-memory datasets; a dataset
  given by import path is read through ``DistributedSampler``, whose order depends on N (a resume with another
  N sees other batches), and an ``IterableDataset`` must split itself across ranks with ``__len__`` per rank
  (uneven shares: every rank counts and runs the shortest one, with a warning, instead of hanging in the
  all-reduce or scheduling other steps).
  Dropout draws from each rank's global RNG: while the ranks' shares of every batch are equal in size, their
  generators stay in step and each rank draws the same masks for its share (unlike one process drawing for
  the whole batch); a batch that splits unevenly (``data.batch_size``, or the last batch, not a multiple of N)
  makes the ranks draw different counts, and from then on their generators differ. A checkpoint holds every
  rank's generator state: a resume with the same N continues each rank's own (bit-identical); one with another
  N gives every rank rank 0's, with a warning. A ``data.batch_size`` below N is refused, and so is a training
  set smaller than N (no batch could give every rank a sample: no step would train); a last batch that would
  leave a rank no sample (or, with BatchNorm, a single one) is skipped, with a warning. BatchNorm that sees one
  value per channel from each sample (``(N, C)`` inputs, 1x1 maps) cannot normalize a single sample in training,
  so with such a layer a ``data.batch_size`` below 2N, or a training set below 2N samples, is refused up front
  (:func:`check_batch`) instead of stopping at the first step with torch's error.
* **Driver state**: DDP keeps the weights bitwise equal on every rank (the gradient all-reduce returns the
  same sum everywhere), and every driver computes Z, U, rho and masks from those weights only, so they are
  equal on every rank without being sent. After each driver update and hard prune the ranks compare a SHA-256
  of the driver's state and masks; a driver whose state still differs (one that decides from measured
  latency or its own random draws) gets rank 0's state, broadcast, with a warning. ``ADMMCOMPRESS_CHECK_RANKS=1``
  (or ``distributed: {check_ranks: true}``) turns that into an error and adds the weights to the comparison
  (:meth:`Distributed.assert_same`): the debug mode.
* **Metrics**: test accuracy counts each test sample exactly once (contiguous shards, summed counts);
  epoch losses are averaged over ranks. Checkpoints, reports and metrics are written by rank 0 only.

BatchNorm: DDP broadcasts rank 0's running statistics at each forward, and the runner broadcasts them
before evaluations, so every rank evaluates rank 0's model. Weight averaging re-estimates them over all the
training data: on one process's global batches on every rank (bundled datasets), or on each rank's own batches
merged over the ranks (:meth:`Distributed.merge_batchnorm`, a dataset by import path). In training each rank
normalizes with its own share of the batch, which differs from one process; ``distributed: {sync_batchnorm:
true}`` converts BatchNorm to ``torch.nn.SyncBatchNorm`` (global batch statistics, as one process), which torch
provides for CUDA devices only.

>>> ctx = Distributed()            # one process: every helper is the identity
>>> ctx.active, ctx.is_main, ctx.mean([2.0, 4.0])
(False, True, [2.0, 4.0])
>>> shard(10, rank=1, world_size=3)
(4, 7)
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from admmcompress.data.datasets import BatchLoader, Split

CHECK_ENV = "ADMMCOMPRESS_CHECK_RANKS"


class RankMismatch(RuntimeError):
    """State that must be equal on every rank differs (names the first differing entry and the ranks)."""


class FollowerError(ValueError):
    """Rank 0 refused the run (its one-line message, repeated on the other ranks)."""


@dataclass
class Distributed:
    """Who this process is in the run: ``rank`` of ``world_size`` (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    check: bool = False  # assert equal driver state on every rank (debug mode)
    shared: bool = False  # rank 0 has sent its start/resume decision (see share)
    # processes per machine (torchrun's LOCAL_WORLD_SIZE; 0: unknown, taken as all of them on one machine)
    local_world_size: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launcher(self) -> str:
        """The start of a command line that launches ``admmcompress`` as this run was launched: ``admmcompress``
        in one process, a ``torchrun`` line for as many processes under torchrun (advice that continues a run
        must relaunch every rank: one process would resume it with another world size, not as it was).

        >>> Distributed().launcher, Distributed(0, 2).launcher
        ('admmcompress', 'torchrun --standalone --nproc-per-node 2 -m admmcompress')
        >>> Distributed(0, 8, local_world_size=4).launcher
        'torchrun --nnodes 2 --nproc-per-node 4 (and the rendezvous flags of the first launch) -m admmcompress'
        """
        if not self.active:
            return "admmcompress"
        local = self.local_world_size or self.world_size
        if local >= self.world_size:
            return f"torchrun --standalone --nproc-per-node {self.world_size} -m admmcompress"
        # several machines: torchrun's rendezvous endpoint is not known to the processes it starts
        return (f"torchrun --nnodes {self.world_size // local} --nproc-per-node {local} (and the rendezvous flags "
                "of the first launch) -m admmcompress")

    def relaunch_note(self) -> str:
        """'' in one process; under torchrun, the end of advice that continues the run: relaunch every rank."""
        if not self.active:
            return ""
        return f" (all {self.world_size} processes, launched again with {self.launcher} run ...)"

    # --- lifecycle ------------------------------------------------------------------------
    @classmethod
    def from_env(cls, backend: str | None = None) -> Distributed:
        """The process group torchrun describes (``WORLD_SIZE``/``RANK``), joined once; one process without it.

        The backend is gloo (the runner trains on the CPU) unless ``backend`` names another.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check = os.environ.get(CHECK_ENV, "") not in ("", "0")
        if world <= 1:
            return cls(check=check)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
        if not dist.is_initialized():
            dist.init_process_group(backend or "gloo")
        # LOCAL_WORLD_SIZE (set by torchrun) is read as announced() reads it; only advice uses it
        return cls(dist.get_rank(), dist.get_world_size(), check, local_world_size=cls.announced().local_world_size)

    @classmethod
    def announced(cls) -> Distributed:
        """What torchrun's environment says this process is (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``),
        without joining the process group: for advice printed before it forms (a Ctrl-C while it waits).

        >>> Distributed.announced().launcher if "WORLD_SIZE" not in os.environ else "admmcompress"
        'admmcompress'
        """
        def number(name: str, default: int) -> int:
            text = os.environ.get(name, "")
            return int(text) if text.isdigit() else default

        return cls(number("RANK", 0), max(1, number("WORLD_SIZE", 1)), local_world_size=number("LOCAL_WORLD_SIZE", 0))

    def close(self) -> None:
        """Leave the process group. Garbage goes first: what collectives left in reference cycles (work objects,
        tensors Python still points to) is freed now, while the interpreter is whole, not later by gloo's threads."""
        if self.active and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

    # --- rank 0 decides, the others follow ---------------------------------------------------------
    def proceed(self, value: Any = None) -> Any:
        """Rank 0 passed the checks that need no model and sends ``value`` (start or resume): every rank builds
        its Runner now, at the same point, so the collectives inside (an IterableDataset's agreed length) meet.
        Rank 0 can still :meth:`abort` (a refusal of preflight) until it calls :meth:`share`."""
        return self._broadcast(value)

    def share(self, value: Any = None, error: BaseException | None = None) -> Any:
        """Rank 0's ``value`` (or its ``error``, raised as :class:`FollowerError`) on every rank."""
        self.shared = True
        return self._broadcast(value, error)

    def _broadcast(self, value: Any = None, error: BaseException | None = None) -> Any:
        if not self.active:
            return value
        box = [("error", str(error)) if error is not None else ("ok", value)] if self.is_main else [None]
        dist.broadcast_object_list(box, src=0)
        kind, payload = box[0]
        if kind == "error" and not self.is_main:
            raise FollowerError(payload)
        return payload

    def abort(self, error: BaseException) -> None:
        """On rank 0, before it shared its decision: send ``error`` so the other ranks stop instead of waiting."""
        if self.active and self.is_main and not self.shared:
            try:
                self.share(error=error)
            except Exception:  # the others stopped on the same check and left: rank 0's own line is what to show
                pass

    # --- reductions -------------------------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so integer counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def least(self, value: int) -> int:
        """The smallest ``value`` over ranks (one small all-reduce): e.g. the batch count every rank can run."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is True on every rank (one small all-reduce): ranks stop together."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.world_size for v in self.sum(values)] if self.active else list(values)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, so all ranks evaluate the same model."""
        if not self.active:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (the same shape and dtype on every rank), in rank order, on every rank: a
        tensor collective, so nothing is pickled."""
        if not self.active:
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor)
        return gathered

    @torch.no_grad()
    def merge_batchnorm(self, model: nn.Module) -> None:
        """BatchNorm running statistics estimated on each rank's own data (``update_bn``), merged over ranks.

        Each rank's cumulative statistics are the mean over its batches (``num_batches_tracked`` of them); the
        merged ones are the mean over every rank's batches, the same on every rank: an estimate on all the data.
        """
        if not self.active:
            return
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
                continue
            batches = module.num_batches_tracked.to(torch.float64)
            sums = torch.cat([module.running_mean.to(torch.float64).flatten() * batches,
                              module.running_var.to(torch.float64).flatten() * batches, batches.view(1)])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            total, channels = sums[-1], module.running_mean.numel()
            if total > 0:
                module.running_mean.copy_((sums[:channels] / total).view_as(module.running_mean))
                module.running_var.copy_((sums[channels:2 * channels] / total).view_as(module.running_var))
            module.num_batches_tracked.fill_(int(total))

    def differing(self, named: Mapping[str, Any]) -> list[str]:
        """Names whose values differ from rank 0's on some rank (the same list on every rank)."""
        if not self.active:
            return []
        digests = {name: _digest(value) for name, value in sorted(named.items())}
        gathered: list[dict[str, str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, digests)
        return sorted({k for other in gathered[1:] for k in set(gathered[0]) | set(other)
                       if gathered[0].get(k) != other.get(k)})

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def assert_same(self, named: Mapping[str, Any], what: str) -> None:
        """Raise :class:`RankMismatch` unless every rank holds the same values under the same names.

        Values are tensors, numbers or nested containers of them; each rank sends one SHA-256 per name.
        """
        if not self.active:
            return
        digests = {name: _digest(value) for name, value in sorted(named.items())}
        gathered: list[dict[str, str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, digests)
        reference = gathered[0]
        for rank, other in enumerate(gathered[1:], start=1):
            differing = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            if differing:
                raise RankMismatch(
                    f"{what}: rank {rank} differs from rank 0 in {differing[:5]} ({len(differing)} entries); "
                    "a driver must compute its state from the synchronized weights only (no per-rank data or RNG)"
                )


def _digest(value: Any) -> str:
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if v.numel() else b"")
        elif isinstance(v, Mapping):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` of ``n`` items that ``rank`` owns (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# Why a rank's share of a batch needs 2 samples, when the model's BatchNorm layers could not be traced (min_share)
BATCHNORM_NEEDS_TWO = ("the model's BatchNorm cannot normalize a single sample in training (it normalizes over each "
                       "process's share of the batch)")


def batchnorm_needs_two(layer: str) -> str:
    """Why a rank's share needs 2 samples: BatchNorm ``layer`` sees one value per channel from each sample."""
    return (f"BatchNorm layer '{layer}' sees one value per channel from each sample (an (N, C) input or a 1x1 map), "
            "which it cannot normalize over a single sample in training")


def _at_most(processes: int) -> str:
    return f"at most {processes} processes" if processes >= 2 else "one process (without torchrun)"


def check_batch(batch_size: int, ctx: Distributed, min_rows: int = 1, why: str = BATCHNORM_NEEDS_TWO) -> None:
    """Refuse, in one line naming the sizes and the fix, a global ``batch_size`` whose split over the processes
    gives some rank fewer than ``min_rows`` samples at every step (``min_rows=2``: the model has BatchNorm that
    needs two, ``why`` says which): torch would stop at the first step, or a rank would train on nothing."""
    world = ctx.world_size
    if batch_size < world:
        raise ValueError(
            f"data.batch_size={batch_size} is smaller than the {world} processes: it is the global batch, "
            f"split over them, so some would get no samples; give data.batch_size >= {world} (a "
            f"multiple of {world} splits evenly) or run fewer processes (at most {batch_size})"
        )
    if world == 1 and batch_size < min_rows:  # one process: its batch is the whole batch
        raise ValueError(f"data.batch_size={batch_size} gives a single sample per step, and {why}; give "
                         f"data.batch_size >= {min_rows}")
    if batch_size // world < min_rows:  # the smallest share is batch_size // world
        raise ValueError(
            f"data.batch_size={batch_size} split over the {world} processes gives some of them a single sample at "
            f"every step, and {why} (torch would stop at the first step: 'Expected more than 1 value per channel "
            f"when training'); give data.batch_size >= {world * min_rows} or run {_at_most(batch_size // min_rows)}"
        )


class ShardedLoader:
    """This rank's share of each global batch of a :class:`BatchLoader` (same order for any world size).

    Every rank iterates the full loader (same permutation, same augmentation draws) and keeps its contiguous
    slice, so the union of the ranks' batches is exactly the one-process batch. ``weight(batch)`` is the factor
    that turns the rank's mean loss into its share of the global mean (``rows * world_size / global rows``;
    DDP averages gradients over ranks). A global batch smaller than the world size would leave a rank without
    data: ``batch_size`` below it is refused (:func:`check_batch`), and so is a training set below it (no step
    would train); a last batch below it is skipped, with a warning. ``min_rows=2`` (a model with BatchNorm that
    cannot normalize a single sample in training; ``why`` says which layer) asks the same of every rank's share
    with 2 samples instead of 1.

    >>> import torch
    >>> data = Split(torch.arange(6.0).view(6, 1), torch.arange(6))
    >>> [y.tolist() for _, y in ShardedLoader(BatchLoader(data, 4, shuffle=False), Distributed(1, 2))]
    [[2, 3], [5]]
    """

    def __init__(self, inner: BatchLoader, ctx: Distributed, min_rows: int = 1, why: str = BATCHNORM_NEEDS_TWO):
        self.inner, self.ctx = inner, ctx
        self.data = inner.data
        n, size, world = len(inner.data), inner.batch_size, ctx.world_size
        check_batch(size, ctx, min_rows, why)
        if n < min_rows and world == 1:  # one process (a BatchNorm that needs two samples)
            raise ValueError(f"the training set holds {n} sample, and {why}, so no step would train; give at least "
                             f"{min_rows} training samples")
        if n < world * min_rows:  # then n <= size: the only batch is the last, which is skipped
            each = "a sample" if min_rows == 1 else f"{min_rows} samples"
            because = "" if min_rows == 1 else f" ({why})"
            raise ValueError(
                f"the training set holds {n} sample(s), too few to give each of the {world} processes {each}"
                f"{because}, so no step would train; give at least {world * min_rows} training samples or run "
                f"{_at_most(n // min_rows)}"
            )
        last = n - (len(inner) - 1) * size
        self._skip_last = last < world * min_rows  # the smallest share is last // world_size
        self._weight = 1.0
        if self._skip_last and ctx.is_main and world == 1:  # one process with BatchNorm that needs two samples
            warnings.warn(
                f"the last batch of each epoch holds a single sample, and {why}: it is skipped; make the training "
                "set size a multiple of batch_size (or leave one more sample in the last batch)",
                RuntimeWarning,
                stacklevel=2,
            )
        elif self._skip_last and ctx.is_main:
            reason = (f"fewer than the {world} processes" if last < world else
                      f"so one of the {world} processes would get a single sample, which BatchNorm cannot "
                      "normalize in training")
            warnings.warn(
                f"the last batch of each epoch holds {last} sample(s), {reason}: "
                "it is skipped (one process trains on it); make the training set size a multiple of batch_size",
                RuntimeWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.inner) - int(self._skip_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        steps = len(self)
        for i, (x, y) in enumerate(self.inner):
            if i >= steps:
                continue  # drawn (so the generator advances as in one process) but not trained on
            start, stop = shard(len(y), self.ctx.rank, self.ctx.world_size)
            self._weight = (stop - start) * self.ctx.world_size / len(y)
            yield x[start:stop], y[start:stop]

    def weight(self, batch: Any) -> float:
        """The loss factor of the batch just yielded (1.0 when the global batch splits evenly)."""
        return self._weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


def wrap(model: nn.Module, ctx: Distributed) -> nn.Module:
    """``model`` in DistributedDataParallel when the run has several processes (the model itself otherwise).

    Wrapped anew at each phase: a driver's module transform or a mask set can change the parameters.
    """
    if not ctx.active:
        return model
    return nn.parallel.DistributedDataParallel(model)


def min_share(model: nn.Module) -> int:
    """The fewest samples each rank's share of a batch may hold for ``model`` to train, by the conservative rule:
    2 with BatchNorm (which normalizes over the share's samples in training, and cannot over one), 1 otherwise.
    SyncBatchNorm normalizes over the global batch, so it needs no more than one sample per rank. Only BatchNorm
    that sees one value per channel from each sample needs 2 (:func:`batchnorm_inputs` tells which layers do)."""
    return 2 if plain_batchnorm(model) else 1


def plain_batchnorm(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model``'s BatchNorm layers that normalize over this rank's share alone (not SyncBatchNorm), by name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]


@contextlib.contextmanager
def batchnorm_inputs(model: nn.Module) -> Iterator[dict[str, int]]:
    """While open: for each plain BatchNorm layer of ``model`` that a forward calls, the fewest values per channel
    one sample gave it (the product of its input's sizes after the channel dimension: 1 for an ``(N, C)`` input
    or a 1x1 map). Such a layer fails in training on a single sample (torch counts batch x those values); one
    that sees more (a conv's HxW > 1 map) trains on one sample per rank.

    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3))
    >>> with batchnorm_inputs(net) as seen:
    ...     _ = net.eval()(torch.zeros(2, 1, 4, 4))
    >>> seen
    {'1': 4, '4': 1}
    """
    seen: dict[str, int] = {}

    def recorder(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                values = math.prod(x.shape[2:])
                seen[name] = min(values, seen.get(name, values))
        return record

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in plain_batchnorm(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def sync_batchnorm(model: nn.Module, ctx: Distributed) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm (global batch statistics); refused where torch has no kernel for it."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not ctx.active or not has_bn:
        return model
    device = next(model.parameters()).device
    if device.type == "cpu":
        raise ValueError(
            "distributed.sync_batchnorm: torch's SyncBatchNorm runs on CUDA devices only and this run trains on "
            "the CPU; set sync_batchnorm: false (each process then normalizes over its share of the batch)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@torch.no_grad()
def correct_count(model: nn.Module, data: Split | Dataset, batch_size: int, ctx: Distributed) -> tuple[int, int]:
    """Correct top-1 predictions and samples over this rank's contiguous shard of ``data``.

    An ``IterableDataset`` is read whole on each rank: it must yield this rank's own share under torchrun.
    """
    if isinstance(data, Split):
        start, stop = shard(len(data), ctx.rank, ctx.world_size)
        batches = ((data.x[lo:min(lo + batch_size, stop)], data.y[lo:min(lo + batch_size, stop)])
                   for lo in range(start, stop, batch_size))
    elif isinstance(data, IterableDataset):
        batches = DataLoader(data, batch_size=batch_size)
    else:
        batches = DataLoader(Subset(data, range(*shard(len(data), ctx.rank, ctx.world_size))), batch_size=batch_size)
    correct = count = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        count += len(y)
    return correct, count


def evaluate(model: nn.Module, data: Split | Dataset, batch_size: int, ctx: Distributed) -> float:
    """Top-1 accuracy in percent over the whole test set, each sample counted once across ranks."""
    ctx.broadcast_buffers(model)
    was_training = model.training
    model.eval()
    correct, count = correct_count(model, data, batch_size, ctx)
    model.train(was_training)
    correct, count = ctx.sum([float(correct), float(count)])
    return 100.0 * int(correct) / max(1, int(count))


__all__ = [
    "BATCHNORM_NEEDS_TWO", "CHECK_ENV", "Distributed", "FollowerError", "RankMismatch", "ShardedLoader",
    "batchnorm_inputs", "batchnorm_needs_two", "check_batch", "correct_count", "evaluate", "min_share",
    "plain_batchnorm", "shard", "sync_batchnorm", "wrap",
]

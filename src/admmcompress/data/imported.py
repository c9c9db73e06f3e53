"""Datasets of your own by import path: any ``torch.utils.data.Dataset`` or ``IterableDataset``.

A run config names a class or factory and its arguments instead of a bundled dataset::

    data:
      dataset: {import: "mypackage.data:ShardedImages", args: {root: /data/images}}
      batch_size: 256

The train split is ``ShardedImages(root=..., split="train")`` and the test split the same with
``split="test"``; ``train_args`` / ``test_args`` replace those split arguments (e.g. ``{train: true}`` and
``{train: false}`` for torchvision's datasets). Items are ``(input, label)`` pairs. Data are read batch by batch
through a ``DataLoader`` (nothing is loaded whole), so a dataset may be larger than memory; an
``IterableDataset`` must have ``__len__`` (samples per epoch: the schedules count steps) and, under torchrun,
must yield its own share on each rank.

>>> spec = DatasetSpec.from_config({"import": "torch.utils.data:TensorDataset", "args": {}})
>>> spec.target, spec.split_args("test")
('torch.utils.data:TensorDataset', {'split': 'test'})
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from admmcompress.data.datasets import load_dataset
from admmcompress.data.files import Split
from admmcompress.messages import first_line

_END = object()  # an exhausted iterator's marker (a batch may be any object, None included)

KEYS = ("import", "args", "train_args", "test_args")


@dataclass(frozen=True)
class DatasetSpec:
    """``data.dataset`` given as ``{import: "package.module:Name", args: {...}, train_args:, test_args:}``."""

    target: str
    args: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] | None = None
    test_args: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, spec: dict[str, Any]) -> DatasetSpec:
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise ValueError(f"data.dataset: unknown key(s) {unknown}; allowed: {list(KEYS)}")
        target = spec.get("import")
        if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
            raise ValueError(
                f"data.dataset.import={target!r} must be 'package.module:ClassOrFactory', "
                "e.g. 'torchvision.datasets:MNIST'"
            )
        for key in ("args", "train_args", "test_args"):
            if spec.get(key) is not None and not isinstance(spec[key], dict):
                raise ValueError(f"data.dataset.{key}={spec[key]!r} must be a mapping of keyword arguments")
        return cls(target, dict(spec.get("args") or {}), spec.get("train_args"), spec.get("test_args"))

    def split_args(self, split: str) -> dict[str, Any]:
        given = self.train_args if split == "train" else self.test_args
        return dict(given) if given is not None else {"split": split}

    def build(self, split: str) -> Dataset:
        module_name, _, name = self.target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"data.dataset.import={self.target!r} cannot be imported ({err}); install the package or fix the path"
            ) from None
        split_args = self.split_args(split)
        try:
            dataset = factory(**self.args, **split_args)
        except TypeError as err:  # most often a dataset without a `split=` keyword (TensorDataset, torchvision's)
            given = self.train_args if split == "train" else self.test_args
            fix = ("give train_args/test_args (e.g. {train: true} / {train: false}) or make it accept split="
                   if given is None else "fix args / train_args / test_args to match its signature")
            raise ValueError(
                f"data.dataset.import={self.target!r} cannot be called with {_keywords(self.args, split_args)} for "
                f"the {split} split ({first_line(err)}); {fix}"
            ) from None
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"data.dataset.import={self.target!r} returned a {type(dataset).__name__}, not a "
                "torch.utils.data.Dataset; return a Dataset (or an IterableDataset with __len__)"
            )
        if isinstance(dataset, IterableDataset) and not hasattr(dataset, "__len__"):
            raise ValueError(
                f"data.dataset: the IterableDataset of {self.target!r} has no __len__; give it one (samples per "
                "epoch): the learning-rate and ADMM schedules count steps"
            )
        return dataset


def _keywords(*mappings: dict[str, Any]) -> str:
    """The keyword names a factory was called with (values can be long): ``root=, split=``."""
    names = [str(k) for m in mappings for k in m]
    return ", ".join(f"{k}=" for k in names) if names else "no arguments"


def load_data(dataset: str | dict[str, Any], split: str, data_dir: str | Path | None = None,
              limit: int | None = None) -> Split | Dataset:
    """A bundled dataset (an in-memory :class:`Split`) by name, or a dataset of your own by import path.

    ``limit`` keeps the first ``limit`` samples of a map-style dataset (an IterableDataset is used whole).
    """
    if isinstance(dataset, str):
        return load_dataset(dataset, split, data_dir, limit)
    built = DatasetSpec.from_config(dataset).build(split)
    if limit is not None and not isinstance(built, IterableDataset) and limit < len(built):
        built = Subset(built, range(limit))
    return built


def describe(dataset: str | dict[str, Any]) -> str:
    """The dataset's name or import path, for reports."""
    return dataset if isinstance(dataset, str) else str(dataset.get("import"))


def check_dataset(data: Any, name: str) -> None:
    """Refuse, in one line naming the fix, what is neither a :class:`Split` nor a torch ``Dataset`` (the loop
    batches the data itself, by the run's batch size and seed, so a ``DataLoader`` is one step too far).

    >>> check_dataset((torch.zeros(4, 2), torch.zeros(4)), "train")
    Traceback (most recent call last):
    ...
    TypeError: train is a tuple, not a dataset: wrap the tensors, e.g. torch.utils.data.TensorDataset(x, y)
    """
    if isinstance(data, (Split, Dataset)):
        return
    if isinstance(data, DataLoader):
        raise TypeError(f"{name} is a DataLoader; pass its dataset ({name}_loader.dataset): batches are drawn by the "
                        "run's own batch size and seed (compress(batch_size=...) or data.batch_size)")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(f"{name} is a {type(data).__name__}, not a dataset: wrap the tensors, e.g. "
                        "torch.utils.data.TensorDataset(x, y)")
    raise TypeError(f"{name} is a {type(data).__name__}, not a dataset: give a torch Dataset (e.g. "
                    "TensorDataset(x, y)) or admmcompress.data.load_dataset(name, split)")


def first_inputs(dataset: Split | Dataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs as a batch (traces and compaction checks need an example input)."""
    if isinstance(dataset, Split):
        return dataset.x[:n]
    batch = next(iter(DataLoader(dataset, batch_size=n)))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def batch_rows(batch: Any) -> int | None:
    """Samples in a batch: the first dimension of its inputs (the batch itself, or its first element); None when
    the batch is not a tensor or a sequence starting with one.

    >>> batch_rows((torch.zeros(3, 2), torch.zeros(3))), batch_rows({"x": 1})
    (3, None)
    """
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _drop_short_last(samples: int, per_step: int, world_size: int, min_rows: int, why: str, rank: int) -> bool:
    """Whether each rank's last batch must be dropped (``DistributedSampler`` pads the ranks' shares to one length,
    so all drop it alike) because it would hold fewer than ``min_rows`` samples (``why``: a BatchNorm layer that
    cannot normalize a single one); a share too small for any step is refused in one line."""
    share = -(-samples // world_size)  # the sampler's per-rank count, padded
    if share < min_rows and world_size == 1:
        raise ValueError(f"the training set holds {samples} sample(s), and {why}, so no step would train; give at "
                         f"least {min_rows} training samples")
    if share < min_rows:
        raise ValueError(
            f"the training set holds {samples} sample(s), too few to give each of the {world_size} processes "
            f"{min_rows} ({why}), so no step would train; give at least {world_size * min_rows} training samples or "
            "run fewer processes"
        )
    last = share % per_step
    if 0 < last < min_rows:
        if rank == 0:
            warnings.warn(
                f"the last batch of each epoch leaves each process {last} sample(s) and {why}: it is skipped; make "
                "the training set size a multiple of batch_size", RuntimeWarning, stacklevel=3)
        return True
    return False


class DatasetLoader:
    """Batches of a torch ``Dataset`` in a seeded order that is a function of (seed, epoch): resumable.

    With several processes, ``torch.utils.data.DistributedSampler`` (same seed on every rank) gives each rank
    ``batch_size // world_size`` samples per step; an ``IterableDataset`` shards itself. Its shares may come out
    uneven (a rank that runs out while another still trains would leave that one waiting in the gradient
    all-reduce for good), so with ``all_ranks`` (``Distributed.all_true``) the ranks agree before every batch
    that each still has one, and all stop at the shortest share, with a warning on the ranks that had more.
    With ``least`` (``Distributed.least``) they also agree on the length the schedules count (the smallest
    ``len()``), so learning rates and driver updates fall on the same steps on every rank.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, all_ranks: Callable[[bool], bool] | None = None,
                 least: Callable[[int], int] | None = None, min_rows: int = 1, why: str = ""):
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} is not a multiple of the {world_size} processes; the global batch "
                f"is split evenly over them: choose e.g. {batch_size - batch_size % world_size or world_size}"
            )
        self.dataset, self.epoch = dataset, 0
        # one tiny all-reduce per batch, for the only kind of data whose per-rank counts are not known ahead
        self.all_ranks = all_ranks if isinstance(dataset, IterableDataset) and world_size > 1 else None
        self.batch_size, self.seed = batch_size // world_size, seed
        self.sampler = None
        if not isinstance(dataset, IterableDataset):
            if world_size > 1:
                self.sampler = torch.utils.data.DistributedSampler(
                    dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
                )
                extra = -len(dataset) % world_size
                if extra and rank == 0:  # the sampler pads the ranks' shares to one length by repeating samples
                    warnings.warn(
                        f"the training set's {len(dataset)} samples do not split evenly over {world_size} processes: "
                        f"{extra} sample(s) are trained on twice per epoch (torch's DistributedSampler pads the "
                        f"shares); make the size a multiple of {world_size} to train each once",
                        RuntimeWarning, stacklevel=2)
            else:
                self.sampler = _EpochSampler(len(dataset), seed)
        drop_last = False
        if min_rows > 1 and not isinstance(dataset, IterableDataset):  # one process too: torch would stop there
            drop_last = _drop_short_last(len(dataset), self.batch_size, world_size, min_rows, why, rank)
        # an IterableDataset's last batch is only known when it comes: one too short for BatchNorm ends the epoch
        self.min_rows = min_rows if isinstance(dataset, IterableDataset) else 1
        self.why, self._told = why, False
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=drop_last)
        self.length = len(self.loader)
        if self.all_ranks is not None and least is not None:
            self.length = least(self.length)
            if self.length < len(self.loader):
                warnings.warn(
                    f"the IterableDataset's share on this rank has {len(self.loader)} batches and another rank's "
                    f"{self.length}: every rank counts {self.length} per epoch; give each rank the same number of "
                    "samples (e.g. drop the remainder)", RuntimeWarning, stacklevel=2)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        if self.all_ranks is None:
            for batch in self.loader:
                if self._short(batch):
                    return
                yield batch
            return
        batches, step = iter(self.loader), 0
        while True:
            batch = next(batches, _END)
            if not self.all_ranks(batch is not _END and not self._short(batch)):  # every rank stops at a short one
                if batch is not _END:
                    warnings.warn(
                        f"the IterableDataset's share on this rank has more batches than another rank's (which ended "
                        f"after {step}): every rank stops there and this epoch skips the rest; give each rank the "
                        "same number of samples (e.g. drop the remainder)", RuntimeWarning, stacklevel=2)
                return
            step += 1
            yield batch

    def _short(self, batch: Any) -> bool:
        """Whether ``batch`` holds fewer rows than BatchNorm needs (told once; the epoch ends there)."""
        if self.min_rows <= 1 or batch is _END:
            return False
        rows = batch_rows(batch)
        if rows is None or rows >= self.min_rows:
            return False
        if not self._told:
            self._told = True
            warnings.warn(f"the IterableDataset's last batch holds {rows} sample(s) and {self.why}: the epoch ends "
                          "before it; give each process a multiple of the batch size", RuntimeWarning, stacklevel=3)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


class _EpochSampler(torch.utils.data.Sampler[int]):
    """One process's shuffle: a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


__all__ = [
    "DatasetLoader", "DatasetSpec", "batch_rows", "describe", "first_inputs", "load_data"]

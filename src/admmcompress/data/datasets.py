"""Local dataset loaders (no downloads): MNIST, Fashion-MNIST and CIFAR-10 from ``.npz`` files.

Where the files are looked for: :mod:`admmcompress.data.files`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from admmcompress.data.augment import Augment
from admmcompress.data.files import (
    ENV_VAR,
    FILES,
    REPO_ROOT,
    DataFileError,
    Split,
    check_arrays,
    find_dataset,
    read_npz,
    search_dirs,
)

# Per-channel mean/std used to normalise inputs (MNIST constants are the canonical ones).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None, limit: int | None = None
) -> Split:
    """Load ``split`` ("train" or "test") of a local dataset, normalised, optionally the first ``limit``.

    The returned ``Split.source`` is the file read. A damaged file raises :class:`DataFileError` naming it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in ("fsdd", "ptb"):  # sequence data: their own loaders
        if name == "ptb":
            raise ValueError("ptb is a language-model corpus, not a labelled split; use data.ptb.load_ptb")
        from admmcompress.data.fsdd import load_fsdd

        split_data = load_fsdd(split, data_dir, limit)
        _note_limit_above_size(name, split, limit, len(split_data.y))
        return split_data
    path = find_dataset(name, data_dir)
    if name == "cifar10":
        arrays = read_npz(path, [f"x_{split}_jpeg", f"{split}_offsets", f"y_{split}"], name)
        buffer, offsets, labels = arrays[f"x_{split}_jpeg"], arrays[f"{split}_offsets"], arrays[f"y_{split}"]
        check_arrays(path, name, buffer.ndim == offsets.ndim == labels.ndim == 1 and len(offsets) == len(labels) + 1
                     and offsets.dtype.kind in "iu" and buffer.dtype == np.uint8,
                     f"a uint8 JPEG byte buffer with integer {split} offsets (one more than labels)")
        _warn_if_few_classes(name, split, labels, limit)
        _note_limit_above_size(name, split, limit, len(labels))
        images = _decode_jpegs(buffer, offsets, limit, path)
        labels = labels[: len(images)]
    else:
        arrays = read_npz(path, [f"x_{split}", f"y_{split}"], name)
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        # uint8 pixels are divided by 255 below: float images (already in [0, 1]) would be squeezed to ~0
        check_arrays(path, name, images.ndim == 3 and labels.ndim == 1 and len(images) == len(labels)
                     and images.dtype == np.uint8 and labels.dtype.kind in "iu",
                     f"{split} images (N, H, W) of uint8 pixels with N integer labels")
        _warn_if_few_classes(name, split, labels, limit)
        _note_limit_above_size(name, split, limit, len(labels))
        images, labels = images[:limit, None], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    mean, std = NORMALIZATION[name]
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)), path)


def _note_limit_above_size(name: str, split: str, limit: int | None, size: int) -> None:
    """A limit above the split's size is not an error (the whole split is used), but it is said, so a typo such
    as 600000 for 60000, or a limit meant for another dataset, is seen."""
    if limit is not None and limit > size:
        warnings.warn(
            f"{name} {split}: the limit {limit} is more than its {size} samples; all {size} are used",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_if_few_classes(name: str, split: str, labels: np.ndarray, limit: int | None) -> None:
    """The CIFAR-10 test split is stored sorted by class: its first 1,000 images are all class 0. A ``limit``
    that keeps a fraction of the classes measures nothing; say so (the caller's data stay as asked)."""
    if limit is None or limit >= len(labels):
        return
    kept, every = np.unique(labels[:limit]), np.unique(labels)
    grouped = len(labels) > len(every) and bool(np.all(np.diff(labels) >= 0))  # the file is sorted by class
    if grouped and len(kept) < len(every):
        warnings.warn(
            f"{name} {split}: the first {limit} samples hold only classes {kept.tolist()} of {len(every)} (the file "
            "is sorted by class); take a seeded random subset instead of a limit, or use the whole split",
            RuntimeWarning,
            stacklevel=3,
        )


def _decode_jpegs(buffer: np.ndarray, offsets: np.ndarray, limit: int | None, path: Path | None = None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("CIFAR-10 is stored as JPEG; install Pillow (pip install pillow)") from err
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    images = []
    try:
        for i in range(n):
            images.append(
                np.asarray(Image.open(io.BytesIO(buffer[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
            )
            if images[-1].shape != images[0].shape:  # a stack of mixed sizes fails without naming the image
                raise DataFileError(
                    f"dataset file '{path}': image {i} is {images[-1].shape[0]}x{images[-1].shape[1]}, not "
                    f"{images[0].shape[0]}x{images[0].shape[1]} as image 0; replace it with a good copy of "
                    f"{FILES['cifar10']}"
                )
        return np.stack(images).transpose(0, 3, 1, 2)
    except DataFileError:
        raise
    except (OSError, ValueError) as err:  # a damaged JPEG (PIL's UnidentifiedImageError is an OSError)
        raise DataFileError(
            f"dataset file '{path}': image {len(images)} cannot be decoded ({err}); "
            f"replace it with a good copy of {FILES['cifar10']}"
        ) from None


class BatchLoader:
    """Mini-batches over in-memory tensors with a seeded, checkpointable shuffle.

    The generator state is part of ``state_dict()`` so a resumed run sees the same batches;
    ``augment`` (random shifts/flips) draws from the same generator, so augmented runs resume exactly too.
    """

    def __init__(
        self, data: Split, batch_size: int, shuffle: bool = True, seed: int = 0, augment: Augment | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.data) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.data.x[idx]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield x, self.data.y[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


__all__ = [
    "Augment", "ENV_VAR", "FILES", "NORMALIZATION", "REPO_ROOT", "BatchLoader", "DataFileError", "Split",
    "find_dataset", "load_dataset", "search_dirs",
]

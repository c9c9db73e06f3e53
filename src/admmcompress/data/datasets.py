"""Local dataset loaders (no downloads): MNIST, Fashion-MNIST and CIFAR-10 from ``.npz`` files.

Where files are looked for, in order:
1. the ``data_dir`` argument;
2. the ``ADMMCOMPRESS_DATA`` environment variable;
3. the repository's own ``data/`` folder (MNIST is bundled there);
4. ``../shared/data`` next to the repository.
A missing file raises ``FileNotFoundError`` naming every place searched and how to fix it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_VAR = "ADMMCOMPRESS_DATA"

FILES = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz", "cifar10": "cifar10_jpeg.npz"}
FILES.update({"fsdd": "fsdd.npz", "ptb": "ptb.npz"})  # speech digits (data/fsdd.py), PTB text (data/ptb.py)
# Per-channel mean/std used to normalise inputs (MNIST constants are the canonical ones).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs += [REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]
    return dirs


def find_dataset(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of a dataset file, or a FileNotFoundError that says where to put it."""
    if name not in FILES:
        raise ValueError(f"unknown dataset '{name}'; available: {', '.join(sorted(FILES))}")
    dirs = search_dirs(data_dir)
    for d in dirs:
        if (d / FILES[name]).is_file():
            return d / FILES[name]
    searched = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"dataset '{name}' ({FILES[name]}) not found; searched:\n  {searched}\n"
        f"Put {FILES[name]} in one of these folders, pass data_dir=..., or set {ENV_VAR}=/path/to/folder"
    )


@dataclass
class Split:
    """Normalised inputs (N, C, H, W float32) and integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None, limit: int | None = None
) -> Split:
    """Load ``split`` ("train" or "test") of a local dataset, normalised, optionally the first ``limit``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in ("fsdd", "ptb"):  # sequence data: their own loaders (imported here: they import this module)
        if name == "ptb":
            raise ValueError("ptb is a language-model corpus, not a labelled split; use data.ptb.load_ptb")
        from admmcompress.data.fsdd import load_fsdd

        return load_fsdd(split, data_dir, limit)
    path = find_dataset(name, data_dir)
    with np.load(path, allow_pickle=False) as archive:
        if name == "cifar10":
            images = _decode_jpegs(archive[f"x_{split}_jpeg"], archive[f"{split}_offsets"], limit)
            labels = archive[f"y_{split}"][: len(images)]
        else:
            images = archive[f"x_{split}"][:limit, None]
            labels = archive[f"y_{split}"][:limit]
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    mean, std = NORMALIZATION[name]
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


def _decode_jpegs(buffer: np.ndarray, offsets: np.ndarray, limit: int | None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("CIFAR-10 is stored as JPEG; install Pillow (pip install pillow)") from err
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    images = [
        np.asarray(Image.open(io.BytesIO(buffer[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
        for i in range(n)
    ]
    return np.stack(images).transpose(0, 3, 1, 2)


class BatchLoader:
    """Mini-batches over in-memory tensors with a seeded, checkpointable shuffle.

    The generator state is part of ``state_dict()`` so a resumed run sees the same batches.
    """

    def __init__(self, data: Split, batch_size: int, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.data) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.data.x[idx], self.data.y[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

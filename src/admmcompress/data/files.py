"""Where dataset files are found (no downloads), and the labelled split every loader returns.

Where files are looked for, in order:
1. the ``data_dir`` argument;
2. the ``ADMMCOMPRESS_DATA`` environment variable;
3. the repository's own ``data/`` folder (MNIST is bundled there);
4. ``../shared/data`` next to the repository.
A missing file raises ``FileNotFoundError`` naming every place searched and how to fix it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_VAR = "ADMMCOMPRESS_DATA"

FILES = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz", "cifar10": "cifar10_jpeg.npz"}
FILES.update({"fsdd": "fsdd.npz", "ptb": "ptb.npz"})  # speech digits (data/fsdd.py), PTB text (data/ptb.py)

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

"""Datasets of the kind a config names by import path (tests/train/test_imported_dataset.py)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, IterableDataset

from admmcompress.data.datasets import load_dataset


class MnistItems(Dataset):
    """The bundled MNIST split, served item by item as a map-style Dataset."""

    def __init__(self, split: str, limit: int | None = None):
        self.data = load_dataset("mnist", split, limit=limit)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x[i], self.data.y[i]


class Endless(IterableDataset):
    """An IterableDataset without __len__ (refused: the schedules count steps)."""

    def __init__(self, split: str):
        self.split = split

    def __iter__(self):
        while True:
            yield torch.zeros(1, 28, 28), torch.tensor(0)


def not_a_dataset(split: str) -> list[int]:
    return [1, 2, 3]

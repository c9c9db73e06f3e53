"""Shared by this folder's scripts: a block-pruned Linear, its packed kernel arguments, and paired timing."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from admmcompress.executors import blocksparse_cpp as bc
from admmcompress.executors.blocksparse import convert_module
from admmcompress.structures import Block


def pruned_pair(inp: int, out: int, compression: float) -> tuple[nn.Linear, nn.Linear, tuple]:
    """Dense Linear, the same pruned to ``Block(compression, (16, 64))``, and the pruned one's kernel arguments."""
    torch.manual_seed(0)
    dense = nn.Linear(inp, out).eval()
    masked = nn.Linear(inp, out).eval()
    with torch.no_grad():
        masked.weight.copy_(Block(compression=compression, block=(16, 64), gates=1).project(dense.weight))
        masked.bias.copy_(dense.bias)
    args = bc.packed(convert_module(masked, 16, impl="cpp", kernel="cpp", min_sparsity=0.0).matrix)
    return dense, masked, args


def timed(calls: dict[str, Callable[[], object]], rounds: int, rng: random.Random) -> dict[str, list[float]]:
    """Seconds per call: 5 warm-up rounds, then ``rounds`` rounds each calling every contender in a new order."""
    samples: dict[str, list[float]] = {n: [] for n in calls}
    with torch.inference_mode():
        for _ in range(5):
            for call in calls.values():
                call()
        for _ in range(rounds):
            for name in rng.sample(list(calls), len(calls)):
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
    return samples


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time over b's in the same round (the VM's slow and fast windows cancel)."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

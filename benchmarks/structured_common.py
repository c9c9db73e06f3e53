"""Helpers shared by the structured-pruning benchmarks: malloc settings, interleaved timing, MACs.

The conventions are those of ``../shared/BENCHMARKING.md``: glibc malloc thresholds set before the
interpreter starts (``ensure_malloc_env`` re-executes the script with them), 2 threads, eval mode,
``torch.inference_mode()``, warm-up, then contenders timed round-robin and the median taken per
contender.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from admmcompress.executors.compact_run import count_macs

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def ensure_malloc_env() -> None:
    """Re-run this script with the malloc thresholds if they are not set (they must precede startup)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def command_line() -> str:
    env = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    return f"{env} python {' '.join(sys.argv)}"


def machine() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line]
        model = names[0] if names else "?"
        flags = "AVX-512" if "avx512f" in info else ("AVX2" if "avx2" in info else "")
    except OSError:
        model = platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} vCPU {model} ({flags}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load:.1f} at start"
    )


@torch.inference_mode()
def interleaved_ms(
    contenders: dict[str, Callable[[], object]], rounds: int = 25, warmup: int = 5
) -> dict[str, float]:
    """Median milliseconds per contender, timed round-robin (one call each per round)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of Conv/Linear layers (and column executors) for one sample of ``x``'s shape."""
    return count_macs(model, x[:1])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def augment_cifar(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 32x32 crop of the 4-pixel zero-padded image (standard CIFAR)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2,), generator=generator).tolist()  # one offset per batch: cheap
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def train_epochs(
    model: nn.Module,
    data,
    epochs: int,
    lr: float,
    *,
    optimizer: str = "adam",
    batch_size: int = 64,
    weight_decay: float = 0.0,
    penalty: Callable[[], torch.Tensor] | None = None,
    every: int | None = None,
    on_every: Callable[[], object] | None = None,
    masks=None,
    augment: bool = False,
    schedule: str = "cosine",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> None:
    """A plain loop: fresh optimizer, cosine (or constant) LR over all steps, optional penalty and masks.

    ``on_every()`` runs every ``every`` optimizer steps (the ADMM Z/U update cadence); ``masks``
    (a ``MaskSet``) are attached to the model and the fresh optimizer for masked retraining.
    """
    import math

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if masks is not None:
        masks.attach(model, opt)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total, step = epochs * steps_per_epoch, 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        start_time, loss_sum = time.perf_counter(), 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x, y = data.x[idx], data.y[idx]
            if augment:
                x = augment_cifar(x, generator)
            for group in opt.param_groups:
                group["lr"] = (
                    lr * 0.5 * (1 + math.cos(math.pi * step / total)) if schedule == "cosine" else lr
                )
            loss = nn.functional.cross_entropy(model(x), y)
            loss_sum += loss.item()
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if every and on_every is not None and step % every == 0:
                on_every()
        log(
            f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f} "
            f"({time.perf_counter() - start_time:.0f} s)"
        )
    if masks is not None:
        masks.detach()
    model.eval()


def log_to(out: Path):
    """A ``log(msg)`` that prints and appends to ``out/log.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / "log.txt", "a")  # noqa: SIM115 - kept open for the run

    def log(msg: str) -> None:
        print(msg, flush=True)
        handle.write(msg + "\n")
        handle.flush()

    return log

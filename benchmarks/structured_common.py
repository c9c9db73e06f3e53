"""Helpers shared by the CNN benchmarks: malloc settings, interleaved timing, MACs, epochs of the library's loop.

The conventions are those of ``../shared/BENCHMARKING.md``: glibc malloc thresholds set before the
interpreter starts (``ensure_malloc_env`` re-executes the script with them), 2 threads, eval mode,
``torch.inference_mode()``, warm-up, then contenders timed round-robin and the median taken per
contender.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from admmcompress.atomic import atomic_write
from admmcompress.data import BatchLoader, Split
from admmcompress.data.augment import Augment
from admmcompress.executors.compact_run import count_macs
from admmcompress.timing import time_interleaved
from admmcompress.train.config import OptimizerConfig, PhaseConfig
from admmcompress.train.loop import learning_rate, make_optimizer, train_epoch
from admmcompress.train.precision import native_bf16

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


def interleaved_ms(
    contenders: dict[str, Callable[[], object]], rounds: int = 25, warmup: int = 5
) -> dict[str, float]:
    """Median milliseconds per contender, timed round-robin (the library's ``timing.time_interleaved``)."""
    with torch.inference_mode():
        return time_interleaved(contenders, rounds, warmup)


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of Conv/Linear layers (and column executors) for one sample of ``x``'s shape."""
    return count_macs(model, x[:1])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_json(path: Path, value) -> None:
    """JSON written atomically: a file that marks a finished step is whole or absent after a kill."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines results file, in order (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mean_sd(values: list[float]) -> str:
    """``"mean +- sd (n)"`` of a metric over seeds, the tables' one format (sd 0 for a single seed).

    >>> mean_sd([99.2, 99.3, 99.4])
    '99.30 +- 0.10 (3)'
    """
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f} ({len(values)})"


# Standard CIFAR augmentation, the library's: random flip and a shift of up to 4 pixels per image.
CIFAR_AUGMENT = Augment(shift=4, hflip=True)


def fit(
    model: nn.Module,
    data: Split,
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
    augment: Augment | None = None,
    schedule: str = "cosine",
    seed: int = 0,
    log: Callable[[str], None] = print,
    label_smoothing: float = 0.0,
    fast: bool | str = False,
) -> None:
    """``epochs`` of the library's ``train_epoch`` with a fresh optimizer and one LR schedule over all steps.

    ``on_every()`` runs every ``every`` optimizer steps (the ADMM Z/U update cadence); ``masks`` (a
    ``MaskSet``) are attached to the model and the fresh optimizer for masked retraining; ``augment``
    (e.g. ``CIFAR_AUGMENT``) draws from the loader's seeded generator. SGD is Nesterov with momentum 0.9.
    ``fast`` trains in bf16 autocast with channels_last batches (the run config's ``autocast: bf16`` and
    ``channels_last: true``, measured 2.26x faster in benchmarks/training_speed.py on an AVX-512 CPU);
    ``fast="channels_last"`` keeps float32 with channels_last batches (1.25x on an AVX2 CPU without native
    bf16, where bf16 autocast is emulated and 16x slower).
    """
    if fast is True and not native_bf16():  # emulated bf16: said in the benchmark's log, not only on stderr
        log("  note: bf16 autocast on a CPU without native bf16 (10-16x slower than float32 here)")
    cfg = OptimizerConfig(name=optimizer, lr=lr, weight_decay=weight_decay, nesterov=optimizer == "sgd")
    opt = make_optimizer(model, cfg)
    if masks is not None:
        masks.attach(model, opt)
    loader = BatchLoader(data, batch_size, shuffle=True, seed=seed, augment=augment)
    phase = PhaseConfig(epochs=epochs, optimizer=cfg, lr_schedule=schedule)
    steps = len(loader)

    def after_step(step: int) -> None:
        if step % every == 0:
            on_every()

    for epoch in range(epochs):
        started = time.perf_counter()
        losses = train_epoch(
            model,
            loader,
            opt,
            lambda step: learning_rate(phase, step, steps),
            epoch * steps,
            penalty=penalty,
            after_step=after_step if every and on_every is not None else None,
            progress=False,
            label_smoothing=label_smoothing,
            autocast=torch.bfloat16 if fast is True else None,
            channels_last=bool(fast),
        )
        log(f"  epoch {epoch + 1}/{epochs}: loss {losses['loss']:.4f} ({time.perf_counter() - started:.0f} s)")
    if masks is not None:
        masks.detach()
    model.eval()



CIFAR_BATCH = 128


def cifar_sgd(model: nn.Module, data: Split, epochs: int, lr: float = 0.01, *, weight_decay: float = 5e-4,
              **kw) -> None:
    """``fit`` with the CIFAR benchmarks' one SGD recipe: Nesterov, batch 128, the library's augmentation.

    ``kw`` goes to ``fit`` (penalty, masks, schedule, seed, log, fast, ...).
    """
    fit(model, data, epochs, lr, optimizer="sgd", batch_size=CIFAR_BATCH, weight_decay=weight_decay,
        augment=CIFAR_AUGMENT, **kw)


def accumulate_gradients(model: nn.Module, data: Split, batches: int, seed: int, augment: Augment | None = None,
                         batch_size: int = 128) -> None:
    """Gradients of the training loss over ``batches`` shuffled batches (what Taylor importance reads)."""
    model.zero_grad()
    model.train()
    for i, (x, y) in enumerate(BatchLoader(data, batch_size, shuffle=True, seed=seed, augment=augment)):
        if i == batches:
            break
        nn.functional.cross_entropy(model(x), y).backward()
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

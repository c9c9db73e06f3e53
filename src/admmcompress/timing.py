"""Wall-clock timing on this machine, and a per-machine cache of measured latencies.

Every latency-driven decision in the package (rank choice, width budgets, executor choice) goes through
here, so all of them time the same way: warm-up calls, then medians of calls interleaved between the
candidates (interleaving spreads a noisy neighbour over all of them instead of one), under ``no_grad``.

Measured tables are cached in a JSON file per machine (CPU model, torch version, thread count), so a search
times each shape once per machine. The folder is ``$ADMMCOMPRESS_CACHE`` or ``~/.cache/admmcompress``;
writes are atomic, and an unreadable cache file is ignored (and rewritten), never trusted half-way.

Example::

    >>> import torch
    >>> times = time_interleaved({"a": lambda: torch.ones(8).sum(), "b": lambda: torch.ones(16).sum()}, rounds=3)
    >>> sorted(times), all(ms >= 0 for ms in times.values())
    (['a', 'b'], True)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .atomic import atomic_write


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key(device: str = "cpu") -> str:
    """What a latency depends on besides the shape: hardware, torch build and thread count."""
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()
    return f"{hardware} | torch {torch.__version__} | {torch.get_num_threads()} threads | {device}"


@torch.no_grad()
def time_interleaved(
    calls: Mapping[str, Callable[[], object]], rounds: int = 9, warmup: int = 2
) -> dict[str, float]:
    """Median milliseconds of each zero-argument call, the calls interleaved round by round."""
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds={rounds} must be >= 1")
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: sorted(ms)[len(ms) // 2] for name, ms in samples.items()}


def median_ms(call: Callable[[], object], rounds: int = 9, warmup: int = 2) -> float:
    """Median milliseconds of one zero-argument call."""
    return time_interleaved({"call": call}, rounds, warmup)["call"]


def cache_folder() -> Path:
    return Path(os.environ.get("ADMMCOMPRESS_CACHE") or Path.home() / ".cache" / "admmcompress")


class LatencyCache:
    """Milliseconds measured on this machine, keyed by a string that names what was timed.

    One JSON file per ``(table, machine_key())``; :meth:`get_or_measure` times only what is missing and
    saves after each new entry, so an interrupted search keeps what it measured.

    Example::

        >>> import tempfile
        >>> cache = LatencyCache("doc", folder=tempfile.mkdtemp())
        >>> cache.get_or_measure("ones-8", lambda: 1.5)
        1.5
        >>> LatencyCache("doc", folder=cache.path.parent).get("ones-8")
        1.5
    """

    def __init__(self, table: str, folder: str | Path | None = None, device: str = "cpu") -> None:
        self.machine = machine_key(device)
        digest = hashlib.sha256(self.machine.encode()).hexdigest()[:12]
        self.path = Path(folder or cache_folder()) / f"latency-{table}-{digest}.json"
        self._entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("machine") != self.machine:
            return {}
        entries = data.get("ms", {})
        return {k: float(v) for k, v in entries.items() if isinstance(v, int | float)}

    def get(self, key: str) -> float | None:
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, ms: float) -> None:
        self._entries[key] = float(ms)
        text = json.dumps({"machine": self.machine, "ms": self._entries}, indent=1, sort_keys=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def get_or_measure(self, key: str, measure: Callable[[], float]) -> float:
        """The cached milliseconds for ``key``, or ``measure()`` (then cached)."""
        found = self.get(key)
        if found is None:
            found = float(measure())
            self.put(key, found)
        return found

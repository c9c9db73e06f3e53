"""This machine's CPU cache sizes, as Linux reports them (sysfs, else ``lscpu``).

The compiled block-sparse kernel sizes its work from them (``blocksparse_cpp``: from how large an im2col matrix a
product goes slab by slab) and the benchmarks record them beside every figure.

>>> parse_size("32768K"), parse_size("1M"), parse_size("512")
(33554432, 1048576, 512)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """A sysfs cache size (``"32768K"``, ``"1M"``, ``"512"``) in bytes; ``ValueError`` for anything else."""
    text = text.strip()
    return int(text[:-1]) * _UNITS[text[-1]] if text and text[-1] in _UNITS else int(text)


def l3_bytes(caches: Path = SYSFS_CACHES) -> int:
    """The L3 (last-level) cache size in bytes: sysfs, else ``lscpu``; 0 when neither says.

    On a processor whose L3 is split between core complexes (AMD EPYC) this is one complex's share, the cache a
    thread actually has.
    """
    for index in sorted(caches.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = re.search(r"L3 cache:\s*([\d.]+)\s*([KMG])i?B", text)
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0


def cache_sizes(caches: Path = SYSFS_CACHES) -> str:
    """Every cache level of CPU 0 as sysfs lists it, e.g. ``L1d 32K, L1i 32K, L2 1024K, L3 32768K``."""
    found = []
    for index in sorted(caches.glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        found.append(f"L{level}{ {'Data': 'd', 'Instruction': 'i'}.get(kind, '')} {size}")
    return ", ".join(found) or "unknown (no sysfs cache entries)"


__all__ = ["SYSFS_CACHES", "cache_sizes", "l3_bytes", "parse_size"]

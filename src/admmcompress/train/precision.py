"""Whether bf16 autocast is worth it on this CPU.

bf16 autocast runs on native instructions only where the CPU has them (x86: ``avx512_bf16`` or AMX). Elsewhere
oneDNN and ATen emulate it, and a ResNet-20 training step measured 10-16x slower than float32 on an AVX2 EPYC
(benchmarks/RESULTS.md, "Training speed on a CPU without native bf16"), where an AVX-512 BF16 machine ran it
2.26x faster. A run that asks for ``autocast: bf16`` on such a CPU is told so at its start.

>>> isinstance(native_bf16(), bool)
True
"""

from __future__ import annotations

import platform
import warnings
from functools import cache
from pathlib import Path

import torch

_X86 = ("x86_64", "amd64", "i386", "i686")


@cache
def native_bf16() -> bool:
    """True where this CPU computes bf16 natively, or where that cannot be told (then nothing is said)."""
    if platform.machine().lower() not in _X86:
        return True  # ARM and others: no reliable probe here; assume the user chose knowingly
    # torch's CPU feature probes (private, present since 2.1); oneDNN's _is_mkldnn_bf16_supported is not used:
    # it answers True for any AVX-512 CPU, Skylake included, where bf16 is still emulated
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo.read_text(errors="replace")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return True


def cpu_autocast(dtype: torch.dtype | None) -> torch.autocast:
    """The CPU autocast context of a run's ``autocast:`` setting: ``dtype``, or disabled (float32) when None."""
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def warn_if_emulated_bf16(dtype: torch.dtype | None, where: str = "autocast: bf16") -> bool:
    """Warn (once per call site) when ``dtype`` is bf16 and this CPU has no native bf16; return whether it did."""
    if dtype is not torch.bfloat16 or native_bf16():
        return False
    warnings.warn(
        f"{where}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 (avx512_bf16 or AMX), so "
        "bf16 is emulated; a ResNet-20 training step measured 10-16x slower than float32 on such a CPU. Leave "
        "autocast out here (channels_last: true still helps float32)",
        UserWarning,
        stacklevel=3,
    )
    return True


__all__ = ["cpu_autocast", "native_bf16", "warn_if_emulated_bf16"]

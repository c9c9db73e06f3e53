"""Dense MKL on one thread under MKL_ENABLE_INSTRUCTIONS: does it change which vector width dense runs here?

    for e in "" SSE4_2 AVX2 AVX512; do
      MKL_ENABLE_INSTRUCTIONS=$e python benchmarks/records/blocksparse_grid_3/mkl_check.py
    done

A 1024^3 GEMM (GFLOP/s) and a 3072->768 Linear at batch 32, medians of 20 / 50 calls. SSE4_2 is the control: if
the variable were honoured, it would run at well under half the others' rate.
"""

from __future__ import annotations

import os
import time

import torch


def median_ms(call, calls: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(32, 3072), torch.randn(768, 3072)
    gemm = median_ms(lambda: a @ b, 20)
    linear = median_ms(lambda: torch.nn.functional.linear(x, w), 50)
    print(f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS') or '(unset)'}: 1024^3 GEMM "
          f"{gemm:.2f} ms ({2 * 1024**3 / gemm / 1e6:.0f} GFLOP/s), Linear 3072->768 batch 32 {linear:.3f} ms")


if __name__ == "__main__":
    main()

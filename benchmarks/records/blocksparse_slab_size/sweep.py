"""bsmm (the Linear product) over many inputs: does the slab size (inputs per slab, kept in L2) matter?

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_slab_size/sweep.py

Square-ish Linear layers at 10x (``Block(block=(16, 64))``), 2048 or 512 inputs, 1 and 2 threads; slabs of 64 KiB to
1 MiB of inputs (``set_slab_floats``; the kernel's default is 256 KiB); kept multiply-adds per second, medians of
10 rounds of 3 calls in a new random order each round, the output checked against the dense product.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blockmatrix import BlockSparseMatrix
from admmcompress.structures import Block

SIZES = [16384, 32768, 65536, 131072, 262144]  # floats per slab: 64 KiB to 1 MiB of inputs


def rate(ext, args, x, out, slab_floats):
    before = ext.set_slab_floats(slab_floats)
    try:
        start = time.perf_counter()
        for _ in range(3):
            y = ext.bsmm(x, *args, out)
        return (time.perf_counter() - start) / 3, y
    finally:
        ext.set_slab_floats(before)


def main() -> None:
    ext = blocksparse_cpp.load()
    torch.manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for inp, out, n in ((1024, 1024, 2048), (2048, 2048, 2048), (4096, 4096, 512)):
            w = Block(compression=10, block=(16, 64)).project(torch.randn(out, inp))
            args = blocksparse_cpp.packed(BlockSparseMatrix(w, 16, impl="cpp"))
            x = torch.randn(n, inp)
            times = {s: [] for s in SIZES}
            with torch.inference_mode():
                ref = x @ w.T
                for r in range(12):
                    for s in random.sample(SIZES, len(SIZES)):
                        seconds, y = rate(ext, args, x, out, s)
                        torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)
                        if r >= 2:
                            times[s].append(seconds)
            kept = int((w != 0).sum()) * n
            cells = ", ".join(f"{s * 4 // 1024} KiB {kept / statistics.median(v) / 1e9:.1f}" for s, v in times.items())
            print(f"{threads} thr {out}x{inp} n={n}: {cells} GMAC/s", flush=True)


if __name__ == "__main__":
    main()

"""bsmm_t (the im2col product) over a large transposed input: in place, or slab by slab through a copy.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_bsmm_t_slabs/sweep.py --threads 1

Layers at 10x (``Block(block=(16, 64))``, 16-row blocks) of conv-like shapes (in_features = C*kh*kw, out
channels), 1024-16384 columns (an im2col matrix of a batch): kept multiply-adds per second of ``bsmm_t`` with the
slabs switched off, forced on (every shape, whatever its size or kept weights per input), and as the library
chooses. Best of 4 calls each after one checked against the first; the rows say which way the choice went.
"""

from __future__ import annotations

import argparse
import time

import torch

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blockmatrix import BlockSparseMatrix
from admmcompress.structures import Block

SHAPES = [(576, 64), (1152, 128), (2304, 256), (4608, 512)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ext = blocksparse_cpp.load()
    default = ext.set_slab_floats_t(262144, 16777216, 24)
    ext.set_slab_floats_t(*default)
    modes = {"in place": (default[0], 2**62, 0), "slabs": (default[0], 0, 0), "chosen": tuple(default)}
    print(f"# {args.threads} thread(s), -march={blocksparse_cpp.DEFAULT_MARCH}, kernel v{blocksparse_cpp.VERSION}; "
          f"defaults: slab {default[0]} floats, from {default[1]} input floats, {default[2]} kept weights per input")
    print("| in x out | columns | input MiB | kept per input | in place GMAC/s | slabs | chosen |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for in_features, out_features in SHAPES:
        weight = Block(compression=10, block=(16, 64)).project(torch.randn(out_features, in_features))
        packed = blocksparse_cpp.packed(BlockSparseMatrix(weight, 16, impl="cpp"))
        kept = int((weight != 0).sum())
        for columns in (1024, 4096, 16384):
            xt = torch.randn(in_features, columns)
            rates, expected = {}, None
            for name, setting in modes.items():
                ext.set_slab_floats_t(*setting)
                y = ext.bsmm_t(xt, *packed, out_features)
                expected = y if expected is None else expected
                torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
                best = float("inf")
                for _ in range(4):
                    start = time.perf_counter()
                    ext.bsmm_t(xt, *packed, out_features)
                    best = min(best, time.perf_counter() - start)
                rates[name] = kept * columns / best / 1e9
            ext.set_slab_floats_t(*default)
            print(f"| {in_features} x {out_features} | {columns} | {in_features * columns * 4 / 2**20:.0f} | "
                  f"{kept / in_features:.1f} | {rates['in place']:.1f} | {rates['slabs']:.1f} | "
                  f"{rates['chosen']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

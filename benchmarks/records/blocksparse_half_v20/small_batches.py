"""The compiled kernel on float32 against float16 weights at 1-128 inputs, one thread, 10x (bsmm directly).

    python benchmarks/records/blocksparse_half_v20/small_batches.py
"""

from __future__ import annotations

import random

import torch
from common_timing import median_us, paired, pruned_pair, timed

from admmcompress.executors import blocksparse_cpp as bc


def main() -> None:
    ext = bc.load()
    rng = random.Random(0)
    torch.set_num_threads(1)
    for inp, out in [(3072, 768), (768, 3072), (2048, 2048)]:
        dense, _, args = pruned_pair(inp, out, 10)
        half = tuple(a.half() if i == 1 else a for i, a in enumerate(args))
        for batch in (1, 2, 3, 4, 6, 8, 16, 32, 128):
            x = torch.randn(batch, inp)
            calls = {
                "dense": lambda x=x, d=dense: d(x),
                "f32": lambda x=x, a=args, o=out: ext.bsmm(x, *a, o),
                "f16": lambda x=x, a=half, o=out: ext.bsmm(x, *a, o),
            }
            s = timed(calls, 40, rng)
            m = {n: median_us(v) for n, v in s.items()}
            print(f"t1 {inp}->{out} b{batch}: dense {m['dense']:.0f} f32 {m['f32']:.1f} f16 {m['f16']:.1f} "
                  f"f32/f16 {paired(s, 'f32', 'f16'):.2f}", flush=True)


if __name__ == "__main__":
    main()

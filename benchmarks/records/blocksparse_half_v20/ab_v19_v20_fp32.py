"""Float32 products: kernel v19 (a308344) against v20 (float16 support), the same packed arguments, interleaved.

    git show a308344:src/admmcompress/executors/blocksparse_cpp.py > /tmp/bc_v19.py
    python benchmarks/records/blocksparse_half_v20/ab_v19_v20_fp32.py 100 /tmp/bc_v19.py
"""

from __future__ import annotations

import importlib.util
import random
import sys

import torch
from common_timing import median_us, paired, pruned_pair, timed
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp as bc


def main() -> None:
    rounds, old_path = int(sys.argv[1]), sys.argv[2]
    spec = importlib.util.spec_from_file_location("bc19", old_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    v19 = load_inline(name="bs_ab_v19", cpp_sources=[old.SOURCE], extra_cflags=bc.CFLAGS, extra_ldflags=bc.LDFLAGS)
    v20 = load_inline(name="bs_ab_v20", cpp_sources=[bc.SOURCE], extra_cflags=bc.CFLAGS, extra_ldflags=bc.LDFLAGS)
    rng = random.Random(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for inp, out in [(3072, 768), (4096, 1024), (2048, 2048), (5888, 5888)]:
            dense, _, args = pruned_pair(inp, out, 10)
            for batch in (1, 32):
                x = torch.randn(batch, inp)
                a19, a20 = (tuple(a.clone() for a in args) for _ in range(2))
                calls = {
                    "dense": lambda d=dense, x=x: d(x),
                    "v19": lambda x=x, a=a19, o=out: v19.bsmm(x, *a, o),
                    "v20": lambda x=x, a=a20, o=out: v20.bsmm(x, *a, o),
                }
                s = timed(calls, rounds, rng)
                d, t19, t20 = (median_us(s[n]) for n in ("dense", "v19", "v20"))
                print(f"t{threads} {inp}->{out} b{batch}: dense {d:.0f}us v19 {t19:.1f} ({d / t19 / 10:.2f} of ideal) "
                      f"v20 {t20:.1f} ({d / t20 / 10:.2f}) v19/v20 paired {paired(s, 'v19', 'v20'):.3f}", flush=True)


if __name__ == "__main__":
    main()

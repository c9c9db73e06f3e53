"""Products of many inputs, slab by slab: the kernel of commit --old against this tree's at several slab sizes.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_slabs/sweep.py --old a416d50 --threads 1

Builds the kernel source of commit ``--old`` beside this tree's (``blocksparse_cpp.load()``), and times ``bsmm``
of Linear layers at 10x (``Block(block=(16, 64))``) for 128, 512 and 2048 inputs (``--inputs``): the old kernel,
then the new one with each slab budget (``set_slab_floats``: input floats per slab; 2**30 means one slab, no
slabs). The calls of a round run in a new random order; the best of --rounds rounds (two calls each) is reported
as kept multiply-adds per second. Every output is checked against the dense layer first.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import time

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse import BlockSparseLinear
from admmcompress.structures import Block
from admmcompress.timing import cpu_model

SHAPES = [(2048, 512), (3072, 768), (768, 3072), (4096, 1024)]  # (out, in)
BUDGETS = [16384, 32768, 65536, 131072, 262144, 1 << 30]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the commit whose kernel source is the baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inputs", type=int, nargs="+", default=[128, 512, 2048])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = blocksparse_cpp.load()
    old_file = subprocess.run(
        ["git", "show", f"{args.old}:src/admmcompress/executors/blocksparse_cpp.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    scope: dict = {}
    exec(compile(old_file, "old_blocksparse_cpp", "exec"), scope)  # our own file from git history
    old = load_inline(name=f"slabs_old_{args.old}", cpp_sources=[scope["SOURCE"]],
                      extra_cflags=blocksparse_cpp.CFLAGS, extra_ldflags=blocksparse_cpp.LDFLAGS)
    print(f"# {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); kept GMAC/s, best of "
          f"{args.rounds} rounds")
    print("| out x in | inputs | old | " + " | ".join(f"slab {b}" if b < 1 << 30 else "no slabs" for b in BUDGETS)
          + " |")
    print("|---|---:|" + "---:|" * (len(BUDGETS) + 1))
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        layer = nn.Linear(in_f, out_f).eval()
        with torch.no_grad():
            layer.weight.copy_(Block(compression=10, block=(16, 64)).project(layer.weight))
        kernel_args = blocksparse_cpp.packed(BlockSparseLinear.from_dense(layer, block_rows=16).matrix)
        kept = int((layer.weight != 0).sum())
        for n in args.inputs:
            x = torch.randn(n, in_f)
            with torch.inference_mode():
                expected = layer(x)
                torch.testing.assert_close(old.bsmm(x, *kernel_args, out_f), expected, atol=1e-4, rtol=1e-4)
                for budget in BUDGETS:
                    new.set_slab_floats(budget)
                    torch.testing.assert_close(new.bsmm(x, *kernel_args, out_f), expected, atol=1e-4, rtol=1e-4)
                names: list = ["old", *BUDGETS]
                best = {name: float("inf") for name in names}
                for _ in range(args.rounds):
                    random.shuffle(names)
                    for name in names:
                        ext = old if name == "old" else new
                        if name != "old":
                            new.set_slab_floats(name)
                        ext.bsmm(x, *kernel_args, out_f)
                        start = time.perf_counter()
                        ext.bsmm(x, *kernel_args, out_f)
                        ext.bsmm(x, *kernel_args, out_f)
                        best[name] = min(best[name], (time.perf_counter() - start) / 2)
            new.set_slab_floats(65536)
            cells = " | ".join(f"{kept * n / best[name] / 1e9:.1f}" for name in ["old", *BUDGETS])
            print(f"| {out_f}x{in_f} | {n} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

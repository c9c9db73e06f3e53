"""The compiled block-sparse kernel before and after the AVX2 row-wise passes, built for AVX2 and AVX-512.

    python benchmarks/records/blocksparse_avx2_rowpass/compare.py --old 079ea82 --batches 1 8 32

Builds the kernel source of commit ``--old`` and of the working tree, each with ``-march=haswell`` (AVX2 + FMA,
the code an AVX2 machine gets) and ``-march=native``, and times ``bsmm`` of the four on the same packed weights
(Linear layers at 10x, ``Block(block=(16, 64))``), one thread, the calls of a round in a new random order, the
fastest of ``--rounds`` rounds (the minimum, because this was run beside training jobs: a preempted call only
ever adds time). Only kernel-to-kernel ratios are reported: dense MKL on an AVX-512 machine says nothing about
an AVX2 one. Every output is checked against the dense layer first.
"""

from __future__ import annotations

import argparse
import hashlib
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

SHAPES = [(2048, 2048), (1024, 4096), (4096, 1024), (768, 3072), (3072, 768)]  # (out, in)


def fastest(calls: dict, rounds: int, warmup: int = 5) -> dict[str, float]:
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    best = {name: float("inf") for name in names}
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            start = time.perf_counter()
            calls[name]()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the commit whose kernel source is the baseline")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    torch.set_num_threads(1)
    old_file = subprocess.run(
        ["git", "show", f"{args.old}:src/admmcompress/executors/blocksparse_cpp.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    scope: dict = {}
    exec(compile(old_file, "old_blocksparse_cpp", "exec"), scope)  # our own file from git history
    sources = {"old": scope["SOURCE"], "new": blocksparse_cpp.SOURCE}
    builds = {}
    for march in ("haswell", "native"):
        for version, source in sources.items():
            flags = [f"-march={march}" if f == "-march=native" else f for f in blocksparse_cpp.CFLAGS]
            digest = hashlib.sha256(source.encode()).hexdigest()[:10]  # the same source: the cached build
            name = f"rowpass_{version}_{march}_{digest}"
            builds[f"{version}_{march}"] = load_inline(name=name, cpp_sources=[source], extra_cflags=flags,
                                                       extra_ldflags=blocksparse_cpp.LDFLAGS)
    print(f"# {cpu_model()}, torch {torch.__version__}, 1 thread, load average {__import__('os').getloadavg()[0]:.1f}")
    print("| batch | out x in | old AVX2 ms | new AVX2 ms | new/old AVX2 speed-up | old AVX-512 ms | new AVX-512 ms "
          "| new/old AVX-512 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for out_f, in_f in SHAPES:
            layer = nn.Linear(in_f, out_f).eval()
            with torch.no_grad():
                layer.weight.copy_(Block(compression=10, block=(16, 64)).project(layer.weight))
            kernel_args = blocksparse_cpp.packed(BlockSparseLinear.from_dense(layer, block_rows=16).matrix)
            x = torch.randn(batch, in_f)
            with torch.inference_mode():
                expected = layer(x)
                calls = {}
                for key, ext in builds.items():
                    torch.testing.assert_close(ext.bsmm(x, *kernel_args, out_f), expected, atol=1e-4, rtol=1e-4)
                    calls[key] = lambda e=ext, x=x, a=kernel_args, o=out_f: e.bsmm(x, *a, o)
                ms = fastest(calls, args.rounds)
            print(f"| {batch} | {out_f}x{in_f} | {ms['old_haswell']:.3f} | {ms['new_haswell']:.3f} | "
                  f"{ms['old_haswell'] / ms['new_haswell']:.2f}x | {ms['old_native']:.3f} | {ms['new_native']:.3f} | "
                  f"{ms['old_native'] / ms['new_native']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Variants of the compiled kernel's one-input path (block_one_input), timed against dense and v19 at one thread.

Each variant is one_input_variants.cpp compiled with the -D settings given as NAME:KEY=V,KEY=V (PF: prefetch
distance in floats, LOC: __builtin_prefetch locality, STREAMS: 1, 2 or 4 runs of the kept columns read side by
side); ``base`` is the same code without any. Every contender has its own copy of the weights (so none reads
another's from cache), called in a fresh random order each round; ``base/X`` is the median over rounds of
X's time over base's time in the same round (the pairing cancels the VM's slow and fast windows).

    python benchmarks/records/kernel_v20/one_input_variants.py 120 base: t2_2048:PF=2048,LOC=1 s2:STREAMS=2
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp as bc
from admmcompress.executors.blocksparse import convert_module
from admmcompress.structures import Block

OLD_START = "// One input: four partial sums over k, so the FMAs do not wait on each other."
OLD_END = "// One row block for n_rows inputs (R fixed)"
SHAPES = [(3072, 768), (768, 3072), (2048, 2048), (5888, 5888)]


def build(name: str, defines: list[str]):
    """The extension with block_one_input replaced by one_input_variants.cpp under ``defines``."""
    new = (Path(__file__).parent / "one_input_variants.cpp").read_text()
    a, b = bc.SOURCE.index(OLD_START), bc.SOURCE.index(OLD_END)
    source = bc.SOURCE[:a] + new + "\n" + bc.SOURCE[b:]
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"] + [f"-D{d}" for d in defines]
    return load_inline(name=name, cpp_sources=[source], extra_cflags=flags, extra_ldflags=["-fopenmp"])


def timed(calls: dict, rounds: int, rng: random.Random) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(5):
        for call in calls.values():
            call()
    for _ in range(rounds):
        for name in rng.sample(list(calls), len(calls)):
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    rounds = int(sys.argv[1])
    variants = {}
    for spec in sys.argv[2:]:
        name, _, defines = spec.partition(":")
        variants[name] = defines.split(",") if defines else []
    torch.set_num_threads(1)
    exts = {name: build(f"bsexp_{name}", defines) for name, defines in variants.items()}
    exts["v19"] = bc.load()
    rng = random.Random(0)
    for inp, out in SHAPES:
        torch.manual_seed(0)
        dense = nn.Linear(inp, out).eval()
        for c in (10, 20):
            masked = nn.Linear(inp, out).eval()
            with torch.no_grad():
                masked.weight.copy_(Block(compression=c, block=(16, 64), gates=1).project(dense.weight))
                masked.bias.copy_(dense.bias)
            args = bc.packed(convert_module(masked, 16, impl="cpp", kernel="cpp", min_sparsity=0.0).matrix)
            x = torch.randn(1, inp)
            calls = {"dense": lambda d=dense, x=x: d(x), "sum": lambda a=args: a[1].sum()}
            nbytes = args[1].numel() * 4 + args[0].numel() * 4
            for name, ext in exts.items():
                torch.testing.assert_close(ext.bsmm(x, *args, out), masked(x), atol=1e-4, rtol=1e-4)
                own = tuple(a.clone() for a in args)
                calls[name] = lambda e=ext, own=own, x=x, o=out: e.bsmm(x, *own, o)
            with torch.inference_mode():
                samples = timed(calls, rounds, rng)
            med = {n: statistics.median(s) * 1e6 for n, s in samples.items()}
            ratio = {n: statistics.median(a / b for a, b in zip(samples[n], samples["base"], strict=True))
                     for n in samples}
            line = (f"{inp}->{out} {c}x {nbytes / 2**20:.2f}MiB dense {med['dense']:.1f}us "
                    f"({inp * out * 4 / med['dense'] / 1e3:.1f}GB/s) sum {nbytes / med['sum'] / 1e3:.1f}GB/s")
            for name in exts:
                line += (f" | {name} {med[name]:.1f}us {med['dense'] / med[name] / c:.2f} of ideal "
                         f"{nbytes / med[name] / 1e3:.1f}GB/s base/{name} {1 / ratio[name]:.3f}")
            print(line, flush=True)


if __name__ == "__main__":
    main()

"""Does code generated for one fixed sparsity pattern beat the generic compiled kernel? (issue 19)

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/blocksparse_codegen.py
    python benchmarks/blocksparse_codegen.py --quick        # smoke: one small matrix, seconds of compiling

The seeds (BLK-REW, RTMobile) compile each pruned layer into its own code. This measures that idea on this
CPU, at batch 1 and one thread (where the generic kernel is furthest from the MAC ideal): for each matrix,
pruned with ``Block(compression=c, block=(16, --block-cols))``, C++ is generated with the pattern as constants
(every kept column's index and weight offset an immediate, each row block's loop fully unrolled into
AVX-512 multiply-adds on four accumulators: no index stream, no loop counters), compiled once, and timed
round-robin in a fresh random order per round against the dense layer and the generic kernel (the packed
layer ``impl="cpp"``, and its raw call). Both kernels read the same unpadded weights.

What it prints: milliseconds, speedup over dense and share of the MAC ideal per contender, the generated
source size and the compile time. Needs a compiler and AVX-512 (it says so and stops otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocksparse_grid import MALLOC, shuffled  # noqa: E402  (a sibling script, not a package)

from admmcompress.executors import blocksparse_cpp  # noqa: E402
from admmcompress.executors.blocksparse import convert_module  # noqa: E402
from admmcompress.structures import Block  # noqa: E402
from admmcompress.timing import cpu_model  # noqa: E402


def generated_source(index: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> str:
    """C++ for ``x (1, I) -> x @ W.T + b`` with this pattern's columns and weight offsets as constants."""
    lines = [
        "#include <torch/extension.h>",
        "#include <immintrin.h>",
        "static void product(const float* __restrict x, const float* __restrict v, const float* bias, "
        "float* __restrict out) {",
        "  __m512 a0, a1, a2, a3;",
    ]
    cols = index.tolist()
    for b, (start, count) in enumerate(zip(offsets.tolist(), counts.tolist(), strict=True)):
        lines.append("  a0 = a1 = a2 = a3 = _mm512_setzero_ps();")
        for k in range(count):
            slot = start + k
            lines.append(
                f"  a{k % 4} = _mm512_fmadd_ps(_mm512_set1_ps(x[{cols[slot]}]), "
                f"_mm512_loadu_ps(v + {slot * 16}), a{k % 4});"
            )
        lines.append(
            f"  _mm512_storeu_ps(out + {b * 16}, _mm512_add_ps(_mm512_loadu_ps(bias + {b * 16}), "
            "_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));"
        )
    lines += [
        "}",
        "torch::Tensor run(torch::Tensor x, torch::Tensor values, torch::Tensor bias, int64_t out_features) {",
        f"  auto out = torch::empty({{1, {counts.numel() * 16}}}, x.options());",
        "  product(x.contiguous().data_ptr<float>(), values.data_ptr<float>(), bias.data_ptr<float>(), "
        "out.data_ptr<float>());",
        "  return out.narrow(1, 0, out_features);",
        "}",
        'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run, "pattern-specialised product"); }',
    ]
    return "\n".join(lines) + "\n"


def compile_source(source: str):
    from torch.utils.cpp_extension import load_inline

    name = "admmcompress_codegen_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    return load_inline(name=name, cpp_sources=[source], extra_cflags=["-O2", "-march=native"])


def measure(shape: str, args: argparse.Namespace, ext) -> str:
    """One matrix: prune, generate and compile its code, check it, time it round-robin; one table row."""
    in_f, out_f = (int(v) for v in shape.split("x"))
    dense = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.copy_(Block(compression=args.compression, block=(16, args.block_cols)).project(dense.weight))
    layer = convert_module(dense, 16, impl="cpp", min_sparsity=0.0).eval()
    packed = blocksparse_cpp.packed(layer.matrix)
    index, values, offsets, counts, bias = packed
    bias = bias if bias.numel() else torch.zeros(counts.numel() * 16)
    source = generated_source(index, offsets, counts)
    start = time.perf_counter()
    generated = compile_source(source)
    compile_s = time.perf_counter() - start
    x = torch.randn(1, in_f)
    with torch.inference_mode():
        expected = dense(x)
        torch.testing.assert_close(generated.run(x, values, bias, out_f), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
        calls = {
            "dense": lambda: dense(x),
            "layer": lambda: layer(x),
            "raw": lambda: ext.bsmm(x, *packed, out_f),
            "generated": lambda: generated.run(x, values, bias, out_f),
        }
        passes = [shuffled(calls, args.rounds, 5, seed=s) for s in range(args.repeats)]
    ms = {name: statistics.median(p[name] for p in passes) for name in calls}
    real = dense.weight.numel() / int(torch.count_nonzero(dense.weight))
    speed = {name: ms["dense"] / ms[name] for name in calls}
    return (
        f"| {in_f}x{out_f} | {ms['dense']:.3f} | {speed['layer']:.2f}x | {speed['raw']:.2f}x | "
        f"{speed['generated']:.2f}x | {speed['generated'] / real:.2f} | {len(source) / 1e3:.0f} kB | {compile_s:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one 256x256 matrix")
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "3072x768", "2048x2048"],
                        help="in x out features")
    parser.add_argument("--compression", type=float, default=10.0)
    parser.add_argument("--block-cols", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=3, help="independent timing passes; the median is shown")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.rounds, args.repeats = ["256x256"], 9, 1
    if not blocksparse_cpp.available():
        sys.exit("blocksparse_codegen: the compiled kernel cannot be built here (no C++ compiler); nothing to compare")
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        sys.exit("blocksparse_codegen: the generated code is AVX-512; this CPU has none")
    torch.set_num_threads(1)
    ext = blocksparse_cpp.load()
    print(f"machine: {cpu_model()}, torch {torch.__version__}, 1 thread, batch 1, "
          f"Block({args.compression:g}x, block=(16, {args.block_cols})), global top-k")
    print("| matrix | dense ms | cpp layer | cpp raw | generated | generated of ideal | source | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for shape in args.shapes:
        print(measure(shape, args, ext), flush=True)
    rerun = " ".join(shlex.quote(a) for a in sys.argv[1:])
    env = MALLOC if os.environ.get("MALLOC_MMAP_THRESHOLD_") else ""
    print(f"\nrerun: {env} python benchmarks/blocksparse_codegen.py {rerun}".replace("  ", " "))


if __name__ == "__main__":
    main()

"""Two threads at batch >= 16: does each thread transposing the input for itself beat one shared transposition?

    python benchmarks/records/blocksparse_private_transpose/experiment.py --processes 8

The kernel's batched product (AVX-512 tiles) transposes the input once, split over the threads, and then every
thread reads all of it: data one core has just written crosses to the other. On this 2-vCPU VM two threads
are fast in some processes and slow in others (RESULTS, issue 19); the hypothesis is that this sharing is what
the slow ones pay for. The variant here ("private") has each thread transpose the whole input into its own
buffer, then take row-block chunks as before, so nothing a thread reads was written by the other. Both builds
come from the library's kernel source (the variant by a text substitution, below); each process times dense,
the library kernel ("shared") and the variant at 2 threads, round-robin, medians of --rounds rounds, and the
script runs --processes fresh processes because the fast/slow mode is per process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

SHAPES = [(768, 3072), (1024, 4096), (3072, 768), (4096, 1024), (2048, 2048)]  # (out, in)

SHARED = """  if (tiles(p.r, n)) {
    xt = torch::empty({x.size(1), n}, x.options());"""
PRIVATE = """  if (tiles(p.r, n) && threads_now() > 1) {
    block_mm_private(p, x.data_ptr<float>(), n, x.size(1), out.data_ptr<float>());
    return finish(out, p, out_features);
  }
""" + SHARED

PRIVATE_MM = """
// Experiment: every thread transposes the whole input into its own buffer, then takes row-block chunks.
static void block_mm_private(const Packed& p, const float* x, int64_t n, int64_t in, float* out) {
  std::vector<int64_t> work(p.nb);
  for (int64_t b = 0; b < p.nb; ++b) work[b] = (p.counts[b] + 1) * p.r * n;
  const std::vector<int64_t> bounds = balanced_bounds(work);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t threads = std::min(threads_now(), chunks);
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    static thread_local std::vector<float> xt;
    if (static_cast<int64_t>(xt.size()) < in * n) xt.resize(in * n);
    transpose_columns(x, n, in, xt.data(), 0, in);
    for (int64_t c = next++; c < chunks; c = next++)
      for (int64_t b = bounds[c]; b < bounds[c + 1]; ++b) one_block(p, b, x, n, in, out, p.nb * p.r, xt.data());
  }
}

// x (N, I) -> x @ W.T + b (N, O).
torch::Tensor bsmm("""


def builds():
    from torch.utils.cpp_extension import load_inline

    from admmcompress.executors import blocksparse_cpp

    source = blocksparse_cpp.SOURCE
    assert SHARED in source and "\n// x (N, I) -> x @ W.T + b (N, O).\ntorch::Tensor bsmm(" in source
    variant = source.replace(SHARED, PRIVATE, 1).replace(
        "\n// x (N, I) -> x @ W.T + b (N, O).\ntorch::Tensor bsmm(", PRIVATE_MM, 1)
    digest = hashlib.sha256(variant.encode()).hexdigest()[:10]
    private = load_inline(name=f"private_transpose_{digest}", cpp_sources=[variant],
                          extra_cflags=blocksparse_cpp.CFLAGS, extra_ldflags=blocksparse_cpp.LDFLAGS)
    return blocksparse_cpp.load(), private


def one_process(batch: int, rounds: int) -> list[dict]:
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.executors.blocksparse import BlockSparseLinear
    from admmcompress.structures import Block

    torch.set_num_threads(2)
    shared, private = builds()
    rows = []
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        layer = nn.Linear(in_f, out_f).eval()
        with torch.no_grad():
            layer.weight.copy_(Block(compression=10, block=(16, 64)).project(layer.weight))
        args = blocksparse_cpp.packed(BlockSparseLinear.from_dense(layer, block_rows=16).matrix)
        x = torch.randn(batch, in_f)
        with torch.inference_mode():
            expected = layer(x)
            calls = {"dense": lambda layer=layer, x=x: layer(x)}
            for name, ext in (("shared", shared), ("private", private)):
                torch.testing.assert_close(ext.bsmm(x, *args, out_f), expected, atol=1e-4, rtol=1e-4)
                calls[name] = lambda e=ext, x=x, a=args, o=out_f: e.bsmm(x, *a, o)
            times = {name: [] for name in calls}
            names = list(calls)
            for r in range(rounds + 5):
                random.shuffle(names)
                for name in names:
                    start = time.perf_counter()
                    for _ in range(10):
                        calls[name]()
                    if r >= 5:
                        times[name].append(1e2 * (time.perf_counter() - start))  # ms per call
        rows.append({"shape": f"{in_f}->{out_f}", **{k: statistics.median(v) for k, v in times.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.batch, args.rounds)))
        return
    from admmcompress.timing import cpu_model

    builds()  # compile once before the timed processes
    print(f"# {cpu_model()}, torch {torch.__version__}, 2 threads, batch {args.batch}, 10x, Block(16, 64); "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| process | shape | dense ms | shared ms | private ms | shared / private speed | of ideal shared | "
          "of ideal private |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for proc in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--child", "--batch", str(args.batch), "--rounds",
                              str(args.rounds)], capture_output=True, text=True, check=True).stdout
        for row in json.loads(out.strip().splitlines()[-1]):
            d, s, p = row["dense"], row["shared"], row["private"]
            print(f"| {proc} | {row['shape']} | {d:.3f} | {s:.3f} | {p:.3f} | {s / p:.2f}x | {d / s / 10:.2f} | "
                  f"{d / p / 10:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Would cheaper gate math lift the LSTM at batch 32? The kernel's sigmoid/tanh with a Newton reciprocal in place
of the division, against the kernel as committed.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_gate_math/experiment.py --march native

Both builds come from the library's kernel source (the variant by a text substitution: ``1 / (1 + e)`` becomes an
integer-trick first guess refined by three Newton steps, all multiply-adds the compiler vectorises). A 512-wide
LSTM and GRU at 10x (``Block(block=(16, 64))``), 16 steps, batch 32, 1 thread: the compiled sequence
(``lstm_sequence`` / ``gru_sequence``) of each build on the same inputs, round-robin, best of 30 rounds; the
largest difference of each build's output from the dense layer's.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
from admmcompress.structures import Block

DIVIDING = """static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
static inline float tanh_f(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }"""
NEWTON = """static inline float recip_f(float d) {  // d >= 1: a first guess from the bits, then three Newton steps
  int32_t i;
  std::memcpy(&i, &d, sizeof(i));
  i = 0x7EF311C7 - i;
  float r;
  std::memcpy(&r, &i, sizeof(r));
  r = r * (2.0f - d * r);
  r = r * (2.0f - d * r);
  r = r * (2.0f - d * r);
  return r;
}
static inline float sigmoid_f(float x) { return recip_f(1.0f + exp_approx(-x)); }
static inline float tanh_f(float x) { return 2.0f * recip_f(1.0f + exp_approx(-2.0f * x)) - 1.0f; }"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", default="native")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = blocksparse_cpp.SOURCE
    assert DIVIDING in source, "the kernel's gate functions changed: update DIVIDING"
    flags = [f"-march={args.march}" if f == "-march=native" else f for f in blocksparse_cpp.CFLAGS]
    builds = {}
    for name, text in (("division", source), ("newton", source.replace(DIVIDING, NEWTON))):
        digest = hashlib.sha256((text + args.march).encode()).hexdigest()[:10]
        builds[name] = load_inline(name=f"gate_math_{name}_{digest}", cpp_sources=[text], extra_cflags=flags,
                                   extra_ldflags=blocksparse_cpp.LDFLAGS)
    print(f"# -march={args.march}, 1 thread, hidden 512, batch 32, 16 steps, 10x; best of {args.rounds} rounds")
    print("| layer | division ms | newton ms | speed-up | max error vs dense: division / newton |")
    print("|---|---:|---:|---:|---|")
    for kind in ("lstm", "gru"):
        torch.manual_seed(0)
        dense = (nn.LSTM if kind == "lstm" else nn.GRU)(512, 512).eval()
        with torch.no_grad():
            for pname, weight in dense.named_parameters():
                if pname.startswith("weight"):
                    weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
        fast = (BlockSparseLSTM if kind == "lstm" else BlockSparseGRU).from_dense(dense, block_rows=16, kernel="cpp")
        hh, ih = blocksparse_cpp.packed(fast.hh[0]), blocksparse_cpp.packed(fast.ih[0])
        x = torch.randn(16, 32, 512)
        gates = 4 if kind == "lstm" else 3
        with torch.inference_mode():
            gi = builds["division"].bsmm(x.reshape(512, 512), *ih, gates * 512).view(16, 32, -1).contiguous()
            h0 = torch.zeros(32, 512)
            calls = {}
            for name, ext in builds.items():
                if kind == "lstm":
                    calls[name] = lambda e=ext, g=gi, h=h0, w=hh: e.lstm_sequence(g, h, h, *w, False)[0]
                else:
                    calls[name] = lambda e=ext, g=gi, h=h0, w=hh: e.gru_sequence(g, h, *w, False)[0]
            expected = dense(x)[0]
            errors = {name: float((call() - expected).abs().max()) for name, call in calls.items()}
            best = {name: float("inf") for name in calls}
            names = list(calls)
            for _ in range(args.rounds):
                random.shuffle(names)
                for name in names:
                    start = time.perf_counter()
                    calls[name]()
                    best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
        print(f"| {kind} 512 | {best['division']:.3f} | {best['newton']:.3f} | "
              f"{best['division'] / best['newton']:.2f}x | {errors['division']:.1e} / {errors['newton']:.1e} |")


if __name__ == "__main__":
    main()

"""How much of a block-sparse LSTM/GRU layer at batch 32 is gate arithmetic, and what cheaper forms of it buy.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_gate_math_2/experiment.py --march native --threads 1

Builds of the library's kernel source, each variant by a text substitution. The outputs here were measured on
kernel v13 (the input product inside the steps), whose exp was a Cody-Waite reduction (two multiply-adds) with a
~1e-7 polynomial; kernel v14 took ``exp2`` from this experiment, so on v14 ``committed`` and ``exp2`` are the same:

- ``committed``: as the library builds it;
- ``no_exp``: exp replaced by ``1 + x*x`` (wrong results): the most any cheaper exp could save;
- ``exp2``: exp as ``2^(x log2 e)``: one multiply for the range reduction instead of two multiply-adds, and a
  degree-5 polynomial for 2^f on [-1/2, 1/2] (coefficients fitted here by iterated weighted least squares on the
  relative error): 0.6e-6 relative error for |x| < 10 against ~1e-7;
- ``one_division``: the LSTM's 5 divisions per unit folded into 2 (the cell and the output each over one common
  denominator), the GRU's 3 into 2; exp arguments clamped at 25 so products of three ``1 + e`` stay finite.

A 512-wide layer at 10x (``Block(block=(16, 64))``), 16 steps, batch 32: ``lstm_layer`` / ``gru_layer`` of each
build on the same inputs, round-robin in shuffled order, median of the rounds after 5; the largest difference of each
build's output from the dense layer's.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
from admmcompress.structures import Block

EXP_START, EXP_END = "static inline float exp_approx", "static inline float sigmoid_f"
NO_EXP = "static inline float exp_approx(float x) { return 1.0f + x * x; }\n"
EXP2 = """static inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const int32_t k = static_cast<int32_t>(t + 128.5f) - 128;
  const float f = t - static_cast<float>(k);
  float q = 1.32647e-3f;
  q = q * f + 9.67151e-3f;
  q = q * f + 5.550734e-2f;
  q = q * f + 2.4022242e-1f;
  q = q * f + 6.9314698e-1f;
  q = q * f + 1.0f;
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return q * scale;
}
"""
GRU_CELL = """      const float rg = sigmoid_f(a[u] + b[u]);
      const float z = sigmoid_f(a[H + u] + b[H + u]);
      const float c = tanh_f(a[2 * H + u] + rg * b[2 * H + u]);
      hn[u] = c + z * (hp[u] - c);"""
GRU_ONE_DIVISION = """      const float rg = sigmoid_f(a[u] + b[u]);
      const float ez = exp_approx(-(a[H + u] + b[H + u]));
      const float ec = exp_approx(-2.0f * (a[2 * H + u] + rg * b[2 * H + u]));
      hn[u] = ((1.0f - ec) * ez + hp[u] * (1.0f + ec)) / ((1.0f + ez) * (1.0f + ec));"""
LSTM_CELL = """      const float i = sigmoid_f(a[u] + b[u]);
      const float f = sigmoid_f(a[H + u] + b[H + u]);
      const float g = tanh_f(a[2 * H + u] + b[2 * H + u]);
      const float o = sigmoid_f(a[3 * H + u] + b[3 * H + u]);
      const float cell = f * cn[u] + i * g;
      cn[u] = cell;
      hn[u] = o * tanh_f(cell);"""
LSTM_ONE_DIVISION = """      const float pi = 1.0f + exp_approx(-(a[u] + b[u]));
      const float pf = 1.0f + exp_approx(-(a[H + u] + b[H + u]));
      const float eg = exp_approx(-2.0f * (a[2 * H + u] + b[2 * H + u]));
      const float po = 1.0f + exp_approx(-(a[3 * H + u] + b[3 * H + u]));
      const float pg = 1.0f + eg, pig = pi * pg;
      const float cell = (cn[u] * pig + (1.0f - eg) * pf) / (pf * pig);
      cn[u] = cell;
      const float ec = exp_approx(-2.0f * cell);
      hn[u] = (1.0f - ec) / (po * (1.0f + ec));"""


def swap(text: str, old: str, new: str) -> str:
    assert old in text, f"the kernel source changed: update this experiment ({old.strip()[:60]!r})"
    return text.replace(old, new)


def variants(source: str) -> dict[str, str]:
    exp = source[source.index(EXP_START):source.index(EXP_END)]
    one_division = swap(source, "x = x > 88.0f ? 88.0f : x;", "x = x > 25.0f ? 25.0f : x;")
    one_division = swap(swap(one_division, GRU_CELL, GRU_ONE_DIVISION), LSTM_CELL, LSTM_ONE_DIVISION)
    return {"committed": source, "no_exp": swap(source, exp, NO_EXP), "exp2": swap(source, exp, EXP2),
            "one_division": one_division}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", default="native")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = [f"-march={args.march}" if f == "-march=native" else f for f in blocksparse_cpp.CFLAGS]
    builds = {}
    for name, text in variants(blocksparse_cpp.SOURCE).items():
        digest = hashlib.sha256((text + args.march).encode()).hexdigest()[:10]
        builds[name] = load_inline(name=f"gate_math2_{name}_{digest}", cpp_sources=[text], extra_cflags=flags,
                                   extra_ldflags=blocksparse_cpp.LDFLAGS)
    print(f"# -march={args.march}, {args.threads} thread(s), hidden 512, batch 32, 16 steps, 10x; "
          f"median of {args.rounds - 5} rounds; ms (speed-up against committed) / max error against dense")
    print("| layer | " + " | ".join(builds) + " |")
    print("|---|" + "---:|" * len(builds))
    for kind in ("lstm", "gru"):
        torch.manual_seed(0)
        dense = (nn.LSTM if kind == "lstm" else nn.GRU)(512, 512).eval()
        with torch.no_grad():
            for pname, weight in dense.named_parameters():
                if pname.startswith("weight"):
                    weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
        fast = (BlockSparseLSTM if kind == "lstm" else BlockSparseGRU).from_dense(dense, block_rows=16, kernel="cpp")
        weights = (*blocksparse_cpp.packed(fast.ih[0]), *blocksparse_cpp.packed(fast.hh[0]))
        x, h0 = torch.randn(16, 32, 512), torch.zeros(32, 512)
        calls = {}
        for name, ext in builds.items():
            if kind == "lstm":
                calls[name] = lambda e=ext, x=x, h=h0, w=weights: e.lstm_layer(x, h, h, *w, False)[0]
            else:
                calls[name] = lambda e=ext, x=x, h=h0, w=weights: e.gru_layer(x, h, *w, False)[0]
        with torch.inference_mode():
            expected = dense(x)[0]
            errors = {name: float((call() - expected).abs().max()) for name, call in calls.items()}
            times: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for r in range(args.rounds):
                random.shuffle(names)
                for name in names:
                    start = time.perf_counter()
                    calls[name]()
                    if r >= 5:
                        times[name].append(1e3 * (time.perf_counter() - start))
        median = {name: statistics.median(values) for name, values in times.items()}
        cells = [f"{median[n]:.3f} ({median['committed'] / median[n]:.2f}x) / {errors[n]:.0e}" for n in builds]
        print(f"| {kind} 512 | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

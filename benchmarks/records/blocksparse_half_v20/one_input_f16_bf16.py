"""One-input products from float32, float16 (F16C) and bfloat16 weights in one hand-written AVX2 loop, against
the library's v19 ``bsmm``; one thread, 10x. relerr: the largest |output - masked float32 layer| over the largest
|output|.

    python benchmarks/records/blocksparse_half_v20/one_input_f16_bf16.py 100
"""

from __future__ import annotations

import random
import sys

import torch
from common_timing import median_us, paired, pruned_pair, timed
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp as bc

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
template <typename LOAD>
static inline void one_block(const float* xn, const int32_t* idx, int64_t K, float* o, const float* bias, LOAD load) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    __m256 x0 = _mm256_broadcast_ss(xn + idx[k]), x1 = _mm256_broadcast_ss(xn + idx[k + 1]);
    __m256 x2 = _mm256_broadcast_ss(xn + idx[k + 2]), x3 = _mm256_broadcast_ss(xn + idx[k + 3]);
    a0 = _mm256_fmadd_ps(x0, load(k, 0), a0); a1 = _mm256_fmadd_ps(x0, load(k, 1), a1);
    b0 = _mm256_fmadd_ps(x1, load(k + 1, 0), b0); b1 = _mm256_fmadd_ps(x1, load(k + 1, 1), b1);
    c0 = _mm256_fmadd_ps(x2, load(k + 2, 0), c0); c1 = _mm256_fmadd_ps(x2, load(k + 2, 1), c1);
    d0 = _mm256_fmadd_ps(x3, load(k + 3, 0), d0); d1 = _mm256_fmadd_ps(x3, load(k + 3, 1), d1);
  }
  for (; k < K; ++k) {
    __m256 x0 = _mm256_broadcast_ss(xn + idx[k]);
    a0 = _mm256_fmadd_ps(x0, load(k, 0), a0); a1 = _mm256_fmadd_ps(x0, load(k, 1), a1);
  }
  __m256 lo = _mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(c0, d0));
  __m256 hi = _mm256_add_ps(_mm256_add_ps(a1, b1), _mm256_add_ps(c1, d1));
  if (bias) { lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias)); hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8)); }
  _mm256_storeu_ps(o, lo); _mm256_storeu_ps(o + 8, hi);
}
torch::Tensor one(torch::Tensor x, torch::Tensor index, torch::Tensor values, torch::Tensor offsets,
                  torch::Tensor counts, torch::Tensor bias, int64_t out_features) {
  auto out = torch::empty({1, out_features}, x.options());
  const float* xn = x.data_ptr<float>(); const int32_t* id = index.data_ptr<int32_t>();
  const int64_t* off = offsets.data_ptr<int64_t>(); const int64_t* cnt = counts.data_ptr<int64_t>();
  const float* bs = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t B = counts.numel();
  if (values.scalar_type() == torch::kFloat) {
    const float* v = values.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* vb = v + off[b] * 16;
      one_block(xn, id + off[b], cnt[b], o + b * 16, bs ? bs + b * 16 : nullptr,
                [vb](int64_t k, int h) { return _mm256_loadu_ps(vb + k * 16 + h * 8); });
    }
  } else if (values.scalar_type() == torch::kHalf) {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>());
    for (int64_t b = 0; b < B; ++b) {
      const uint16_t* vb = v + off[b] * 16;
      one_block(xn, id + off[b], cnt[b], o + b * 16, bs ? bs + b * 16 : nullptr,
                [vb](int64_t k, int h) {
                  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(vb + k * 16 + h * 8)));
                });
    }
  } else {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
    for (int64_t b = 0; b < B; ++b) {
      const uint16_t* vb = v + off[b] * 16;
      one_block(xn, id + off[b], cnt[b], o + b * 16, bs ? bs + b * 16 : nullptr,
                [vb](int64_t k, int h) {
                  const __m128i bits = _mm_loadu_si128((const __m128i*)(vb + k * 16 + h * 8));
                  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
                });
    }
  }
  return out;
}
"""


def main() -> None:
    rounds = int(sys.argv[1])
    ext = load_inline(name="f16exp", cpp_sources=[SRC], functions=["one"], extra_cflags=["-O3", "-march=native"])
    torch.set_num_threads(1)
    lib = bc.load()
    rng = random.Random(0)
    for inp, out in [(3072, 768), (768, 3072), (2048, 2048), (1024, 4096), (4096, 1024), (5888, 5888)]:
        dense, masked, args = pruned_pair(inp, out, 10)
        x = torch.randn(1, inp)
        stored = {
            "v19": tuple(a.clone() for a in args),
            "f32": tuple(a.clone() for a in args),
            "f16": tuple(a.half() if i == 1 else a.clone() for i, a in enumerate(args)),
            "bf16": tuple(a.bfloat16() if i == 1 else a.clone() for i, a in enumerate(args)),
        }
        ref = masked(x)
        err = {
            n: float((ext.one(x, *stored[n], out) - ref).abs().max() / ref.abs().max()) for n in ("f32", "f16", "bf16")
        }
        calls = {"dense": lambda d=dense, x=x: d(x), "v19": lambda a=stored["v19"], x=x, o=out: lib.bsmm(x, *a, o)}
        for n in ("f32", "f16", "bf16"):
            calls[n] = lambda a=stored[n], x=x, o=out: ext.one(x, *a, o)
        s = timed(calls, rounds, rng)
        m = {n: median_us(v) for n, v in s.items()}
        line = f"{inp}->{out} 10x dense {m['dense']:.0f}us |"
        for n in ("v19", "f32", "f16", "bf16"):
            line += f" {n} {m[n]:.1f}us ideal {m['dense'] / m[n] / 10:.2f} v19/{n} {paired(s, 'v19', n):.2f}"
        print(line + " | relerr " + " ".join(f"{n} {e:.1e}" for n, e in err.items()), flush=True)


if __name__ == "__main__":
    main()

"""An optional compiled kernel for the block-sparse executor: products and whole GRU/LSTM sequences in C++.

At batch 1 a recurrent step is a few hundred thousand multiply-adds, so the Python/dispatcher
overhead of ~10 small torch ops per step, not arithmetic, bounds the torch implementation. This
module compiles (once per machine, with the system C++ compiler through ``torch.utils.cpp_extension``;
cached in ``~/.cache/torch_extensions``) a kernel that runs the whole sequence loop in C++: per step one
packed block-sparse product (row block by row block, each kept column's ``r`` weights contiguous,
so the inner loop is one SIMD multiply-add per column) and the gate arithmetic, fused into the same
pass when the gates split into whole row blocks (``hidden_size % r == 0``). Products (``bsmm``; ``bsmm_t``
for inputs already stored column by column, as im2col gives them) keep four partial sums per row block at
batch 1 and take up to 4 (AVX-512) or 6 (AVX2) inputs per pass over a row block's weights; with AVX-512,
from 16 inputs they multiply 16 x 16 register tiles (the inputs transposed first), which would spill out of
AVX2's 16 registers.

Threads: the extension is built with OpenMP (the same ``libgomp`` torch loads, so ``torch.set_num_threads``
governs it) and splits every product over row blocks, in chunks of equal *work* (kept columns, padding
skipped), up to four per thread, which the threads take as they finish (a thread on a shared or slower core
does not hold the others up); a product of many inputs runs slab by slab (about 256 KiB of inputs, which
stay in L2), and with tiles each thread transposes a slab for itself, so no thread reads what another core
has just written. A recurrent sequence with at least 16 inputs per thread splits its batch: each thread runs
the whole sequence for its inputs, with its own state and no barrier. Otherwise a step splits over hidden
slices (the ``r`` units whose gate rows form one row block per gate), so each thread computes its slice's gates
and state, and a whole sequence runs in one parallel region with a barrier per step. Products too small to pay
for a thread start stay on one thread.

It is opt-in (``kernel="cpp"`` / ``impl="cpp"``, or picked by ``to_blocksparse(choose="measured")``)
because compiling takes a minute; ``available()`` says whether it can be built here (without OpenMP it is
built for one thread), and every caller falls back to the torch path otherwise, also for a model saved
with it and loaded where it cannot be built.

>>> w = torch.zeros(4, 3); w[:2, 1] = 2.0                # block 0 keeps column 1, block 1 nothing
>>> index, values = torch.tensor([1, 0]), w.view(2, 2, 3).transpose(1, 2)[:, [1]].contiguous()
>>> counts_of(index, values).tolist()                    # block 1's one column is padding
[1, 0]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import warnings
from types import ModuleType

import torch

from admmcompress.cpu_caches import l3_bytes
from admmcompress.timing import cpu_model

VERSION = 23  # bump when SOURCE or the build flags change: the extension's cache name changes with it

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <memory>
#include <numeric>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// Layout (blocksparse_cpp.packed): row block b keeps counts[b] columns index[offsets[b] + k] (int32: half the
// index bytes a product streams beside its weights), with weights values[(offsets[b] + k)*r + j] for its row j
// (float32, or float16: half the bytes, widened to float32 as they are read); bias[b*r + j] (float32). The
// offsets are b*K into the saved layout padded to K slots per block, or into a copy without the padding.

// Floats of accumulators that stay in registers: 12 of AVX2's 16 registers of 8, 24 of AVX-512's 32 of 16.
#if defined(__AVX512F__)
static constexpr int kAccumulatorFloats = 384;
#else
static constexpr int kAccumulatorFloats = 96;
#endif

// NI inputs of one row block: out[n, j] = bias[j] + sum_k x[n, idx[k]] * v[k, j], j < R. R and NI are fixed, so
// the NI x R accumulators stay in registers and each kept column's R weights, loaded once, serve NI inputs (one
// broadcast of x and one SIMD multiply-add per input and column). Below 4 inputs the kept columns alternate
// between two sets of accumulators (KS = 2): a pass of 2 inputs at R = 16 on AVX-512 is otherwise only 2
// dependent chains of multiply-adds, and ran 1.2-1.5x slower than 4 + 1 inputs did (2026-12).
template <int R, int NI>
static inline void block_inputs(const float* __restrict x0, int64_t x_stride, const int32_t* __restrict idx,
                                const float* __restrict v, const float* bias, int64_t K, float* __restrict out,
                                int64_t out_stride) {
  constexpr int KS = (NI < 4 && 2 * NI * R <= kAccumulatorFloats) ? 2 : 1;
  float acc[KS][NI][R];
  for (int s = 0; s < KS; ++s)
    for (int q = 0; q < NI; ++q)
      for (int j = 0; j < R; ++j) acc[s][q][j] = (s == 0 && bias) ? bias[j] : 0.f;
  int64_t k = 0;
  for (; k + KS <= K; k += KS) {
    for (int s = 0; s < KS; ++s) {
      const int64_t col = idx[k + s];
      const float* __restrict vk = v + (k + s) * R;
      for (int q = 0; q < NI; ++q) {
        const float xv = x0[q * x_stride + col];
#pragma omp simd
        for (int j = 0; j < R; ++j) acc[s][q][j] += xv * vk[j];
      }
    }
  }
  for (; k < K; ++k) {
    const int64_t col = idx[k];
    const float* __restrict vk = v + k * R;
    for (int q = 0; q < NI; ++q) {
      const float xv = x0[q * x_stride + col];
#pragma omp simd
      for (int j = 0; j < R; ++j) acc[0][q][j] += xv * vk[j];
    }
  }
  for (int q = 0; q < NI; ++q)
    for (int j = 0; j < R; ++j) out[q * out_stride + j] = KS == 2 ? acc[0][q][j] + acc[KS - 1][q][j] : acc[0][q][j];
}

// The most inputs per pass of block_rows_fixed. A pass of m inputs reads m rows of x side by side; at a
// power-of-two row length they fall in one set of the 8-way L1 cache, and 12 rows ran 1.35x slower than 3 x 4
// (AVX-512, 2048 inputs, 2026-12). So at most 6, which on AVX2 (16 registers of 8 floats) also keeps the
// accumulators of 16 rows in 12 registers. AVX-512 keeps 4 below its 16-input register tiles (8 and 12 were
// not faster there). How the inputs split into passes: block_rows_fixed.
#if defined(__AVX512F__)
template <int R>
static constexpr int kInputsPerPass = 4;
#else
template <int R>
static constexpr int kInputsPerPass = R >= 96 ? 1 : (96 / R > 6 ? 6 : 96 / R);
#endif

// block_inputs<R, m> for a run-time m in 2..M.
template <int R, int M>
static inline void block_inputs_upto(int64_t m, const float* __restrict x0, int64_t x_stride,
                                     const int32_t* __restrict idx, const float* __restrict v, const float* bias,
                                     int64_t K, float* __restrict out, int64_t out_stride) {
  if constexpr (M >= 2) {
    if (m == M) return block_inputs<R, M>(x0, x_stride, idx, v, bias, K, out, out_stride);
    block_inputs_upto<R, M - 1>(m, x0, x_stride, idx, v, bias, K, out, out_stride);
  }
}

// One input: four partial sums over k, so the FMAs do not wait on each other.
template <int R>
static inline void block_one_input(const float* __restrict xn, const int32_t* __restrict idx,
                                   const float* __restrict v, const float* bias, int64_t K, float* __restrict o) {
  float acc[4][R];
  for (int q = 0; q < 4; ++q)
    for (int j = 0; j < R; ++j) acc[q][j] = 0.f;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    for (int q = 0; q < 4; ++q) {
      const float xv = xn[idx[k + q]];
      const float* __restrict vk = v + (k + q) * R;
#pragma omp simd
      for (int j = 0; j < R; ++j) acc[q][j] += xv * vk[j];
    }
  }
  for (; k < K; ++k) {
    const float xv = xn[idx[k]];
    const float* __restrict vk = v + k * R;
#pragma omp simd
    for (int j = 0; j < R; ++j) acc[0][j] += xv * vk[j];
  }
  for (int j = 0; j < R; ++j) o[j] = (bias ? bias[j] : 0.f) + ((acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]));
}

// One row block for n_rows inputs (R fixed): as few passes as kInputsPerPass<R> allows. On AVX2 they are of
// equal size (8 inputs: 4 + 4, not 6 + 2); on AVX-512 full passes of 4 come first and the rest is one pass
// (5 inputs: 4 + 1), which measured up to 1.4x faster there than 2 + 3 (2026-12).
#if defined(__AVX512F__)
static constexpr bool kEqualPasses = false;
#else
static constexpr bool kEqualPasses = true;
#endif

template <int R>
static void block_rows_fixed(const float* __restrict x, int64_t n_rows, int64_t x_stride,
                             const int32_t* __restrict idx, const float* __restrict v, const float* bias,
                             int64_t K, float* __restrict out, int64_t out_stride) {
  constexpr int NI = kInputsPerPass<R>;
  const int64_t passes = (n_rows + NI - 1) / NI;
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t n = kEqualPasses ? n_rows * p / passes : p * NI;
    const int64_t m = (kEqualPasses ? n_rows * (p + 1) / passes : std::min<int64_t>(n_rows, n + NI)) - n;
    if (m == 1) block_one_input<R>(x + n * x_stride, idx, v, bias, K, out + n * out_stride);
    else block_inputs_upto<R, NI>(m, x + n * x_stride, x_stride, idx, v, bias, K, out + n * out_stride, out_stride);
  }
}

static void block_rows_any(const float* __restrict x, int64_t n_rows, int64_t x_stride,
                           const int32_t* __restrict idx, const float* __restrict v, const float* bias,
                           int64_t K, int64_t r, float* __restrict out, int64_t out_stride) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const float* __restrict xn = x + n * x_stride;
    float* __restrict o = out + n * out_stride;
    for (int64_t j = 0; j < r; ++j) o[j] = bias ? bias[j] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = xn[idx[k]];
      const float* __restrict vk = v + k * r;
#pragma omp simd
      for (int64_t j = 0; j < r; ++j) o[j] += xv * vk[j];
    }
  }
}

// Float16 weights: up to one pass of inputs (rows_half) widens them in registers as it reads them (F16C); more
// inputs widen a row block's weights once into a per-thread float32 copy that all of them read. One input at 10x
// ran 1.5-1.8x faster than from float32 weights (AVX2 EPYC, one thread, 768x3072 to 5888x5888; 2026-12).
static inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// Widening runs inside OpenMP parallel regions, where an exception would abort the process: a buffer that cannot
// be allocated is counted here instead, and the call reports it once the region is over (checked_widening).
static std::atomic<int64_t> widen_failures{0};
// The per-thread buffer holds one row block's weights; one above this many floats (1 MiB) is released after use,
// so a very wide layer does not leave a copy that large in every thread.
static constexpr int64_t kKeptWideFloats = int64_t{1} << 18;
static thread_local std::vector<float> wide_buffer;

// n weights widened into this thread's buffer (valid until its next call); nullptr when it cannot be allocated.
static const float* widened(const uint16_t* __restrict h, int64_t n) {
  static const float nothing[1] = {0.f};
  if (n == 0) return nothing;  // a row block without kept columns: an empty buffer's data() may be null (= failed)
  if (static_cast<int64_t>(wide_buffer.size()) < n) {
    try {
      wide_buffer.resize(n);
    } catch (...) {
      widen_failures.fetch_add(1);
      return nullptr;
    }
  }
  float* __restrict f = wide_buffer.data();
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
  for (; i < n; ++i) f[i] = half_to_float(h[i]);
  return f;
}

struct ReleaseWidened {  // at the end of a row block widened into an oversized buffer
  ~ReleaseWidened() {
    if (static_cast<int64_t>(wide_buffer.size()) > kKeptWideFloats) std::vector<float>().swap(wide_buffer);
  }
};

// f(args...) of an exported function, then one error line if a widening buffer could not be allocated meanwhile
// (the outputs of its row block were not written).
template <typename R, typename... A>
static auto checked_widening(R (*f)(A...)) {
  return [f](A... args) -> R {
    const int64_t before = widen_failures.load();
    R result = f(std::move(args)...);
    TORCH_CHECK(widen_failures.load() == before,
                "block-sparse kernel: out of memory widening float16 weights to float32 (one row block per thread); "
                "free memory, or convert this layer without values_dtype (float32 weights need no widening)");
    return result;
  };
}

#if defined(__F16C__) && defined(__FMA__)
// block_one_input from float16 weights: V = R/8 registers per kept column, S partial sums (S x V <= 8 registers).
template <int R>
static inline void block_one_input_half(const float* __restrict xn, const int32_t* __restrict idx,
                                        const uint16_t* __restrict v, const float* bias, int64_t K,
                                        float* __restrict o) {
  constexpr int V = R / 8, S = V >= 4 ? 2 : 4;
  __m256 acc[S][V];
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < V; ++j) acc[s][j] = _mm256_setzero_ps();
  auto column = [&](int s, int64_t k) {
    const __m256 xv = _mm256_broadcast_ss(xn + idx[k]);
    const uint16_t* __restrict vk = v + k * R;
    for (int j = 0; j < V; ++j)
      acc[s][j] = _mm256_fmadd_ps(xv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(vk + 8 * j))), acc[s][j]);
  };
  int64_t k = 0;
  for (; k + S <= K; k += S)
    for (int s = 0; s < S; ++s) column(s, k + s);
  for (; k < K; ++k) column(0, k);
  for (int j = 0; j < V; ++j) {
    __m256 t = acc[0][j];
    for (int s = 1; s < S; ++s) t = _mm256_add_ps(t, acc[s][j]);
    if (bias) t = _mm256_add_ps(t, _mm256_loadu_ps(bias + 8 * j));
    _mm256_storeu_ps(o + 8 * j, t);
  }
}
#endif

#if defined(__F16C__) && defined(__FMA__)
// NI inputs of one row block from float16 weights, in one pass: each kept column's R weights widened once in
// registers serve all NI inputs (V = R/8 registers of weights, NI x V of accumulators; below 4 inputs the kept
// columns alternate between two sets of them, as block_inputs does). Widening the row block into the per-thread
// float32 copy first ran 0.80-1.34x of float32 weights at 2-8 inputs; this, 0.98-1.46x (3072->768, 768->3072 and
// 2048x2048 at 10x, one thread, AVX2 EPYC, 2026-12).
template <int R, int NI>
static inline void block_inputs_half(const float* __restrict x0, int64_t x_stride, const int32_t* __restrict idx,
                                     const uint16_t* __restrict v, const float* bias, int64_t K,
                                     float* __restrict out, int64_t out_stride) {
  constexpr int V = R / 8, KS = (NI < 4 && 2 * NI * V + V + 1 <= 16) ? 2 : 1;
  __m256 acc[KS][NI][V];
  for (int s = 0; s < KS; ++s)
    for (int q = 0; q < NI; ++q)
      for (int j = 0; j < V; ++j)
        acc[s][q][j] = (s == 0 && bias) ? _mm256_loadu_ps(bias + 8 * j) : _mm256_setzero_ps();
  auto column = [&](int s, int64_t k) {
    const uint16_t* __restrict vk = v + k * R;
    __m256 w[V];
    for (int j = 0; j < V; ++j) w[j] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(vk + 8 * j)));
    const int64_t col = idx[k];
    for (int q = 0; q < NI; ++q) {
      const __m256 xv = _mm256_broadcast_ss(x0 + q * x_stride + col);
      for (int j = 0; j < V; ++j) acc[s][q][j] = _mm256_fmadd_ps(xv, w[j], acc[s][q][j]);
    }
  };
  int64_t k = 0;
  for (; k + KS <= K; k += KS)
    for (int s = 0; s < KS; ++s) column(s, k + s);
  for (; k < K; ++k) column(0, k);
  for (int q = 0; q < NI; ++q)
    for (int j = 0; j < V; ++j) {
      __m256 t = acc[0][q][j];
      if constexpr (KS == 2) t = _mm256_add_ps(t, acc[KS - 1][q][j]);
      _mm256_storeu_ps(out + q * out_stride + 8 * j, t);
    }
}

// Inputs that fit one pass of block_inputs_half<R, m>: accumulators, weights and a broadcast within AVX2's 16
// registers (6 inputs at r = 8 and 16, 2 at r = 32).
template <int R>
static constexpr int kHalfInputs = (15 - R / 8) / (R / 8) > 6 ? 6 : (15 - R / 8) / (R / 8);

template <int R, int M>
static inline void block_inputs_half_upto(int64_t m, const float* x0, int64_t x_stride, const int32_t* idx,
                                          const uint16_t* v, const float* bias, int64_t K, float* out,
                                          int64_t out_stride) {
  if constexpr (M >= 1) {
    if (m == M) return block_inputs_half<R, M>(x0, x_stride, idx, v, bias, K, out, out_stride);
    block_inputs_half_upto<R, M - 1>(m, x0, x_stride, idx, v, bias, K, out, out_stride);
  }
}

template <int R>
static inline bool rows_half_fixed(int64_t n, const float* x, int64_t x_stride, const int32_t* idx,
                                   const uint16_t* v, const float* bias, int64_t K, float* out, int64_t out_stride) {
  if (n > kHalfInputs<R>) return false;
  if (n == 1) block_one_input_half<R>(x, idx, v, bias, K, out);
  else block_inputs_half_upto<R, kHalfInputs<R>>(n, x, x_stride, idx, v, bias, K, out, out_stride);
  return true;
}
#endif

// Up to one pass of inputs (rows of x) from float16 weights without widening them first, where the build has F16C
// and FMA and r is 8, 16 or 32; false otherwise (the caller widens them: more inputs share the widening).
static inline bool rows_half(int64_t r, int64_t n, const float* x, int64_t x_stride, const int32_t* idx,
                             const uint16_t* v, const float* bias, int64_t K, float* out, int64_t out_stride) {
#if defined(__F16C__) && defined(__FMA__)
  if (r == 16) return rows_half_fixed<16>(n, x, x_stride, idx, v, bias, K, out, out_stride);
  if (r == 8) return rows_half_fixed<8>(n, x, x_stride, idx, v, bias, K, out, out_stride);
  if (r == 32) return rows_half_fixed<32>(n, x, x_stride, idx, v, bias, K, out, out_stride);
#endif
  return false;
}

struct Packed {
  const int32_t* index;
  const float* values;  // nullptr when the weights are float16 (half)
  const uint16_t* half;
  const int64_t* offsets;
  const int64_t* counts;
  const float* bias;
  int64_t nb, r;
};

static Packed packed_of(const torch::Tensor& index, const torch::Tensor& values, const torch::Tensor& offsets,
                        const torch::Tensor& counts, const torch::Tensor& bias) {
  const bool half = values.scalar_type() == torch::kHalf;
  TORCH_CHECK(values.dim() == 2 && (half || values.scalar_type() == torch::kFloat) && values.is_contiguous(),
              "block-sparse kernel: values must be a contiguous float32 or float16 (slots, r) tensor");
  TORCH_CHECK(bias.numel() == 0 || bias.scalar_type() == torch::kFloat,
              "block-sparse kernel: the bias must be float32");
  TORCH_CHECK(index.scalar_type() == torch::kInt && index.is_contiguous() && counts.is_contiguous() &&
                  offsets.is_contiguous() && offsets.numel() == counts.numel(),
              "block-sparse kernel: arguments not as blocksparse_cpp.packed gives them");
  return {index.data_ptr<int32_t>(), half ? nullptr : values.data_ptr<float>(),
          half ? reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>()) : nullptr,
          offsets.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
          counts.numel(), values.size(1)};
}

// NT inputs at once from the transposed input xt (in_features x ld): per kept column, NT contiguous inputs
// times each of the R weights, an R x NT tile of accumulators (16 x 16: 16 AVX-512 registers) and one
// weight broadcast per multiply-add instruction -- the register-blocked GEMM micro-kernel.
template <int R, int NT>
static void tile_cols(const float* __restrict xt, int64_t ld, int64_t n0, const int32_t* __restrict idx,
                      const float* __restrict v, const float* bias, int64_t K, float* __restrict out,
                      int64_t out_stride, int64_t nt = NT) {
  float acc[R][NT];
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict xk = xt + idx[k] * ld + n0;
    const float* __restrict vk = v + k * R;
    for (int j = 0; j < R; ++j) {
      const float w = vk[j];
#pragma omp simd
      for (int t = 0; t < NT; ++t) acc[j][t] += w * xk[t];
    }
  }
  for (int64_t t = 0; t < nt; ++t)  // nt < NT: a zero-padded tail tile, of which nt inputs are real
    for (int j = 0; j < R; ++j) out[(n0 + t) * out_stride + j] = acc[j][t] + (bias ? bias[j] : 0.f);
}

// From this many inputs a product also reads them transposed (tile_cols); fewer go row by row.
static const int64_t kTileRows = 16;

static inline bool tiles(int64_t r, int64_t n_rows) {
#if defined(__AVX512F__)
  return n_rows >= kTileRows && (r == 16 || r == 8);
#else  // a 16 x 16 tile of accumulators spills out of 16 AVX2 registers: block_rows_fixed is faster there
  return false;
#endif
}

// A 16 x 16 tile of x (row stride ldx) transposed into xt (row stride ldt): 16 row loads, three rounds of
// in-register shuffles, 16 row stores (a scalar tile loop is ~10x slower, and ATen's transposing copy of a
// 32 x 3072 input took a third of the product it fed).
static inline void transpose_tile16(const float* x, int64_t ldx, float* xt, int64_t ldt) {
#if defined(__AVX512F__)
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(x + i * ldx);
  for (int i = 0; i < 16; i += 2) {  // within each 128-bit lane: pairs of rows interleaved
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int q = 0; q < 16; q += 4) {  // r[q + c], lane L: column 4L + c of rows q..q+3
    const __m512d a = _mm512_castps_pd(t[q]), b = _mm512_castps_pd(t[q + 1]);
    const __m512d c = _mm512_castps_pd(t[q + 2]), d = _mm512_castps_pd(t[q + 3]);
    r[q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // gather lane L of r[c], r[4 + c], r[8 + c], r[12 + c]: output row 4L + c
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_ps(xt + (0 + c) * ldt, _mm512_shuffle_f32x4(v0, v2, 0x88));
    _mm512_storeu_ps(xt + (4 + c) * ldt, _mm512_shuffle_f32x4(v0, v2, 0xDD));
    _mm512_storeu_ps(xt + (8 + c) * ldt, _mm512_shuffle_f32x4(v1, v3, 0x88));
    _mm512_storeu_ps(xt + (12 + c) * ldt, _mm512_shuffle_f32x4(v1, v3, 0xDD));
  }
#else
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) xt[j * ldt + i] = x[i * ldx + j];
#endif
}

// Columns [j0, j1) of x (n x m, row-major) into rows [j0, j1) of xt (m x n): whole 16 x 16 tiles shuffled in
// registers, the ragged edges element by element.
static void transpose_columns(const float* x, int64_t n, int64_t m, float* xt, int64_t j0, int64_t j1) {
  const int64_t n16 = n / 16 * 16;
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    for (int64_t i = 0; i < n16; i += 16) transpose_tile16(x + i * m + j, m, xt + j * n + i, n);
    for (int64_t i = n16; i < n; ++i)
      for (int64_t jj = j; jj < j + 16; ++jj) xt[jj * n + i] = x[i * m + jj];
  }
  for (; j < j1; ++j)
    for (int64_t i = 0; i < n; ++i) xt[j * n + i] = x[i * m + j];
}

// x (n x m, row-major) -> xt (m x n), split over torch's threads by 16-column strips when it is large enough.
static void transpose_into(const float* x, int64_t n, int64_t m, float* xt) {
  const int64_t strips = (m + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 16 * n));  // ~32k elements a thread
  at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
    transpose_columns(x, n, m, xt, s0 * 16, std::min(s1 * 16, m));
  });
}

// Row block b of x (n_rows x ..., row stride x_stride) into out[:, b*r : b*r + r] (row stride out_stride).
// With xt (x transposed, in_features x n_rows; when tiles(r, n_rows)) whole tiles of 16 inputs read xt, and
// the rest reads x, or, when x is null, xt_tail (those inputs transposed and zero-padded to 16 columns).
static inline void one_block(const Packed& p, int64_t b, const float* x, int64_t n_rows, int64_t x_stride,
                             float* out, int64_t out_stride, const float* xt = nullptr,
                             const float* xt_tail = nullptr) {
  const int32_t* idx = p.index + p.offsets[b];
  const float* bb = p.bias ? p.bias + b * p.r : nullptr;
  const int64_t kb = p.counts[b];
  float* o = out + b * p.r;
  const float* v;
  if (p.half != nullptr) {
    const uint16_t* h = p.half + p.offsets[b] * p.r;
    if (xt == nullptr && rows_half(p.r, n_rows, x, x_stride, idx, h, bb, kb, o, out_stride)) return;
    v = widened(h, kb * p.r);  // more inputs share the widening
    if (v == nullptr) return;  // counted: the call fails once its parallel region is over
  } else {
    v = p.values + p.offsets[b] * p.r;
  }
  const ReleaseWidened release;
  if (xt != nullptr) {
    int64_t n0 = 0;
    for (; n0 + kTileRows <= n_rows; n0 += kTileRows) {
      if (p.r == 16) tile_cols<16, 16>(xt, n_rows, n0, idx, v, bb, kb, o, out_stride);
      else tile_cols<8, 16>(xt, n_rows, n0, idx, v, bb, kb, o, out_stride);
    }
    if (x == nullptr) {
      float* ot = o + n0 * out_stride;
      const int64_t nt = n_rows - n0;
      if (nt > 0 && p.r == 16) tile_cols<16, 16>(xt_tail, 16, 0, idx, v, bb, kb, ot, out_stride, nt);
      else if (nt > 0) tile_cols<8, 16>(xt_tail, 16, 0, idx, v, bb, kb, ot, out_stride, nt);
      return;
    }
    x += n0 * x_stride;
    o += n0 * out_stride;
    n_rows -= n0;
  }
  if (p.r == 16) block_rows_fixed<16>(x, n_rows, x_stride, idx, v, bb, kb, o, out_stride);
  else if (p.r == 8) block_rows_fixed<8>(x, n_rows, x_stride, idx, v, bb, kb, o, out_stride);
  else if (p.r == 32) block_rows_fixed<32>(x, n_rows, x_stride, idx, v, bb, kb, o, out_stride);
  else if (p.r == 4) block_rows_fixed<4>(x, n_rows, x_stride, idx, v, bb, kb, o, out_stride);
  else block_rows_any(x, n_rows, x_stride, idx, v, bb, kb, p.r, o, out_stride);
}

// A chunk smaller than this many multiply-adds does not pay for waking a thread (~ a few microseconds).
static const int64_t kMinChunkWork = 32768;

// Chunks per thread: threads take chunks as they finish the last (dynamic), so a thread whose core is shared or
// slower does not hold the others up. With one chunk per thread, a 2-thread product on a shared 2-vCPU VM ran at
// times slower than on 1 thread while dense MKL kept 1.3x (2026-12).
static const int64_t kChunksPerThread = 4;

// Within a part of a batch-split sequence (fused_sequence) everything runs on the calling thread.
static thread_local bool serial_here = false;

static inline int64_t threads_now() { return serial_here ? 1 : std::max<int64_t>(1, at::get_num_threads()); }

// Bounds of contiguous ranges of units with about equal total work: up to kChunksPerThread per thread, none
// below kMinChunkWork multiply-adds, one when torch has one thread.
static std::vector<int64_t> balanced_bounds(const std::vector<int64_t>& work) {
  const int64_t n = static_cast<int64_t>(work.size());
  int64_t total = 0;
  for (int64_t w : work) total += w;
  const int64_t threads = threads_now();
  const int64_t most = threads > 1 ? threads * kChunksPerThread : 1;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({most, total / kMinChunkWork, n}));
  std::vector<int64_t> bounds{0};
  int64_t acc = 0, c = 1;
  for (int64_t u = 0; u < n && c < chunks; ++u) {
    acc += work[u];
    while (c < chunks && acc * chunks >= total * c) {
      if (bounds.back() != u + 1) bounds.push_back(u + 1);  // a unit heavier than a chunk: no empty chunks
      ++c;
    }
  }
  if (bounds.back() != n) bounds.push_back(n);
  return bounds;
}

// body(first_unit, end_unit) once per chunk, on torch's intra-op threads, each taking the next chunk when done.
template <typename F>
static void run_chunks(const std::vector<int64_t>& bounds, const F& body) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t threads = std::min(threads_now(), chunks);
#ifdef _OPENMP
  if (threads > 1) {
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(threads))
    for (int64_t c = next++; c < chunks; c = next++) body(bounds[c], bounds[c + 1]);
    return;
  }
#endif
  for (int64_t c = 0; c < chunks; ++c) body(bounds[c], bounds[c + 1]);
}

// Multiply-adds of each of nb row blocks for n_rows inputs: kept columns (padding skipped) and the bias.
static std::vector<int64_t> block_work(const int64_t* counts, int64_t nb, int64_t r, int64_t n_rows) {
  std::vector<int64_t> work(nb);
  for (int64_t b = 0; b < nb; ++b) work[b] = (counts[b] + 1) * r * n_rows;
  return work;
}

// Chunks of row blocks with equal work for a product of n_rows inputs.
static std::vector<int64_t> row_block_bounds(const Packed& p, int64_t n_rows) {
  return balanced_bounds(block_work(p.counts, p.nb, p.r, n_rows));
}

// out (n_rows x nb*r) = x @ W.T + b, over row blocks in chunks of equal work; xt / xt_tail as one_block's.
static void block_mm(const Packed& p, const float* x, int64_t n_rows, int64_t in_features, float* out,
                     const float* xt = nullptr, const float* xt_tail = nullptr) {
  run_chunks(row_block_bounds(p, n_rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) one_block(p, b, x, n_rows, in_features, out, p.nb * p.r, xt, xt_tail);
  });
}

// Inputs per slab of bsmm: about 256 KiB of them (64 Ki floats; more when in_features > 2048, as a slab has at
// least 32 rows), in whole tiles of 16. Every row block rereads its slab's inputs, which so stay in L2; over all
// 2048 inputs at once, products ran at 0.56-0.82x their multiply-add rate at 128 inputs (2026-12).
static std::atomic<int64_t> slab_floats{65536};  // set_slab_floats: for tuning only

static inline int64_t slab_rows(int64_t in_features) {
  const int64_t floats = slab_floats.load(std::memory_order_relaxed);
  return std::max<int64_t>(32, floats / std::max<int64_t>(1, in_features) / 16 * 16);
}

// Returns the previous value, so a caller can put it back.
int64_t set_slab_floats(int64_t floats) {
  TORCH_CHECK(floats > 0, "slab_floats must be positive");
  return slab_floats.exchange(floats);
}

// out (n_rows x nb*r) = x @ W.T + b for row-major x, slab by slab of inputs. For each slab the threads take
// chunks of row blocks of equal work as they finish (the next slab's without waiting for the others: slabs do
// not depend on each other). With tiles, every thread first transposes the slab into its own buffer, so no
// thread reads what another core has just written: with one transposition split over 2 threads and read by
// both, products ran up to 2.5x slower in some processes on a 2-vCPU VM, 1.0-1.1x in the others (2026-12).
static void block_mm_slabs(const Packed& p, const float* x, int64_t n_rows, int64_t in_features, float* out,
                           const torch::TensorOptions& options) {
  if (n_rows == 0) return;
  std::vector<int64_t> work = block_work(p.counts, p.nb, p.r, 1);
  const int64_t per_row = std::accumulate(work.begin(), work.end(), int64_t{0});  // multiply-adds per input
  // A slab of a small layer grows until it has work for every thread (chunks are cut within a slab).
  const int64_t busy = (threads_now() * kMinChunkWork + per_row - 1) / std::max<int64_t>(1, per_row);
  const int64_t slab = std::min(n_rows, std::max(slab_rows(in_features), (busy + 15) / 16 * 16));
  const int64_t slabs = (n_rows + slab - 1) / slab, out_stride = p.nb * p.r;
  const bool tiled = tiles(p.r, slab);
  for (int64_t& w : work) w *= slab;  // one slab's
  const std::vector<int64_t> bounds = balanced_bounds(work);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
#ifdef _OPENMP
  const int64_t threads = std::min(threads_now(), chunks);
#else
  const int64_t threads = 1;
#endif
  torch::Tensor buffers;  // allocated here: nothing may throw inside the parallel region
  if (tiled) buffers = torch::empty({threads, slab * in_features}, options);
  float* first = tiled ? buffers.data_ptr<float>() : nullptr;
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[slabs]);
  for (int64_t s = 0; s < slabs; ++s) next[s] = 0;
  std::atomic<int64_t> slots{0};
  auto body = [&]() {
    float* xt = tiled ? first + slots++ * slab * in_features : nullptr;
    for (int64_t s = 0; s < slabs; ++s) {
      if (next[s].load() >= chunks) continue;  // the other threads took every chunk of this slab
      const int64_t n0 = s * slab, m = std::min(slab, n_rows - n0);
      const float* xs = x + n0 * in_features;
      if (tiled && m >= kTileRows) transpose_columns(xs, m, in_features, xt, 0, in_features);  // else rows of x
      for (int64_t c = next[s]++; c < chunks; c = next[s]++)
        for (int64_t b = bounds[c]; b < bounds[c + 1]; ++b)
          one_block(p, b, xs, m, in_features, out + n0 * out_stride, out_stride, tiled ? xt : nullptr);
    }
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    body();
    return;
  }
#endif
  body();
}

static torch::Tensor finish(torch::Tensor out, const Packed& p, int64_t out_features) {
  return p.nb * p.r == out_features ? out : out.narrow(1, 0, out_features).contiguous();
}

// x (N, I) -> x @ W.T + b (N, O).
torch::Tensor bsmm(torch::Tensor x, torch::Tensor index, torch::Tensor values, torch::Tensor offsets,
                   torch::Tensor counts, torch::Tensor bias, int64_t out_features) {
  x = x.contiguous();
  const Packed p = packed_of(index, values, offsets, counts, bias);
  const int64_t n = x.size(0);
  auto out = torch::empty({n, p.nb * p.r}, x.options());
  block_mm_slabs(p, x.data_ptr<float>(), n, x.size(1), out.data_ptr<float>(), x.options());
  return finish(out, p, out_features);
}

// bsmm_t slab by slab: columns per slab about 1 MiB of inputs (256 Ki floats), in whole tiles of 16; from this many
// input floats on (64 MiB here; load() sets twice the L3 size it reads), and only for layers with at least this
// many kept weights per input row (so that the copy below is small beside the product). set_slab_floats_t: for
// tuning only.
static std::atomic<int64_t> slab_floats_t{262144};
static std::atomic<int64_t> slab_from_floats_t{16777216};
static std::atomic<int64_t> slab_kept_per_input_t{24};

// Returns the previous values, so a caller can put them back.
std::vector<int64_t> set_slab_floats_t(int64_t floats, int64_t from_floats, int64_t kept_per_input) {
  TORCH_CHECK(floats > 0 && from_floats >= 0 && kept_per_input >= 0,
              "slab_floats_t must be positive, the thresholds >= 0");
  return {slab_floats_t.exchange(floats), slab_from_floats_t.exchange(from_floats),
          slab_kept_per_input_t.exchange(kept_per_input)};
}

// bsmm_t over slabs of columns (needs tiles(p.r, 16)). Over all of a large xt, every row block reads its kept rows
// in place, one cache line from each of hundreds of rows per 16-column tile: at 16384 columns of 2304 rows (144
// MiB, 4.5x this EPYC's L3) a 10x 256-row layer ran at 8.6 GMAC/s against 50 at 1024 columns (one thread,
// 2026-12). Here a thread takes a whole slab at a time (no thread reads what another wrote), copies its columns of
// every input row into a contiguous buffer (its ragged tail into a zero-padded tile), and runs every row block on
// it from cache (one_block, as the in-place path): 27-36 GMAC/s at those sizes. Not below them, nor for layers with
// few kept weights per input: the copy then costs more than the in-place reads
// (benchmarks/records/blocksparse_bsmm_t_slabs).
static void block_mm_t_slabs(const Packed& p, const float* xt, int64_t in_features, int64_t n, float* out,
                             const torch::TensorOptions& options) {
  const int64_t budget = slab_floats_t.load(std::memory_order_relaxed);
  const int64_t slab = std::max<int64_t>(kTileRows, budget / std::max<int64_t>(1, in_features) / 16 * 16);
  const int64_t slabs = (n + slab - 1) / slab, out_stride = p.nb * p.r;
  const int64_t threads = std::min(threads_now(), slabs);
  const int64_t per_thread = in_features * (slab + kTileRows);  // a slab, then its ragged tail as one tile
  torch::Tensor buffers = torch::empty({threads, per_thread}, options);  // nothing may throw below
  float* first = buffers.data_ptr<float>();
  std::atomic<int64_t> next{0}, slots{0};
  auto body = [&]() {
    float* buf = first + slots++ * per_thread;
    float* tail = buf + in_features * slab;  // the last m % 16 inputs, zero-padded to a tile, as one_block reads them
    for (int64_t s = next++; s < slabs; s = next++) {
      const int64_t n0 = s * slab, m = std::min(slab, n - n0), full = m / kTileRows * kTileRows;
      for (int64_t i = 0; i < in_features; ++i) {
        std::memcpy(buf + i * m, xt + i * n + n0, full * sizeof(float));
        if (full == m) continue;
        std::memcpy(tail + i * kTileRows, xt + i * n + n0 + full, (m - full) * sizeof(float));
        for (int64_t t = m - full; t < kTileRows; ++t) tail[i * kTileRows + t] = 0.f;
      }
      for (int64_t b = 0; b < p.nb; ++b)
        one_block(p, b, nullptr, m, in_features, out + n0 * out_stride, out_stride, buf, full < m ? tail : nullptr);
    }
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    body();
    return;
  }
#endif
  body();
}

// Whether bsmm_t of n columns runs slab by slab (block_mm_t_slabs).
static bool slabs_t(const Packed& p, int64_t in_features, int64_t n) {
  if (n < 2 * kTileRows || in_features * n < slab_from_floats_t.load(std::memory_order_relaxed)) return false;
  const int64_t kept = std::accumulate(p.counts, p.counts + p.nb, int64_t{0}) * p.r;
  return kept >= slab_kept_per_input_t.load(std::memory_order_relaxed) * in_features;
}

// The same product from the inputs already transposed, xt (I, N) (an im2col matrix): (xt.T @ W.T + b) (N, O).
torch::Tensor bsmm_t(torch::Tensor xt, torch::Tensor index, torch::Tensor values, torch::Tensor offsets,
                     torch::Tensor counts, torch::Tensor bias, int64_t out_features) {
  xt = xt.contiguous();
  const Packed p = packed_of(index, values, offsets, counts, bias);
  const int64_t in_features = xt.size(0), n = xt.size(1);
  if (!tiles(p.r, n)) return bsmm(xt.t(), index, values, offsets, counts, bias, out_features);
  auto out = torch::empty({n, p.nb * p.r}, xt.options());
  if (slabs_t(p, in_features, n)) {
    block_mm_t_slabs(p, xt.data_ptr<float>(), in_features, n, out.data_ptr<float>(), xt.options());
    return finish(out, p, out_features);
  }
  const int64_t full = n / kTileRows * kTileRows;
  torch::Tensor tail;
  if (full < n) {  // the last n - full inputs, zero-padded to one tile
    tail = torch::zeros({in_features, kTileRows}, xt.options());
    tail.narrow(1, 0, n - full).copy_(xt.narrow(1, full, n - full));
  }
  block_mm(p, nullptr, n, in_features, out.data_ptr<float>(), xt.data_ptr<float>(),
           tail.defined() ? tail.data_ptr<float>() : nullptr);
  return finish(out, p, out_features);
}

// Vectorisable exp, so the gate loops below compile to SIMD instead of calling the scalar libm functions:
// 2^(x log2 e) = 2^k * 2^f with k the nearest integer and |f| <= 1/2, 2^f by a degree-5 polynomial (coefficients
// fitted for this kernel by iterated weighted least squares on the relative error over [-1/2, 1/2]). Relative
// error over every float in [-87, 88]: 1.3e-6 at most as gcc builds it (multiply-adds contracted), 4e-6 without
// contraction, both at the clamps; 3e-7 / 6e-7 for |x| < 10 (the rounding of x log2 e dominates). One multiply
// reduces the range where a Cody-Waite split took two multiply-adds: batch-32 LSTM/GRU 512 layers ran 1.03-1.05x
// faster than with that ~1e-7 exp, both builds, outputs within 2e-7 of dense as before
// (benchmarks/records/blocksparse_gate_math_2, 2026-12).
static inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;  // plain selects: fmin/std::min keep gcc from SIMD here; a NaN passes both
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  // k = the nearest integer to t without a float -> int conversion (undefined behaviour for a NaN): adding
  // 1.5 * 2^23 rounds t to an integer held in the low mantissa bits. A NaN gives some k in unsigned arithmetic
  // (defined) and stays NaN through f, as torch's exp gives.
  const float shifted = t + 12582912.0f;
  uint32_t k_bits;
  std::memcpy(&k_bits, &shifted, sizeof(k_bits));
  const float f = t - (shifted - 12582912.0f);
  float q = 1.32647e-3f;
  q = q * f + 9.67151e-3f;
  q = q * f + 5.550734e-2f;
  q = q * f + 2.4022242e-1f;
  q = q * f + 6.9314698e-1f;
  q = q * f + 1.0f;
  const uint32_t bits = (k_bits - 0x4B400000u + 127u) << 23;  // 2^k: k = k_bits - bits of 1.5 * 2^23
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return q * scale;
}
static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
static inline float tanh_f(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

// Hidden slices: slice s owns units [s*r, s*r + r) and the row blocks g*S + s (S = H / r) of every gate g.
static std::vector<int64_t> slice_bounds(const Packed& p, int64_t gates, int64_t S, int64_t n_rows) {
  std::vector<int64_t> work(S);
  for (int64_t s = 0; s < S; ++s) {
    int64_t w = 0;
    for (int64_t g = 0; g < gates; ++g) w += (p.counts[g * S + s] + 1) * p.r;
    work[s] = w * n_rows;
  }
  return balanced_bounds(work);
}

// step(s, first_slice, end_slice) for s = 0..T-1, each thread its chunk of slices, in ONE parallel region for the
// whole sequence with a barrier between steps (every slice of step s+1 reads the whole state of step s). A region
// per step cost more than a 512-wide LSTM step's own work here: 2 threads ran slower than 1 (2026-12).
// Within a step the threads take chunks dynamically, as run_chunks does.
template <typename Step>
static void run_steps(const std::vector<int64_t>& bounds, int64_t T, const Step& step) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t threads = std::min(threads_now(), chunks);
#ifdef _OPENMP
  if (threads > 1) {
    std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[T]);
    for (int64_t s = 0; s < T; ++s) next[s] = 0;
#pragma omp parallel num_threads(static_cast<int>(threads))
    for (int64_t s = 0; s < T; ++s) {
      for (int64_t c = next[s]++; c < chunks; c = next[s]++) step(s, bounds[c], bounds[c + 1]);
#pragma omp barrier
    }
    return;
  }
#endif
  for (int64_t s = 0; s < T; ++s)
    for (int64_t c = 0; c < chunks; ++c) step(s, bounds[c], bounds[c + 1]);
}

// The state for the tiled product: two transposed copies (H x N), step s reading one while each thread writes its
// own units of the new state into the other, so one barrier per step suffices.
struct TransposedState {
  std::vector<float> buffers[2];
  int64_t N = 0, H = 0;
  TransposedState(bool used, const float* h0, int64_t n, int64_t h) : N(n), H(h) {
    if (!used) return;
    buffers[0].resize(N * H);
    buffers[1].resize(N * H);
    transpose_into(h0, N, H, buffers[0].data());
  }
  const float* at(int64_t s) const { return buffers[0].empty() ? nullptr : buffers[s % 2].data(); }
  void write(int64_t s, const float* hnew, int64_t u0, int64_t u1) {  // units [u0, u1) of step s's new state
    if (!buffers[0].empty()) transpose_columns(hnew, N, H, buffers[(s + 1) % 2].data(), u0, u1);
  }
};

// The input product fused into the steps: x (T, N, I) and its matrix, whose row blocks line up with the hidden
// matrix's (the same r and GATES*H rows). Each step computes its gate inputs right before its hidden products, so
// they stay in cache instead of a (T, N, GATES*H) tensor written by one product and read back by the sequence;
// only where each part of the sequence runs on one thread (fused_sequence; see there) with >= kTileRows inputs.
struct StepInput {
  const Packed* p;
  const float* x;
  int64_t I;
};

// The fused loop GRU and LSTM share, for inputs [n0, n1) of the N in gi (T, N, GATES*H), h0 and out (T, N, H):
// at step s each thread's hidden slices get their GATES row blocks of the hidden product (into gh, N x GATES*H),
// then cell(n, gi row, gh row, previous state row, new state row, u0, u1) updates units [u0, u1) of input n
// (n counted in all N). The new state is written straight into out[t] (the next step's previous state).
template <int GATES, typename Cell>
static void fused_rows(const Packed& p, const float* gip, const float* h0p, float* outp, int64_t T, int64_t N,
                       int64_t n0, int64_t n1, int64_t H, bool reverse, float* ghp, const Cell& cell,
                       const StepInput* in = nullptr, float* scratch = nullptr) {
  const int64_t S = H / p.r, G = GATES * H, m = n1 - n0;
  TransposedState ht(tiles(p.r, m), h0p + n0 * H, m, H);
  float* gin = scratch;                                                           // in: this step's gate inputs
  float* xin = in != nullptr && tiles(p.r, m) ? scratch + m * G : nullptr;  // in: its inputs transposed
  run_steps(slice_bounds(p, GATES, S, m), T, [&](int64_t s, int64_t s0, int64_t s1) {
    const int64_t t = reverse ? T - 1 - s : s;
    const float* hprev = (s == 0 ? h0p : outp + (reverse ? t + 1 : t - 1) * N * H) + n0 * H;
    float* hnew = outp + t * N * H + n0 * H;
    const float* git = in == nullptr ? gip + t * N * G + n0 * G : gin;
    const float* xr = in == nullptr ? nullptr : in->x + (t * N + n0) * in->I;
    if (xin != nullptr) transpose_columns(xr, m, in->I, xin, 0, in->I);
    float* gh = ghp + n0 * G;
    for (int64_t sl = s0; sl < s1; ++sl) {
      if (in != nullptr)
        for (int64_t g = 0; g < GATES; ++g) one_block(*in->p, g * S + sl, xr, m, in->I, gin, G, xin);
      for (int64_t g = 0; g < GATES; ++g) one_block(p, g * S + sl, hprev, m, H, gh, G, ht.at(s));
      for (int64_t n = 0; n < m; ++n)
        cell(n0 + n, git + n * G, gh + n * G, hprev + n * H, hnew + n * H, sl * p.r, (sl + 1) * p.r);
    }
    ht.write(s, hnew, s0 * p.r, s1 * p.r);
  });
}

// Inputs per thread from which a sequence splits its batch over the threads (each part the whole sequence on one
// thread, its own state, no barrier) instead of its hidden units (a barrier per step, and every thread reads the
// state the others wrote). set_batch_split_rows: for tuning.
static std::atomic<int64_t> batch_split_rows{16};

// Returns the previous value, so a caller can put it back.
int64_t set_batch_split_rows(int64_t rows) {
  TORCH_CHECK(rows > 0, "batch_split_rows must be positive");
  return batch_split_rows.exchange(rows);
}

static int64_t sequence_parts(int64_t N) {
#ifdef _OPENMP
  return std::max<int64_t>(1, std::min(threads_now(), N / batch_split_rows.load(std::memory_order_relaxed)));
#else
  return 1;
#endif
}

// Whether a sequence of N inputs computes its input product step by step (StepInput): every part serial, and
// enough inputs per part for the product to be a matrix product (batch 1 reads each weight once per step and
// input; one product over all T*N inputs at once reads it once per 16).
static bool fuses_input(int64_t N) {
  const int64_t parts = sequence_parts(N);
#ifdef _OPENMP
  const bool serial = parts > 1 || threads_now() == 1;
#else
  const bool serial = true;
#endif
  return serial && N / parts >= kTileRows;
}

// Floats of scratch one part of N / parts inputs needs for a fused input product (gate inputs, transposed inputs).
static int64_t part_scratch_floats(int64_t N, int64_t G, int64_t I, int64_t r) {
  const int64_t parts = sequence_parts(N), m = (N + parts - 1) / parts;
  return m * G + (tiles(r, m) ? I * m : 0);
}

template <int GATES, typename Cell>
static void fused_sequence(const Packed& p, const float* gip, const float* h0p, float* outp, int64_t T, int64_t N,
                           int64_t H, bool reverse, float* ghp, const Cell& cell, const StepInput* in = nullptr,
                           float* scratch = nullptr) {
  const int64_t parts = sequence_parts(N);
  const int64_t stride = in == nullptr ? 0 : part_scratch_floats(N, GATES * H, in->I, p.r);
#ifdef _OPENMP
  if (parts > 1) {
#pragma omp parallel for num_threads(static_cast<int>(parts)) schedule(static, 1)
    for (int64_t q = 0; q < parts; ++q) {
      const bool before = serial_here;
      serial_here = true;
      fused_rows<GATES>(p, gip, h0p, outp, T, N, N * q / parts, N * (q + 1) / parts, H, reverse, ghp, cell, in,
                        in == nullptr ? nullptr : scratch + q * stride);
      serial_here = before;
    }
    return;
  }
#endif
  fused_rows<GATES>(p, gip, h0p, outp, T, N, 0, N, H, reverse, ghp, cell, in, scratch);
}

// Whether each gate's rows are whole row blocks (the fused loop's layout): else product, then ATen gate ops.
static bool gates_line_up(const Packed& p, int64_t gates, int64_t H) {
  return H % p.r == 0 && p.nb * p.r == gates * H;
}

// Whether a layer's input matrix pi can run step by step beside its hidden matrix p (StepInput).
static bool input_lines_up(const Packed& pi, const Packed& p, int64_t gates, int64_t H, int64_t N) {
  return gates_line_up(p, gates, H) && pi.r == p.r && pi.nb == p.nb && fuses_input(N);
}

// The shapes a sequence's tensors must have. The Python layers check them first with their own messages; this
// keeps a direct caller of the entry points from reading or writing out of bounds (input and state columns are
// read by index without bounds checks, so their widths remain the caller's to get right): x (T, N, width) and
// each state (N, H), float32.
static void check_states(const torch::Tensor& x, const torch::Tensor& h0, const torch::Tensor* c0) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat,
              "block-sparse sequence: inputs must be a float32 (steps, batch, width) tensor");
  TORCH_CHECK(h0.dim() == 2 && h0.scalar_type() == torch::kFloat && h0.size(0) == x.size(1),
              "block-sparse sequence: the state must be a float32 (batch, hidden) tensor with the inputs' batch");
  TORCH_CHECK(c0 == nullptr || (c0->defined() && c0->sizes() == h0.sizes() && c0->scalar_type() == torch::kFloat),
              "block-sparse sequence: the cell state must be float32 and of the hidden state's shape");
}

// The fused GRU loop, from gate inputs gip (T, N, 3H) or, with in, x's product step by step.
static void gru_fused(const Packed& p, const float* gip, float* h0p, float* outp, int64_t T, int64_t N, int64_t H,
                      bool reverse, float* ghp, const StepInput* in = nullptr, float* scratch = nullptr) {
  fused_sequence<3>(p, gip, h0p, outp, T, N, H, reverse, ghp, [&](int64_t, const float* a, const float* b,
                                                                 const float* hp, float* hn, int64_t u0,
                                                                 int64_t u1) {
#pragma omp simd
    for (int64_t u = u0; u < u1; ++u) {
      const float rg = sigmoid_f(a[u] + b[u]);
      const float z = sigmoid_f(a[H + u] + b[H + u]);
      const float c = tanh_f(a[2 * H + u] + rg * b[2 * H + u]);
      hn[u] = c + z * (hp[u] - c);
    }
  }, in, scratch);
}

// GRU over gi (T, N, 3H) (input part incl. b_ih), h0 (N, H); the hidden product is block-sparse.
std::vector<torch::Tensor> gru_sequence(torch::Tensor gi, torch::Tensor h0, torch::Tensor index,
                                        torch::Tensor values, torch::Tensor offsets, torch::Tensor counts,
                                        torch::Tensor bias, bool reverse) {
  check_states(gi, h0, nullptr);
  TORCH_CHECK(gi.size(2) == 3 * h0.size(1), "block-sparse GRU: gate inputs must be 3 x hidden wide");
  gi = gi.contiguous();
  const int64_t T = gi.size(0), N = gi.size(1), H = h0.size(1);
  const Packed p = packed_of(index, values, offsets, counts, bias);
  auto out = torch::empty({T, N, H}, h0.options());
  auto h = h0.contiguous().clone();
  auto gh = torch::empty({N, p.nb * p.r}, h0.options());
  if (T == 0) return {out, h};
  if (!gates_line_up(p, 3, H)) {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      block_mm(p, h.data_ptr<float>(), N, H, gh.data_ptr<float>());
      auto g = gi[t];
      auto rz = torch::sigmoid(g.narrow(1, 0, 2 * H) + gh.narrow(1, 0, 2 * H));
      auto cand = torch::tanh(torch::addcmul(g.narrow(1, 2 * H, H), rz.narrow(1, 0, H), gh.narrow(1, 2 * H, H)));
      h = torch::lerp(cand, h, rz.narrow(1, H, H));
      out[t].copy_(h);
    }
    return {out, h};
  }
  gru_fused(p, gi.data_ptr<float>(), h.data_ptr<float>(), out.data_ptr<float>(), T, N, H, reverse,
            gh.data_ptr<float>());
  return {out, out[reverse ? 0 : T - 1].clone()};
}

// The fused LSTM loop (gate order i, f, g, o), from gate inputs gip (T, N, 4H) or, with in, x's product step by
// step; the cell state cp (N, H) is updated in place.
static void lstm_fused(const Packed& p, const float* gip, float* h0p, float* cp, float* outp, int64_t T, int64_t N,
                       int64_t H, bool reverse, float* ghp, const StepInput* in = nullptr,
                       float* scratch = nullptr) {
  // a unit's cell: one thread per step (the barrier orders the steps)
  fused_sequence<4>(p, gip, h0p, outp, T, N, H, reverse, ghp, [&](int64_t n, const float* a, const float* b,
                                                                 const float*, float* hn, int64_t u0,
                                                                 int64_t u1) {
    float* cn = cp + n * H;
#pragma omp simd
    for (int64_t u = u0; u < u1; ++u) {
      const float i = sigmoid_f(a[u] + b[u]);
      const float f = sigmoid_f(a[H + u] + b[H + u]);
      const float g = tanh_f(a[2 * H + u] + b[2 * H + u]);
      const float o = sigmoid_f(a[3 * H + u] + b[3 * H + u]);
      const float cell = f * cn[u] + i * g;
      cn[u] = cell;
      hn[u] = o * tanh_f(cell);
    }
  }, in, scratch);
}

// LSTM over gi (T, N, 4H), (h0, c0) (N, H); gate order i, f, g, o.
std::vector<torch::Tensor> lstm_sequence(torch::Tensor gi, torch::Tensor h0, torch::Tensor c0,
                                         torch::Tensor index, torch::Tensor values, torch::Tensor offsets,
                                         torch::Tensor counts, torch::Tensor bias, bool reverse) {
  check_states(gi, h0, &c0);
  TORCH_CHECK(gi.size(2) == 4 * h0.size(1), "block-sparse LSTM: gate inputs must be 4 x hidden wide");
  gi = gi.contiguous();
  const int64_t T = gi.size(0), N = gi.size(1), H = h0.size(1);
  const Packed p = packed_of(index, values, offsets, counts, bias);
  auto out = torch::empty({T, N, H}, h0.options());
  auto h = h0.contiguous().clone();
  auto c = c0.contiguous().clone();
  auto gh = torch::empty({N, p.nb * p.r}, h0.options());
  if (T == 0) return {out, h, c};
  if (!gates_line_up(p, 4, H)) {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      block_mm(p, h.data_ptr<float>(), N, H, gh.data_ptr<float>());
      auto gates = gi[t] + gh.narrow(1, 0, 4 * H);
      auto sg = torch::sigmoid(gates);
      c = torch::addcmul(sg.narrow(1, H, H) * c, sg.narrow(1, 0, H), torch::tanh(gates.narrow(1, 2 * H, H)));
      h = (sg.narrow(1, 3 * H, H) * torch::tanh(c)).contiguous();
      out[t].copy_(h);
    }
    return {out, h, c};
  }
  lstm_fused(p, gi.data_ptr<float>(), h.data_ptr<float>(), c.data_ptr<float>(), out.data_ptr<float>(), T, N, H,
             reverse, gh.data_ptr<float>());
  return {out, out[reverse ? 0 : T - 1].clone(), c};
}

// A whole GRU (GATES = 3) or LSTM (GATES = 4, with the cell state c0) layer from its inputs x (T, N, I): the
// input matrix (ih_*) and the hidden one. With >= kTileRows inputs per serial part the input product runs step
// by step inside the sequence (StepInput); else all steps' at once (bsmm), then gru_sequence / lstm_sequence.
template <int GATES>
static std::vector<torch::Tensor> layer(torch::Tensor x, torch::Tensor h0, torch::Tensor c0, torch::Tensor ih_index,
                                        torch::Tensor ih_values, torch::Tensor ih_offsets, torch::Tensor ih_counts,
                                        torch::Tensor ih_bias, torch::Tensor index, torch::Tensor values,
                                        torch::Tensor offsets, torch::Tensor counts, torch::Tensor bias,
                                        bool reverse) {
  check_states(x, h0, GATES == 4 ? &c0 : nullptr);
  x = x.contiguous();
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), H = h0.size(1);
  const Packed pi = packed_of(ih_index, ih_values, ih_offsets, ih_counts, ih_bias);
  const Packed p = packed_of(index, values, offsets, counts, bias);
  if (T == 0 || !input_lines_up(pi, p, GATES, H, N)) {
    auto gi = bsmm(x.reshape({T * N, I}), ih_index, ih_values, ih_offsets, ih_counts, ih_bias, GATES * H)
                  .view({T, N, GATES * H});
    if constexpr (GATES == 3) return gru_sequence(gi, h0, index, values, offsets, counts, bias, reverse);
    else return lstm_sequence(gi, h0, c0, index, values, offsets, counts, bias, reverse);
  }
  auto out = torch::empty({T, N, H}, h0.options());
  auto h = h0.contiguous().clone();
  auto gh = torch::empty({N, p.nb * p.r}, h0.options());
  auto scratch = torch::empty({sequence_parts(N), part_scratch_floats(N, GATES * H, I, p.r)}, x.options());
  const StepInput in{&pi, x.data_ptr<float>(), I};
  if constexpr (GATES == 3) {
    gru_fused(p, nullptr, h.data_ptr<float>(), out.data_ptr<float>(), T, N, H, reverse, gh.data_ptr<float>(), &in,
              scratch.data_ptr<float>());
    return {out, out[reverse ? 0 : T - 1].clone()};
  } else {
    auto c = c0.contiguous().clone();
    lstm_fused(p, nullptr, h.data_ptr<float>(), c.data_ptr<float>(), out.data_ptr<float>(), T, N, H, reverse,
               gh.data_ptr<float>(), &in, scratch.data_ptr<float>());
    return {out, out[reverse ? 0 : T - 1].clone(), c};
  }
}

std::vector<torch::Tensor> gru_layer(torch::Tensor x, torch::Tensor h0, torch::Tensor ih_index,
                                     torch::Tensor ih_values, torch::Tensor ih_offsets, torch::Tensor ih_counts,
                                     torch::Tensor ih_bias, torch::Tensor index, torch::Tensor values,
                                     torch::Tensor offsets, torch::Tensor counts, torch::Tensor bias, bool reverse) {
  return layer<3>(x, h0, torch::Tensor(), ih_index, ih_values, ih_offsets, ih_counts, ih_bias, index, values,
                  offsets, counts, bias, reverse);
}

std::vector<torch::Tensor> lstm_layer(torch::Tensor x, torch::Tensor h0, torch::Tensor c0, torch::Tensor ih_index,
                                      torch::Tensor ih_values, torch::Tensor ih_offsets, torch::Tensor ih_counts,
                                      torch::Tensor ih_bias, torch::Tensor index, torch::Tensor values,
                                      torch::Tensor offsets, torch::Tensor counts, torch::Tensor bias,
                                      bool reverse) {
  return layer<4>(x, h0, c0, ih_index, ih_values, ih_offsets, ih_counts, ih_bias, index, values, offsets, counts,
                  bias, reverse);
}

// The chunk bounds over row blocks for n_rows inputs (one slab of bsmm, a bsmm_t product, or a recurrent step's
// product), for tests and tuning.
std::vector<int64_t> product_chunks(torch::Tensor counts, int64_t r, int64_t n_rows) {
  counts = counts.contiguous();
  return balanced_bounds(block_work(counts.data_ptr<int64_t>(), counts.numel(), r, n_rows));
}

int64_t threads_compiled() {
#ifdef _OPENMP
  return at::get_num_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bsmm", checked_widening(&bsmm), "block-sparse x @ W.T + b");
  m.def("bsmm_t", checked_widening(&bsmm_t), "block-sparse xt.T @ W.T + b from transposed inputs xt");
  m.def("gru_sequence", checked_widening(&gru_sequence), "GRU layer with a block-sparse hidden matrix");
  m.def("lstm_sequence", checked_widening(&lstm_sequence), "LSTM layer with a block-sparse hidden matrix");
  m.def("gru_layer", checked_widening(&gru_layer), "GRU layer from its inputs, both matrices block-sparse");
  m.def("lstm_layer", checked_widening(&lstm_layer), "LSTM layer from its inputs, both matrices block-sparse");
  m.def("threads_compiled", &threads_compiled, "threads a product may use (1 without OpenMP)");
  m.def("product_chunks", &product_chunks, "chunk bounds over row blocks of one product");
  m.def("set_slab_floats", &set_slab_floats, "input floats per slab of a product (for tuning)");
  m.def("set_slab_floats_t", &set_slab_floats_t,
        "bsmm_t: input floats per slab, from how many input floats and kept weights per input it slabs (tuning)");
  m.def("set_batch_split_rows", &set_batch_split_rows, "inputs per thread from which sequences split the batch");
}
"""

# OpenMP for the threads; the same libgomp soname torch links, so torch's own runtime (and its
# set_num_threads) serves the kernel: no second thread pool. -fno-trapping-math lets gcc vectorise the gate
# loops (their selects); it changes no result (no reassociation, unlike -ffast-math).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]


def cpu_flags() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


# The compiler's macro for an instruction set -> the /proc/cpuinfo flag a CPU needs to run code that uses it.
_ISA_FLAGS = {
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__BMI2__": "bmi2",
    "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512BF16__": "avx512_bf16", "__AMX_TILE__": "amx_tile",
}


def target_problem(march: str) -> str:
    """Why code built with ``-march=march`` would not run on this CPU (empty when it would, or when the compiler
    or ``/proc/cpuinfo`` cannot say): it would die of an illegal instruction instead of raising an error."""
    if march == "native":
        return ""
    flags = set(cpu_flags().split(":", 1)[-1].split())
    if not flags:
        return ""
    try:
        done = subprocess.run(
            [os.environ.get("CXX", "c++"), f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    defined = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    missing = sorted(flag for macro, flag in _ISA_FLAGS.items() if macro in defined and flag not in flags)
    return f"-march={march} uses {', '.join(missing)}, which this CPU lacks" if missing else ""


def extension_name(march: str = "native") -> str:
    """The cache name: the version, this CPU (``-march=native`` code must not run on another CPU) and ``march``."""
    flags = cpu_flags()
    digest = hashlib.sha256(f"{cpu_model()}|{flags}|{torch.__version__}".encode()).hexdigest()[:10]
    target = "" if march == "native" else "_" + "".join(c if c.isalnum() else "_" for c in march)
    return f"admmcompress_blocksparse_v{VERSION}_{digest}{target}"


# Without OpenMP (a compiler without its runtime): the same kernel on one thread, under its own cache name.
SERIAL_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math"]


MARCH_ENV = "ADMMCOMPRESS_KERNEL_MARCH"
# Read once, when admmcompress is imported: load() runs on every product, and an environment lookup cost more than
# a microsecond of a 15-microsecond one (2026-12).
DEFAULT_MARCH = os.environ.get(MARCH_ENV) or "native"


def load(verbose: bool = False, march: str | None = None) -> ModuleType | None:
    """The compiled kernel module, built on first use (about a minute); ``None`` if it cannot be built.

    Tried with OpenMP first, then without (one thread, with a warning); the torch path covers the rest.
    ``march`` is gcc's ``-march``; by default ``$ADMMCOMPRESS_KERNEL_MARCH`` as it was when admmcompress was
    imported, else ``"native"``: the widest
    vectors this CPU has. Another target builds, on this machine, the code that CPU family gets: e.g.
    ``"haswell"`` for the AVX2 path on an AVX-512 machine (the tests check both paths wherever the CPU runs
    them; the benchmarks time the AVX2 path there with the variable set).
    """
    return _build(verbose, march or DEFAULT_MARCH)


_BUILT: dict[str, ModuleType | None] = {}  # by march; an error is not kept, so it is raised again next time
_BUILD_LOCK = threading.Lock()  # threads that load at once wait for one build instead of each compiling


def _build(verbose: bool, march: str) -> ModuleType | None:
    try:
        return _BUILT[march]
    except KeyError:
        pass
    with _BUILD_LOCK:
        if march not in _BUILT:
            _BUILT[march] = _compile(verbose, march)
        return _BUILT[march]


def _compile(verbose: bool, march: str) -> ModuleType | None:
    if not all(c.isalnum() or c in "-_." for c in march):
        raise ValueError(
            f"blocksparse_cpp: march={march!r} is not a gcc -march name; use e.g. 'native' or 'haswell'"
            f" (argument or ${MARCH_ENV})"
        )
    problem = target_problem(march)
    if problem:
        raise ValueError(f"blocksparse_cpp: {problem}; use 'native' or an older target (argument or ${MARCH_ENV})")
    errors = []
    for suffix, cflags, ldflags in (("", CFLAGS, LDFLAGS), ("_serial", SERIAL_CFLAGS, [])):
        cflags = [f"-march={march}" if flag == "-march=native" else flag for flag in cflags]
        try:
            from torch.utils.cpp_extension import load_inline

            module = load_inline(
                name=extension_name(march) + suffix,
                cpp_sources=[SOURCE],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                verbose=verbose,
            )
        except Exception as err:  # no compiler, no headers, no OpenMP runtime
            errors.append(f"{type(err).__name__}: {err}")
            continue
        if errors:
            warnings.warn(
                f"block-sparse C++ kernel built without OpenMP ({errors[0]}): it runs on one thread",
                RuntimeWarning,
                stacklevel=4,  # load()'s caller
            )
        fit_caches(module)
        return module
    warnings.warn(
        f"block-sparse C++ kernel unavailable ({errors[-1]}); using torch ops", RuntimeWarning, stacklevel=4
    )
    return None


# bsmm_t (the im2col product) reads its input in place while it stays in the L3 cache between row blocks and slab by
# slab through a copy beyond: on a 32 MiB L3, in place ran as fast as in cache up to 36 MiB of inputs and 1.3-4.4x
# slower than slabs from 72 MiB on (benchmarks/records/blocksparse_bsmm_t_slabs, AMD EPYC, 2026-12). Where the
# L3 is larger (260 MiB on some Xeons) the same matrix stays in cache, so the switch scales with the L3 read here.
SLABS_T_FROM_L3 = 2  # the switch, in multiples of the L3 size
SLABS_T_FROM_FLOATS = 1 << 24  # 64 MiB of inputs (twice the L3 it was measured on) where no L3 size is reported


def slabs_t_from_floats(l3: int) -> int:
    """Input floats from which ``bsmm_t`` goes slab by slab, for an L3 of ``l3`` bytes (0: not known).

    >>> slabs_t_from_floats(32 << 20), slabs_t_from_floats(260 << 20), slabs_t_from_floats(0)
    (16777216, 136314880, 16777216)
    """
    return SLABS_T_FROM_L3 * l3 // 4 if l3 > 0 else SLABS_T_FROM_FLOATS


def fit_caches(module: ModuleType, l3: int | None = None) -> None:
    """Set the built kernel's cache-dependent switch for this machine's L3 (``l3`` bytes; read here by default).
    A module without the setter (a test's stand-in for the build) is left as it is."""
    if not hasattr(module, "set_slab_floats_t"):
        return
    slab, _, kept = module.set_slab_floats_t(1, 0, 0)  # the current values, put back but for the switch
    module.set_slab_floats_t(slab, slabs_t_from_floats(l3_bytes() if l3 is None else l3), kept)


def available() -> bool:
    """Whether the compiled kernel can be used here (builds it if needed)."""
    return load() is not None


def supports(matrix: torch.nn.Module) -> bool:
    """The kernel runs ``gather``/``cpp`` matrices with one bucket (the packed layout it reads), float32 or
    float16 weights (``values_dtype``) and a float32 bias (not after ``model.half()``)."""
    buffers = getattr(matrix, "_buffers", {})
    bias = buffers.get("bias0")
    return (
        getattr(matrix, "impl", None) in ("gather", "cpp")
        and getattr(matrix, "n_buckets", 0) == 1
        and buffers.get("values0") is not None
        and buffers["values0"].dtype in (torch.float32, torch.float16)
        and (bias is None or bias.dtype == torch.float32)
    )


def counts_of(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Kept columns per row block: the slots before the trailing padding (index 0 and all-zero weights)."""
    blocks, k = values.shape[0], values.shape[1]
    used = (index.view(blocks, k) != 0) | (values != 0).any(2)
    slots = torch.arange(1, k + 1, device=values.device).expand(blocks, k)
    return torch.where(used, slots, torch.zeros_like(slots)).amax(1).contiguous()


# A kernel copy of the weights without the padding is kept when the padding is more than this share of the
# slots: the padding breaks the stream of weights a product reads into one run per row block, and the
# hardware prefetcher restarts at each; cold-cache batch-1 products at 10x (global top-k, 16 x 64 blocks, 20-30%
# padding) ran 1.3-1.7x faster from an unpadded layout here (AMD EPYC, 2026-12). It costs the weights' memory.
COMPACT_ABOVE = 0.05


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; ``None`` for inference tensors, which have none (and can be written in
    place under ``torch.inference_mode``)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def packed(
    matrix: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, values, offsets, counts, bias)``: the kernel's arguments for a supported matrix.

    Row block ``b`` keeps ``counts[b]`` columns, ``index[offsets[b]:][:counts[b]]`` (int32), with weights
    ``values[offsets[b]:][:counts[b]]`` (``(slots, r)``); ``bias`` is flattened (empty when there is none).
    ``values`` is the saved buffer ``values0`` itself, or a copy without its padding (``COMPACT_ABOVE``).

    The arguments are kept on the matrix (not saved) and rebuilt, the kept-column counts included,
    whenever ``index0``, ``values0`` or ``bias0`` is another tensor or was written in place: at batch 1 the
    product takes microseconds, so they are not rebuilt per call. Inference tensors have no write counter to tell:
    buffers that are (made or loaded under ``torch.inference_mode`` other than by ``BlockSparseMatrix`` and
    ``load_state_dict``, which drop the arguments) have them rebuilt on every call.
    """
    buffers = matrix._buffers
    index, values, bias = buffers["index0"], buffers["values0"], buffers["bias0"]
    versions = (_version(index), _version(values), -1 if bias is None else _version(bias))
    kept = matrix.__dict__.get("_kernel_args")
    if kept is not None and kept[0] is index and kept[1] is values and kept[2] is bias and kept[3] == versions:
        return kept[4]
    counts = counts_of(index, values)  # derived again: a new pattern must not be read with old counts
    blocks, slots, r = values.shape
    flat = bias.reshape(-1) if bias is not None else values.new_empty(0)
    if int(counts.sum()) < (1.0 - COMPACT_ABOVE) * blocks * slots:
        used = torch.arange(slots, device=counts.device).view(1, slots) < counts.view(-1, 1)
        args = (
            index.view(blocks, slots)[used].to(torch.int32).contiguous(),
            values[used].contiguous(),
            torch.cumsum(counts, 0) - counts,
            counts,
            flat,
        )
    else:
        offsets = torch.arange(blocks, dtype=torch.int64, device=counts.device) * slots
        args = (index.to(torch.int32).contiguous(), values.view(blocks * slots, r), offsets, counts, flat)
    # not a buffer, not pickled; None, which no versions tuple equals, where a counter cannot be read (the check
    # above then rebuilds each call, at no cost to buffers that have counters)
    stamp = None if None in versions else versions
    matrix.__dict__["_kernel_args"] = (index, values, bias, stamp, args)
    return args


__all__ = [
    "CFLAGS",
    "COMPACT_ABOVE",
    "DEFAULT_MARCH",
    "LDFLAGS",
    "SERIAL_CFLAGS",
    "MARCH_ENV",
    "SLABS_T_FROM_FLOATS",
    "SLABS_T_FROM_L3",
    "SOURCE",
    "VERSION",
    "available",
    "cpu_flags",
    "counts_of",
    "extension_name",
    "fit_caches",
    "load",
    "packed",
    "slabs_t_from_floats",
    "supports",
    "target_problem",
]

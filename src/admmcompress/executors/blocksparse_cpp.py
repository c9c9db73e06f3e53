"""An optional compiled kernel for the block-sparse executor: whole GRU/LSTM sequences in C++.

At batch 1 a recurrent step is a few hundred thousand multiply-adds, so the Python/dispatcher
overhead of ~10 small torch ops per step, not arithmetic, bounds the torch implementation. This
module compiles (once, with the system C++ compiler through ``torch.utils.cpp_extension``; cached
in ``~/.cache/torch_extensions``) a kernel that runs the whole sequence loop in C++: per step one
packed block-sparse product (row block by row block, each kept column's ``r`` weights contiguous,
so the inner loop is one SIMD multiply-add per column) and the gate arithmetic through vectorised
ATen ops. It is opt-in (``kernel="cpp"``) because compiling takes a minute; ``available()`` says
whether it can be built here, and every caller falls back to the torch path otherwise.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// One row block for n_rows inputs: out[n, j] = bias[j] + sum_k x[n, idx[k]] * v[k, j], j < R (R fixed:
// the accumulator stays in registers and the j loop is one SIMD multiply-add per kept column).
template <int R>
static void block_rows_fixed(const float* __restrict x, int64_t n_rows, int64_t in_features,
                             const int64_t* __restrict idx, const float* __restrict v, const float* bias,
                             int64_t K, float* __restrict out, int64_t out_stride) {
  int64_t n = 0;
  for (; n + 4 <= n_rows; n += 4) {  // four inputs at a time: each kept column's weights are loaded once
    const float* __restrict x0 = x + n * in_features;
    float acc[4][R];
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < R; ++j) acc[q][j] = bias ? bias[j] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t col = idx[k];
      const float* __restrict vk = v + k * R;
      for (int q = 0; q < 4; ++q) {
        const float xv = x0[q * in_features + col];
#pragma omp simd
        for (int j = 0; j < R; ++j) acc[q][j] += xv * vk[j];
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < R; ++j) out[(n + q) * out_stride + j] = acc[q][j];
  }
  for (; n < n_rows; ++n) {
    const float* __restrict xn = x + n * in_features;
    float acc[R];
    for (int j = 0; j < R; ++j) acc[j] = bias ? bias[j] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = xn[idx[k]];
      const float* __restrict vk = v + k * R;
#pragma omp simd
      for (int j = 0; j < R; ++j) acc[j] += xv * vk[j];
    }
    float* o = out + n * out_stride;
    for (int j = 0; j < R; ++j) o[j] = acc[j];
  }
}

static void block_rows_any(const float* __restrict x, int64_t n_rows, int64_t in_features,
                           const int64_t* __restrict idx, const float* __restrict v, const float* bias,
                           int64_t K, int64_t r, float* __restrict out, int64_t out_stride) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const float* __restrict xn = x + n * in_features;
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

// out[n, b*r + j] = bias[b*r + j] + sum_k x[n, index[b*K + k]] * values[b, k, j]   (out: N x nb*r)
static void block_mm(const float* x, int64_t n_rows, int64_t in_features, const int64_t* index,
                     const float* values, const float* bias, int64_t nb, int64_t K, int64_t r, float* out) {
  const int64_t width = nb * r;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * r * n_rows));
  at::parallel_for(0, nb, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* idx = index + b * K;
      const float* v = values + b * K * r;
      const float* bb = bias ? bias + b * r : nullptr;
      float* o = out + b * r;
      if (r == 16) block_rows_fixed<16>(x, n_rows, in_features, idx, v, bb, K, o, width);
      else if (r == 8) block_rows_fixed<8>(x, n_rows, in_features, idx, v, bb, K, o, width);
      else if (r == 32) block_rows_fixed<32>(x, n_rows, in_features, idx, v, bb, K, o, width);
      else block_rows_any(x, n_rows, in_features, idx, v, bb, K, r, o, width);
    }
  });
}

torch::Tensor bsmm(torch::Tensor x, torch::Tensor index, torch::Tensor values, torch::Tensor bias,
                   int64_t out_features) {
  x = x.contiguous();
  const int64_t nb = values.size(0), K = values.size(1), r = values.size(2);
  auto out = torch::empty({x.size(0), nb * r}, x.options());
  block_mm(x.data_ptr<float>(), x.size(0), x.size(1), index.data_ptr<int64_t>(), values.data_ptr<float>(),
           bias.numel() ? bias.data_ptr<float>() : nullptr, nb, K, r, out.data_ptr<float>());
  return nb * r == out_features ? out : out.narrow(1, 0, out_features).contiguous();
}

// GRU over gi (T, N, 3H) (input part incl. b_ih), h0 (N, H); the hidden product is block-sparse.
std::vector<torch::Tensor> gru_sequence(torch::Tensor gi, torch::Tensor h0, torch::Tensor index,
                                        torch::Tensor values, torch::Tensor bias, bool reverse) {
  const int64_t T = gi.size(0), N = gi.size(1), H = h0.size(1);
  const int64_t nb = values.size(0), K = values.size(1), r = values.size(2);
  auto out = torch::empty({T, N, H}, h0.options());
  auto h = h0.contiguous().clone();
  auto gh = torch::empty({N, nb * r}, h0.options());
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    block_mm(h.data_ptr<float>(), N, H, index.data_ptr<int64_t>(), values.data_ptr<float>(),
             bias.numel() ? bias.data_ptr<float>() : nullptr, nb, K, r, gh.data_ptr<float>());
    auto g = gi[t];
    auto rz = torch::sigmoid(g.narrow(1, 0, 2 * H) + gh.narrow(1, 0, 2 * H));
    auto cand = torch::tanh(
        torch::addcmul(g.narrow(1, 2 * H, H), rz.narrow(1, 0, H), gh.narrow(1, 2 * H, H)));
    h = torch::lerp(cand, h, rz.narrow(1, H, H));
    out[t].copy_(h);
  }
  return {out, h};
}

// LSTM over gi (T, N, 4H), (h0, c0) (N, H); gate order i, f, g, o.
std::vector<torch::Tensor> lstm_sequence(torch::Tensor gi, torch::Tensor h0, torch::Tensor c0,
                                         torch::Tensor index,
                                         torch::Tensor values, torch::Tensor bias, bool reverse) {
  const int64_t T = gi.size(0), N = gi.size(1), H = h0.size(1);
  const int64_t nb = values.size(0), K = values.size(1), r = values.size(2);
  auto out = torch::empty({T, N, H}, h0.options());
  auto h = h0.contiguous().clone();
  auto c = c0.contiguous().clone();
  auto gh = torch::empty({N, nb * r}, h0.options());
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    block_mm(h.data_ptr<float>(), N, H, index.data_ptr<int64_t>(), values.data_ptr<float>(),
             bias.numel() ? bias.data_ptr<float>() : nullptr, nb, K, r, gh.data_ptr<float>());
    auto gates = gi[t] + gh.narrow(1, 0, 4 * H);
    auto sg = torch::sigmoid(gates);
    c = torch::addcmul(sg.narrow(1, H, H) * c, sg.narrow(1, 0, H), torch::tanh(gates.narrow(1, 2 * H, H)));
    h = (sg.narrow(1, 3 * H, H) * torch::tanh(c)).contiguous();
    out[t].copy_(h);
  }
  return {out, h, c};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bsmm", &bsmm, "block-sparse x @ W.T + b");
  m.def("gru_sequence", &gru_sequence, "GRU layer with a block-sparse hidden matrix");
  m.def("lstm_sequence", &lstm_sequence, "LSTM layer with a block-sparse hidden matrix");
}
"""


@functools.lru_cache(maxsize=1)
def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, built on first use (about a minute); ``None`` if it cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="admmcompress_blocksparse_v3",
            cpp_sources=[SOURCE],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
            verbose=verbose,
        )
    except Exception as err:  # no compiler, no headers: the torch path still works
        warnings.warn(
            f"block-sparse C++ kernel unavailable ({type(err).__name__}: {err}); using torch ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def available() -> bool:
    """Whether the compiled kernel can be used here (builds it if needed)."""
    return load() is not None


def supports(matrix: torch.nn.Module) -> bool:
    """The kernel runs float32 ``gather``/``cpp`` matrices with one bucket (the packed layout it reads)."""
    buffers = getattr(matrix, "_buffers", {})
    return (
        getattr(matrix, "impl", None) in ("gather", "cpp")
        and getattr(matrix, "n_buckets", 0) == 1
        and buffers.get("values0") is not None
        and buffers["values0"].dtype == torch.float32
    )


def packed(matrix: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, values, bias)`` of a supported matrix, bias flattened (empty when there is none)."""
    buffers = matrix._buffers
    bias = buffers["bias0"]
    bias = bias.reshape(-1) if bias is not None else buffers["values0"].new_empty(0)
    return buffers["index0"], buffers["values0"], bias


__all__ = ["SOURCE", "available", "load", "packed", "supports"]

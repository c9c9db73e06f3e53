// EXPERIMENT: One input: four partial sums over k; PF: prefetch distance in floats (0 = none), LOC: locality.
// STREAMS: 1 (sequential), 2 (two halves of the kept columns side by side), 4 (quarters).
#ifndef PF
#define PF 0
#endif
#ifndef LOC
#define LOC 0
#endif
#ifndef STREAMS
#define STREAMS 1
#endif
template <int R>
static inline void block_one_input(const float* __restrict xn, const int32_t* __restrict idx,
                                   const float* __restrict v, const float* bias, int64_t K, float* __restrict o) {
  float acc[4][R];
  for (int q = 0; q < 4; ++q)
    for (int j = 0; j < R; ++j) acc[q][j] = 0.f;
  int64_t k = 0;
#if STREAMS == 1
  for (; k + 4 <= K; k += 4) {
#if PF > 0
    for (int l = 0; l < 4 * R; l += 16) __builtin_prefetch(v + k * R + PF + l, 0, LOC);
    __builtin_prefetch(idx + k + PF / R, 0, LOC);
#endif
    for (int q = 0; q < 4; ++q) {
      const float xv = xn[idx[k + q]];
      const float* __restrict vk = v + (k + q) * R;
#pragma omp simd
      for (int j = 0; j < R; ++j) acc[q][j] += xv * vk[j];
    }
  }
#else
  constexpr int S = STREAMS, PER = 4 / S;  // S streams, PER consecutive columns of each per step
  const int64_t part = K / 4 * 4 / S;      // columns per stream, a multiple of PER
  for (int64_t i = 0; i < part; i += PER) {
    for (int s = 0; s < S; ++s)
      for (int u = 0; u < PER; ++u) {
        const int64_t kk = s * part + i + u;
        const float xv = xn[idx[kk]];
        const float* __restrict vk = v + kk * R;
#pragma omp simd
        for (int j = 0; j < R; ++j) acc[s * PER + u][j] += xv * vk[j];
      }
  }
  k = S * part;
#endif
  for (; k < K; ++k) {
    const float xv = xn[idx[k]];
    const float* __restrict vk = v + k * R;
#pragma omp simd
    for (int j = 0; j < R; ++j) acc[0][j] += xv * vk[j];
  }
  for (int j = 0; j < R; ++j) o[j] = (bias ? bias[j] : 0.f) + ((acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]));
}


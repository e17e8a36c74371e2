// out[m, n] (+)= sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows of x: the matrix-vector
// products of a decode step, where the weight is read once per step and memory bandwidth is
// the limit. x, bias and out are float32; w is float32 or bfloat16 (widened in registers).
//
// One weight row at a time, read front to back, feeding up to 8 rows of x (a few KiB, in L1).
// NOTE: interleaving the loads of 4 weight rows (a 4-row register tile, the usual GEMM shape)
// halved the read rate on one core (Zen 5: 15.9 vs 28-30 GB/s on a 113 MB matrix, the rate of a
// plain sum): the hardware prefetcher follows one sequential stream far better than four
// streams a row apart. Rows [n_begin, n_end) of w are this call's share; the caller splits n
// across threads.
#pragma once

#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// MR rows of x against one weight row; U independent accumulators per x row hide the FMA latency.
// U is the same for every MR: the summation order, hence every bit of a row's result, does not
// depend on how many rows share the call (mixed-budget batches rely on it).
template <int MR, typename T>
inline void linear_row(const float* x, int64_t x_stride, const T* wr, int64_t K, float* sums) {
  constexpr int W = kVecWidth;
  constexpr int U = 2;
  vfloat acc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = vsplat(0.f);
  int64_t k = 0;
  for (; k + U * W <= K; k += U * W) {
    for (int u = 0; u < U; ++u) {
      const vfloat wv = vload(wr + k + u * W);
      for (int i = 0; i < MR; ++i) acc[i][u] += wv * vload(x + i * x_stride + k + u * W);
    }
  }
  for (; k + W <= K; k += W) {
    const vfloat wv = vload(wr + k);
    for (int i = 0; i < MR; ++i) acc[i][0] += wv * vload(x + i * x_stride + k);
  }
  if (k < K) {
    const int rest = static_cast<int>(K - k);
    const vfloat wv = vload_partial(wr + k, rest);
    for (int i = 0; i < MR; ++i) acc[i][0] += wv * vload_partial(x + i * x_stride + k, rest);
  }
  for (int i = 0; i < MR; ++i) {
    vfloat s = acc[i][0];
    for (int u = 1; u < U; ++u) s += acc[i][u];
    sums[i] = vsum(s);
  }
}

template <int MR, typename T>
inline void linear_rows_mr(const float* x, int64_t x_stride, const T* w, int64_t K, const float* bias, float* out,
                           int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  float sums[MR];
  for (int64_t n = n_begin; n < n_end; ++n) {
    linear_row<MR>(x, x_stride, w + n * K, K, sums);
    const float b = bias ? bias[n] : 0.f;
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * out_stride + n;
      *o = accumulate ? *o + sums[i] + b : sums[i] + b;
    }
  }
}

template <typename T>
inline void linear_rows_impl(const float* x, int64_t x_stride, int64_t M, const T* w, int64_t K, const float* bias,
                             float* out, int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  // More than 8 rows of x: weight rows in blocks that stay in L1 while every group of 8 passes.
  const int64_t block =
      M <= 8 ? n_end - n_begin : std::max<int64_t>(4, 16 * 1024 / (K * static_cast<int64_t>(sizeof(T))));
  for (int64_t nb = n_begin; nb < n_end; nb += block) {
    const int64_t ne = std::min(n_end, nb + block);
    for (int64_t m = 0; m < M; m += 8) {
      const float* xm = x + m * x_stride;
      float* om = out + m * out_stride;
      switch (std::min<int64_t>(8, M - m)) {
#define BALCONY_LINEAR_CASE(R) \
  case R: linear_rows_mr<R>(xm, x_stride, w, K, bias, om, out_stride, accumulate, nb, ne); break;
        BALCONY_LINEAR_CASE(1) BALCONY_LINEAR_CASE(2) BALCONY_LINEAR_CASE(3) BALCONY_LINEAR_CASE(4)
        BALCONY_LINEAR_CASE(5) BALCONY_LINEAR_CASE(6) BALCONY_LINEAR_CASE(7) BALCONY_LINEAR_CASE(8)
#undef BALCONY_LINEAR_CASE
        default: break;
      }
    }
  }
}

void linear_rows(ScalarKind wkind, const float* x, int64_t x_stride, int64_t M, const void* w, int64_t K,
                 const float* bias, float* out, int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  if (wkind == ScalarKind::BF16)
    linear_rows_impl(x, x_stride, M, static_cast<const bf16_t*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
  else
    linear_rows_impl(x, x_stride, M, static_cast<const float*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

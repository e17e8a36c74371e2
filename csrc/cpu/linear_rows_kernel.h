// out[m, n] (+)= sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows of x: the matrix-vector
// products of a decode step, where the weight is read once per step and memory bandwidth is
// the limit. x, bias and out are float32; w is float32 or bfloat16 (widened in registers).
//
// Tiles of NR weight rows x MR rows of x, NR * MR vector accumulators: each weight vector loaded
// from memory feeds MR fused multiply-adds; the x rows (a few KiB) stay in L1. Rows
// [n_begin, n_end) of w are this call's share; the caller splits n across threads.
#pragma once

#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

template <int MR, int NR, typename T>
inline void linear_tile(const float* x, int64_t x_stride, const T* w, int64_t K, const float* bias, float* out,
                        int64_t out_stride, bool accumulate, int64_t n) {
  constexpr int W = kVecWidth;
  vfloat acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vsplat(0.f);
  const T* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + (n + j) * K;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vfloat wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload(wr[j] + k);
    for (int i = 0; i < MR; ++i) {
      const vfloat xv = vload(x + i * x_stride + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += wv[j] * xv;
    }
  }
  if (k < K) {
    const int rest = static_cast<int>(K - k);
    vfloat wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload_partial(wr[j] + k, rest);
    for (int i = 0; i < MR; ++i) {
      const vfloat xv = vload_partial(x + i * x_stride + k, rest);
      for (int j = 0; j < NR; ++j) acc[i][j] += wv[j] * xv;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[i][j]);
      if (bias) s += bias[n + j];
      float* o = out + i * out_stride + n + j;
      *o = accumulate ? *o + s : s;
    }
}

template <int MR, typename T>
inline void linear_rows_mr(const float* x, int64_t x_stride, const T* w, int64_t K, const float* bias, float* out,
                           int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) linear_tile<MR, 4>(x, x_stride, w, K, bias, out, out_stride, accumulate, n);
  for (; n < n_end; ++n) linear_tile<MR, 1>(x, x_stride, w, K, bias, out, out_stride, accumulate, n);
}

template <typename T>
inline void linear_rows_impl(const float* x, int64_t x_stride, int64_t M, const T* w, int64_t K, const float* bias,
                             float* out, int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  // Weight rows in blocks that stay in L1 while every group of 4 x rows passes over them.
  const int64_t block = std::max<int64_t>(4, (16 * 1024 / (K * static_cast<int64_t>(sizeof(T)))) / 4 * 4);
  for (int64_t nb = n_begin; nb < n_end; nb += block) {
    const int64_t ne = std::min(n_end, nb + block);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      linear_rows_mr<4>(x + m * x_stride, x_stride, w, K, bias, out + m * out_stride, out_stride, accumulate, nb, ne);
    const float* xm = x + m * x_stride;
    float* om = out + m * out_stride;
    switch (M - m) {
      case 3: linear_rows_mr<3>(xm, x_stride, w, K, bias, om, out_stride, accumulate, nb, ne); break;
      case 2: linear_rows_mr<2>(xm, x_stride, w, K, bias, om, out_stride, accumulate, nb, ne); break;
      case 1: linear_rows_mr<1>(xm, x_stride, w, K, bias, om, out_stride, accumulate, nb, ne); break;
      default: break;
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

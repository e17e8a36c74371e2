// out[m, n] (+)= sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows of x: the matrix-vector
// products of a decode step, where the weight is read once per step and memory bandwidth is
// the limit. x, bias and out are float32; w is float32, bfloat16 (widened in registers) or Q8
// (int8 blocks of 32 with a float16 scale each, see balcony/dtypes.h: widened and scaled in registers).
//
// One weight row at a time, read front to back, feeding up to 8 rows of x (a few KiB, in L1).
// NOTE: interleaving the loads of 4 weight rows (a 4-row register tile, the usual GEMM shape)
// halved the read rate on one core (Zen 5: 15.9 vs 28-30 GB/s on a 113 MB matrix, the rate of a
// plain sum): the hardware prefetcher follows one sequential stream far better than four
// streams a row apart. Rows [n_begin, n_end) of w are this call's share; the caller splits n
// across threads.
#pragma once

#include <type_traits>

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

// The same for one Q8 weight row: per block of 32, the int8 values widened and multiplied by the
// block's scale, then the same accumulation as above (U accumulators, MR-independent order).
template <int MR>
inline void linear_row_q8(const float* x, int64_t x_stride, const uint8_t* wr, int64_t K, float* sums) {
  constexpr int W = kVecWidth;
  constexpr int U = 2;
  constexpr int PER_BLOCK = kQ8Block / W;  // vectors per block (2, 4 or 8)
  static_assert(PER_BLOCK % U == 0, "a block must fill whole accumulator rounds");
  const int8_t* q = reinterpret_cast<const int8_t*>(wr);
  const uint8_t* scales = wr + K;
  vfloat acc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = vsplat(0.f);
  constexpr int64_t CHUNK = 64;  // blocks whose scales are widened together (F16C, 8 at a time)
  float sc[CHUNK];
  const int64_t blocks = K / kQ8Block;
  for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {
    const int64_t nb = std::min(CHUNK, blocks - b0);
    halves_to_floats(scales + 2 * b0, sc, nb);
    for (int64_t j = 0; j < nb; ++j) {
      const vfloat s = vsplat(sc[j]);
      const int64_t k0 = (b0 + j) * kQ8Block;
      for (int v = 0; v < PER_BLOCK; ++v) {
        const int u = v % U;
        const vfloat wv = vload(q + k0 + v * W) * s;
        for (int i = 0; i < MR; ++i) acc[i][u] += wv * vload(x + i * x_stride + k0 + v * W);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    vfloat sum = acc[i][0];
    for (int u = 1; u < U; ++u) sum += acc[i][u];
    sums[i] = vsum(sum);
  }
}

template <int MR, typename T>
inline void linear_rows_mr(const float* x, int64_t x_stride, const T* w, int64_t K, const float* bias, float* out,
                           int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  float sums[MR];
  for (int64_t n = n_begin; n < n_end; ++n) {
    if constexpr (std::is_same_v<T, uint8_t>)
      linear_row_q8<MR>(x, x_stride, w + n * q8_row_bytes(K), K, sums);
    else
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
  const int64_t row_bytes = std::is_same_v<T, uint8_t> ? q8_row_bytes(K) : K * static_cast<int64_t>(sizeof(T));
  const int64_t block = M <= 8 ? n_end - n_begin : std::max<int64_t>(4, 16 * 1024 / row_bytes);
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
  else if (wkind == ScalarKind::Q8)
    linear_rows_impl(x, x_stride, M, static_cast<const uint8_t*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
  else
    linear_rows_impl(x, x_stride, M, static_cast<const float*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

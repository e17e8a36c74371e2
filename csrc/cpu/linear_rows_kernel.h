// out[m, n] (+)= sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows of x: the matrix-vector
// products of a decode step, where the weight is read once per step and memory bandwidth is
// the limit. x, bias and out are float32; w is float32, bfloat16 (x is then first rounded to
// bfloat16, as a bfloat16 matmul does: every product is exact in float32), Q8
// (int8 blocks of 32 with a float16 scale each), Q4 (4-bit blocks of 32 with a float16 scale
// each) or Q4_1 (4-bit blocks of 32 with a float16 scale and minimum each, see balcony/dtypes.h).
// For the block formats, x is first rounded to int16 with one scale per row (relative error
// <= 2^-16 of the row's largest value) and each block's dot product is exact integer arithmetic,
// scaled once per block; Q4_1 adds each block's minimum times the block's sum of x (also exact).
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

// x rounded to int16 for Q8 weights: one scale per row, x16 = round(x / scale), scale = max|x| / 32767
// (0 for an all-zero row). Written out once per call and row; every row's rounding is its own.
inline void quantize_rows_i16(const float* x, int64_t x_stride, int64_t M, int64_t K, int16_t* xq, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * x_stride;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(r[k]));
    const float scale = amax / 32767.f;
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    int16_t* q = xq + m * K;
    for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int16_t>(std::nearbyint(r[k] * inv));
    xs[m] = scale;
  }
}

// sum over one block of 32 of w[k] * x[k] (int8 x int16 -> int32, exact), as float lanes to be scaled.
// AVX-512BW / AVX2: the weights sign-extended to int16 (vpmovsxbw), multiplied pairwise and summed
// into int32 (vpmaddwd): 2 instructions per 16 or 32 weights where widening to float took 4 per 16.
#if BALCONY_VEC_WIDTH == 16
typedef short v32hi_t __attribute__((vector_size(64)));
typedef char v32qi_t __attribute__((vector_size(32)));
typedef int v16si_t __attribute__((vector_size(64)));
inline v32hi_t widen_block(const int8_t* w) {
  v32qi_t b;
  std::memcpy(&b, w, 32);
  return (v32hi_t)__builtin_ia32_pmovsxbw512_mask(b, v32hi_t{}, 0xffffffffu);
}
// Q4 / Q4_1: 16 bytes -> 32 int16 values (low nibbles, then high nibbles, each minus Off: 8 for Q4,
// 0 for Q4_1) (zero-extension through the instruction's builtin: __builtin_convertvector from bytes
// compiled to scalar inserts, see vec.h)
template <int Off>
inline v32hi_t widen_block_q4(const uint8_t* p) {
  typedef char v16qi_t __attribute__((vector_size(16)));
  typedef short v16hi_t __attribute__((vector_size(32)));
  v16qi_t b;
  std::memcpy(&b, p, 16);
  const v16hi_t w = (v16hi_t)__builtin_ia32_pmovzxbw256(b);
  const v16hi_t lo = (w & 15) - static_cast<short>(Off), hi = (w >> 4) - static_cast<short>(Off);
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline vfloat block_dot(v32hi_t w16, const int16_t* x) {
  v32hi_t xv;
  std::memcpy(&xv, x, 64);
  return __builtin_convertvector((vint)__builtin_ia32_pmaddwd512_mask(w16, xv, v16si_t{}, 0xffff), vfloat);
}
#elif BALCONY_VEC_WIDTH == 8
typedef short v16hi_t __attribute__((vector_size(32)));
typedef char v16qi_t __attribute__((vector_size(16)));
struct v32hi_t { v16hi_t lo, hi; };
inline v32hi_t widen_block(const int8_t* w) {
  v16qi_t a, b;
  std::memcpy(&a, w, 16);
  std::memcpy(&b, w + 16, 16);
  return {(v16hi_t)__builtin_ia32_pmovsxbw256(a), (v16hi_t)__builtin_ia32_pmovsxbw256(b)};
}
template <int Off>
inline v32hi_t widen_block_q4(const uint8_t* p) {
  v16qi_t b;
  std::memcpy(&b, p, 16);
  const v16hi_t w = (v16hi_t)__builtin_ia32_pmovzxbw256(b);
  return {(w & 15) - static_cast<short>(Off), (w >> 4) - static_cast<short>(Off)};
}
inline vfloat block_dot(const v32hi_t& w16, const int16_t* x) {
  v16hi_t a, b;
  std::memcpy(&a, x, 32);
  std::memcpy(&b, x + 16, 32);
  const vint s = (vint)__builtin_ia32_pmaddwd256(w16.lo, a) + (vint)__builtin_ia32_pmaddwd256(w16.hi, b);
  return __builtin_convertvector(s, vfloat);
}
#else
struct v32hi_t { int16_t w[32]; };
inline v32hi_t widen_block(const int8_t* w) {
  v32hi_t out;
  for (int k = 0; k < 32; ++k) out.w[k] = w[k];
  return out;
}
template <int Off>
inline v32hi_t widen_block_q4(const uint8_t* p) {
  v32hi_t out;
  for (int i = 0; i < 16; ++i) out.w[i] = (p[i] & 15) - Off, out.w[16 + i] = (p[i] >> 4) - Off;
  return out;
}
inline vfloat block_dot(const v32hi_t& w16, const int16_t* x) {
  vint s{};
  for (int k = 0; k < kQ8Block; ++k) s[k % kVecWidth] += static_cast<int32_t>(w16.w[k]) * x[k];
  return __builtin_convertvector(s, vfloat);
}
#endif

// The block formats as weight element types (their storage is bytes; see balcony/dtypes.h).
struct q8_t { uint8_t byte; };
struct q4_t { uint8_t byte; };
struct q41_t { uint8_t byte; };
template <typename T> constexpr bool kNibbles = std::is_same_v<T, q4_t> || std::is_same_v<T, q41_t>;
template <typename T> constexpr bool kBlocks = std::is_same_v<T, q8_t> || kNibbles<T>;
template <typename T> inline int64_t row_bytes(int64_t K) {
  if constexpr (std::is_same_v<T, q8_t>) return q8_row_bytes(K);
  else if constexpr (std::is_same_v<T, q4_t>) return q4_row_bytes(K);
  else if constexpr (std::is_same_v<T, q41_t>) return q4_1_row_bytes(K);
  else return K * static_cast<int64_t>(sizeof(T));
}
// What a nibble stands for before the scale: v - 8 in Q4, v in Q4_1 (its minimum is added per block).
template <typename T> constexpr int kNibbleOffset = std::is_same_v<T, q4_t> ? 8 : 0;
// Block b of a row (its 32 values as int16).
template <typename T> inline auto widen_at(const uint8_t* wr, int64_t b) {
  if constexpr (std::is_same_v<T, q8_t>) return widen_block(reinterpret_cast<const int8_t*>(wr) + b * kQ8Block);
  else return widen_block_q4<kNibbleOffset<T>>(wr + b * (kQ8Block / 2));
}

// Q4_1: sum over a row's blocks of min[b] * (block b's sum of int16 x), for MR rows of x (xsum: each row's
// block sums, a row every xsum_stride(blocks) floats, zero past `blocks`), added to sums[] before the row
// scale. Whole vectors only: the minimums are zero-padded like the sums.
constexpr int64_t xsum_stride(int64_t blocks) { return (blocks + 15) / 16 * 16; }
template <int MR>
inline void add_block_minimums(const uint8_t* mins, const float* xsum, int64_t blocks, float* sums) {
  constexpr int64_t CHUNK = 64;
  const int64_t stride = xsum_stride(blocks);
  float mn[CHUNK];
  float acc[MR][4] = {};  // four running sums per row: a chain of dependent adds would be the cost
  for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {
    const int64_t nb = std::min(CHUNK, blocks - b0);
    halves_to_floats(mins + 2 * b0, mn, nb);
    for (int i = 0; i < MR; ++i) {
      const float* xr = xsum + i * stride + b0;
      int64_t j = 0;
      for (; j + 4 <= nb; j += 4)
        for (int u = 0; u < 4; ++u) acc[i][u] += mn[j + u] * xr[j + u];
      for (; j < nb; ++j) acc[i][0] += mn[j] * xr[j];
    }
  }
  for (int i = 0; i < MR; ++i) sums[i] += (acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3]);
}

// One Q8, Q4 or Q4_1 weight row against MR rows of x rounded to int16 (xq, per-row scales xs; xsum:
// their block sums, for Q4_1): per block, the exact integer dot product, converted and scaled by the
// block's weight scale into float accumulators (two, alternating blocks: the order does not depend
// on MR); Q4_1's minimum terms; the row scale at the end.
template <int MR, typename T>
inline void linear_row_blocks(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* wr, int64_t K,
                              float* sums) {
  const uint8_t* scales = wr + (std::is_same_v<T, q8_t> ? K : K / 2);
  vfloat acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vsplat(0.f);
  constexpr int64_t CHUNK = 64;  // blocks whose scales are widened together (F16C, 8 at a time)
  float sc[CHUNK];
  const int64_t blocks = K / kQ8Block;
  for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {
    const int64_t nb = std::min(CHUNK, blocks - b0);
    halves_to_floats(scales + 2 * b0, sc, nb);
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {  // two blocks per round, one accumulator each (compile-time indices:
      const int64_t k0 = (b0 + j) * kQ8Block;  // an index computed at run time spills them to memory)
      const auto w0 = widen_at<T>(wr, b0 + j), w1 = widen_at<T>(wr, b0 + j + 1);
      const vfloat s0 = vsplat(sc[j]), s1 = vsplat(sc[j + 1]);
      for (int i = 0; i < MR; ++i) {
        acc[i][0] += block_dot(w0, xq + i * K + k0) * s0;
        acc[i][1] += block_dot(w1, xq + i * K + k0 + kQ8Block) * s1;
      }
    }
    if (j < nb) {  // (b0 is even, so the odd block is the last of the row: the order is MR-independent)
      const int64_t k0 = (b0 + j) * kQ8Block;
      const auto w0 = widen_at<T>(wr, b0 + j);
      const vfloat s0 = vsplat(sc[j]);
      for (int i = 0; i < MR; ++i) acc[i][0] += block_dot(w0, xq + i * K + k0) * s0;
    }
  }
  for (int i = 0; i < MR; ++i) sums[i] = vsum(acc[i][0] + acc[i][1]);
  if constexpr (std::is_same_v<T, q41_t>) add_block_minimums<MR>(scales + 2 * blocks, xsum, blocks, sums);
  for (int i = 0; i < MR; ++i) sums[i] *= xs[i];
}

// Q4 on AVX-512: two blocks per step. Their 32 bytes widen to 32 int16 lanes in one instruction:
// lanes 0-15 block j's bytes, 16-31 block j+1's; the low nibbles hold columns 0-15 of each block and
// the high ones columns 16-31, so x is stored per pair of blocks in that order (permute_q4_pairs:
// x[0..15], x[32..47], x[16..31], x[48..63]) and two vpmaddwd give block j's sums in int32 lanes 0-7
// and block j+1's in lanes 8-15, scaled by one vector of the two scales. A row's odd last block is
// left in plain order and takes the one-block path.
#if BALCONY_VEC_WIDTH == 16
constexpr bool kQ4Pairs = true;
inline void permute_q4_pairs(int16_t* xq, int64_t M, int64_t K) {
  int16_t t[64];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 + 64 <= K; k0 += 64) {
      int16_t* r = xq + m * K + k0;
      std::memcpy(t, r, sizeof t);
      std::memcpy(r, t, 32), std::memcpy(r + 16, t + 32, 32), std::memcpy(r + 32, t + 16, 32),
          std::memcpy(r + 48, t + 48, 32);
    }
}
template <int MR, int A, int Off>
__attribute__((always_inline)) inline void q4_pair(const uint8_t* p, float s0, float s1, const int16_t* xq, int64_t K,
                                                vfloat (&acc)[MR][2]) {
  v32qi_t bytes;
  std::memcpy(&bytes, p, 32);
  const v32hi_t w = (v32hi_t)__builtin_ia32_pmovzxbw512_mask(bytes, v32hi_t{}, 0xffffffffu);
  const v32hi_t lo = (w & 15) - static_cast<short>(Off), hi = (w >> 4) - static_cast<short>(Off);
  // (a mask blend: built with a shuffle, GCC went through the stack and stalled store forwarding)
  const vfloat sv = __builtin_ia32_blendmps_512_mask(vsplat(s0), vsplat(s1), 0xff00);
  for (int i = 0; i < MR; ++i) {
    v32hi_t xl, xh;
    std::memcpy(&xl, xq + i * K, 64);
    std::memcpy(&xh, xq + i * K + 32, 64);
    const vint d = (vint)__builtin_ia32_pmaddwd512_mask(lo, xl, v16si_t{}, 0xffff) +
                   (vint)__builtin_ia32_pmaddwd512_mask(hi, xh, v16si_t{}, 0xffff);
    acc[i][A] += __builtin_convertvector(d, vfloat) * sv;
  }
}
template <int MR, typename T>
inline void linear_row_q4_pairs(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* wr, int64_t K,
                                float* sums) {
  constexpr int Off = kNibbleOffset<T>;
  const uint8_t* scales = wr + K / 2;
  vfloat acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vsplat(0.f);
  constexpr int64_t CHUNK = 64;
  float sc[CHUNK];
  const int64_t blocks = K / kQ8Block;
  for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {
    const int64_t nb = std::min(CHUNK, blocks - b0);
    halves_to_floats(scales + 2 * b0, sc, nb);
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      const int64_t b = b0 + j;
      q4_pair<MR, 0, Off>(wr + b * 16, sc[j], sc[j + 1], xq + b * kQ8Block, K, acc);
      q4_pair<MR, 1, Off>(wr + (b + 2) * 16, sc[j + 2], sc[j + 3], xq + (b + 2) * kQ8Block, K, acc);
    }
    if (j + 2 <= nb) {
      q4_pair<MR, 0, Off>(wr + (b0 + j) * 16, sc[j], sc[j + 1], xq + (b0 + j) * kQ8Block, K, acc);
      j += 2;
    }
    if (j < nb) {  // the row's odd last block, x in plain order
      const int64_t b = b0 + j;
      const auto w0 = widen_block_q4<Off>(wr + b * 16);
      const vfloat s0 = vsplat(sc[j]);
      for (int i = 0; i < MR; ++i) acc[i][1] += block_dot(w0, xq + i * K + b * kQ8Block) * s0;
    }
  }
  for (int i = 0; i < MR; ++i) sums[i] = vsum(acc[i][0] + acc[i][1]);
  if constexpr (std::is_same_v<T, q41_t>) add_block_minimums<MR>(scales + 2 * blocks, xsum, blocks, sums);
  for (int i = 0; i < MR; ++i) sums[i] *= xs[i];
}
#else
constexpr bool kQ4Pairs = false;
inline void permute_q4_pairs(int16_t*, int64_t, int64_t) {}
#endif

// bfloat16 weights: x rounded to bfloat16 (round to nearest even, as torch's .bfloat16()), once per call.
// Plain path: kept as float32 values in xr (M rows of K), for linear_row.
inline void round_rows_bf16(const float* x, int64_t x_stride, int64_t M, int64_t K, float* xr) {
  constexpr int W = kVecWidth;
  bf16_t h[W];
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * x_stride;
    float* o = xr + m * K;
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      vstore(h, vload(r + k));
      vstore(o + k, vload(h));
    }
    for (; k < K; ++k) o[k] = bf16_to_float(float_to_bf16(r[k]));
  }
}

#ifdef BALCONY_CPU_BF16_INSN
// The AVX512-BF16 path: x as bfloat16 rows of Kp = K rounded up to 32 (zero past K), and one weight row
// against MR of them with vdpbf16ps (32 products per instruction, each exact, summed in float32): half
// the instructions of widening to float, so twice the rate where the rows of x make the step compute-bound
// (batched decoding). Two accumulators per row alternate chunks of 32 columns: the order does not depend
// on MR. The row's last partial chunk is loaded masked (zeros past K: no stray NaN times a zero of x).
constexpr int64_t kBf16Chunk = 32;
inline int64_t bf16_row_stride(int64_t K) { return (K + kBf16Chunk - 1) / kBf16Chunk * kBf16Chunk; }
inline void round_rows_to_bf16(const float* x, int64_t x_stride, int64_t M, int64_t K, bf16_t* xb) {
  const int64_t Kp = bf16_row_stride(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * x_stride;
    bf16_t* o = xb + m * Kp;
    int64_t k = 0;
    for (; k + kVecWidth <= K; k += kVecWidth) vstore(o + k, vload(r + k));
    for (; k < K; ++k) o[k] = float_to_bf16(r[k]);
    for (; k < Kp; ++k) o[k] = bf16_t{0};
  }
}
// sums[i] = vsum(v[i]) for MR <= 8 vectors, bit for bit (every lane pair is added in vsum's halving order),
// with the shuffles shared: 8 vector adds for 8 sums where one at a time took 32 adds and extracts.
template <int MR>
inline void vsum_rows(const vfloat (&v)[MR][2], float* sums) {
  vfloat a[8];  // each row's two accumulators added (as the plain path does), zero past MR
  for (int i = 0; i < 8; ++i) a[i] = i < MR ? v[i < MR ? i : 0][0] + v[i < MR ? i : 0][1] : vsplat(0.f);
  vfloat h[4], q[2];
  for (int i = 0; i < 4; ++i)  // lanes 0-7: row 2i's v[j] + v[j + 8]; lanes 8-15: row 2i + 1's
    h[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // lanes 4r..4r+3: row 4i + r's halves of four (+4)
    q[i] = __builtin_shufflevector(h[2 * i], h[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(h[2 * i], h[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // lanes 2r, 2r + 1: row r's (+2), then the last pair
  const vfloat c = __builtin_shufflevector(q[0], q[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                   __builtin_shufflevector(q[0], q[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  typedef float v8 __attribute__((vector_size(32)));
  const v8 r = __builtin_shufflevector(c, c, 0, 2, 4, 6, 8, 10, 12, 14) +
               __builtin_shufflevector(c, c, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int i = 0; i < MR; ++i) sums[i] = r[i];
}

template <int MR>
inline void linear_row_bf16_insn(const bf16_t* xb, const bf16_t* wr, int64_t K, float* sums) {
  const int64_t Kp = bf16_row_stride(K);
  vfloat acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vsplat(0.f);
  v32bh wa, wb, xa, xc;
  int64_t k = 0;
  for (; k + 2 * kBf16Chunk <= K; k += 2 * kBf16Chunk) {
    std::memcpy(&wa, wr + k, sizeof wa), std::memcpy(&wb, wr + k + kBf16Chunk, sizeof wb);
    for (int i = 0; i < MR; ++i) {
      std::memcpy(&xa, xb + i * Kp + k, sizeof xa), std::memcpy(&xc, xb + i * Kp + k + kBf16Chunk, sizeof xc);
      acc[i][0] = dpbf16(acc[i][0], xa, wa);
      acc[i][1] = dpbf16(acc[i][1], xc, wb);
    }
  }
  for (; k < K; k += kBf16Chunk) {  // at most two chunks, the last maybe partial
    const int64_t n = std::min<int64_t>(kBf16Chunk, K - k);
    const unsigned mask = n == kBf16Chunk ? 0xffffffffu : (1u << n) - 1u;
    wa = __builtin_ia32_loaddquhi512_mask(reinterpret_cast<const short*>(wr + k), v32bh{}, mask);
    const int a = static_cast<int>((k / kBf16Chunk) & 1);
    for (int i = 0; i < MR; ++i) {
      std::memcpy(&xa, xb + i * Kp + k, sizeof xa);
      acc[i][a] = dpbf16(acc[i][a], xa, wa);
    }
  }
  vsum_rows<MR>(acc, sums);
}
#endif

// Calls f(std::integral_constant<int, R>{}, m) for each group of R <= 8 rows of x starting at row m:
// the row count as a compile-time constant, so that each group's accumulators stay in registers.
template <typename F>
inline void for_row_groups(int64_t M, F&& f) {
  for (int64_t m = 0; m < M; m += 8) {
    switch (std::min<int64_t>(8, M - m)) {
      case 1: f(std::integral_constant<int, 1>{}, m); break;
      case 2: f(std::integral_constant<int, 2>{}, m); break;
      case 3: f(std::integral_constant<int, 3>{}, m); break;
      case 4: f(std::integral_constant<int, 4>{}, m); break;
      case 5: f(std::integral_constant<int, 5>{}, m); break;
      case 6: f(std::integral_constant<int, 6>{}, m); break;
      case 7: f(std::integral_constant<int, 7>{}, m); break;
      case 8: f(std::integral_constant<int, 8>{}, m); break;
      default: break;
    }
  }
}

// Calls f(mr, m, nb, ne) for each block [nb, ne) of the weight rows [n_begin, n_end) and, within it, each
// group of up to 8 rows of x (see for_row_groups): past 8 rows of x, blocks of weight rows that stay in L1
// while every group passes (one block when M <= 8).
template <typename F>
inline void for_blocks(int64_t M, int64_t w_row_bytes, int64_t n_begin, int64_t n_end, F&& f) {
  const int64_t block = M <= 8 ? n_end - n_begin : std::max<int64_t>(4, 16 * 1024 / w_row_bytes);
  for (int64_t nb = n_begin; nb < n_end; nb += block) {
    const int64_t ne = std::min(n_end, nb + block);
    for_row_groups(M, [&](auto mr, int64_t m) { f(mr, m, nb, ne); });
  }
}

// sums[0..MR) of one weight row into MR rows of out (plus the bias; added to them with accumulate).
template <int MR>
inline void store_row(const float* sums, const float* bias, float* out, int64_t out_stride, bool accumulate,
                      int64_t n) {
  const float b = bias ? bias[n] : 0.f;
  for (int i = 0; i < MR; ++i) {
    float* o = out + i * out_stride + n;
    *o = accumulate ? *o + sums[i] + b : sums[i] + b;
  }
}

template <int MR, typename T>
inline void linear_rows_mr(const float* x, int64_t x_stride, const int16_t* xq, const float* xs, const float* xsum,
                           const T* w, int64_t K, const float* bias, float* out, int64_t out_stride, bool accumulate,
                           int64_t n_begin, int64_t n_end) {
  float sums[MR];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(w) + n * row_bytes<T>(K);
    if constexpr (kNibbles<T> && kQ4Pairs)
      linear_row_q4_pairs<MR, T>(xq, xs, xsum, wr, K, sums);
    else if constexpr (kBlocks<T>)
      linear_row_blocks<MR, T>(xq, xs, xsum, wr, K, sums);
    else
      linear_row<MR>(x, x_stride, w + n * K, K, sums);
    store_row<MR>(sums, bias, out, out_stride, accumulate, n);
  }
}

// A thread's scratch buffer of at least n elements (a plain array: no standard-library template is
// instantiated under this translation unit's target); grows, never shrinks.
template <typename E>
inline E* scratch(E*& buf, int64_t& cap, int64_t n) {
  if (cap < n) {
    delete[] buf;
    buf = new E[n];
    cap = n;
  }
  return buf;
}

// x rounded to bfloat16 once per call, then every weight row against every group of rows of x (for_blocks).
inline void linear_rows_bf16(const float* x, int64_t x_stride, int64_t M, const bf16_t* w, int64_t K,
                             const float* bias, float* out, int64_t out_stride, bool accumulate, int64_t n_begin,
                             int64_t n_end) {
#ifdef BALCONY_CPU_BF16_INSN
  if (bf16_insn()) {
    thread_local bf16_t* xb_buf = nullptr;
    thread_local int64_t xb_cap = 0;
    const int64_t Kp = bf16_row_stride(K);
    bf16_t* xb = scratch(xb_buf, xb_cap, M * Kp);
    round_rows_to_bf16(x, x_stride, M, K, xb);
    for_blocks(M, 2 * K, n_begin, n_end, [&](auto mr, int64_t m, int64_t nb, int64_t ne) {
      constexpr int MR = decltype(mr)::value;
      float sums[MR];
      for (int64_t n = nb; n < ne; ++n) {
        linear_row_bf16_insn<MR>(xb + m * Kp, w + n * K, K, sums);
        store_row<MR>(sums, bias, out + m * out_stride, out_stride, accumulate, n);
      }
    });
    return;
  }
#endif
  thread_local float* xr_buf = nullptr;
  thread_local int64_t xr_cap = 0;
  float* xr = scratch(xr_buf, xr_cap, M * K);
  round_rows_bf16(x, x_stride, M, K, xr);
  for_blocks(M, 2 * K, n_begin, n_end, [&](auto mr, int64_t m, int64_t nb, int64_t ne) {
    linear_rows_mr<decltype(mr)::value>(xr + m * K, K, nullptr, nullptr, nullptr, w, K, bias, out + m * out_stride,
                                        out_stride, accumulate, nb, ne);
  });
}

template <typename T>
inline void linear_rows_impl(const float* x, int64_t x_stride, int64_t M, const T* w, int64_t K, const float* bias,
                             float* out, int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  // the block formats: x rounded to int16 once per call, into this thread's scratch (M x K, small beside the
  // weights; a plain buffer: no standard-library template is instantiated under this translation unit's
  // target), and for Q4_1 each row's block sums of those integers (exact in float: |sum| < 2^21)
  thread_local int16_t* xq_buf = nullptr;
  thread_local float* xs_buf = nullptr;
  thread_local int64_t xq_cap = 0, xs_cap = 0;
  const int16_t* xq = nullptr;
  const float* xs = nullptr;
  const float* xsum = nullptr;
  if constexpr (kBlocks<T>) {
    const int64_t blocks = K / kQ8Block;
    const int64_t xs_need = M + (std::is_same_v<T, q41_t> ? M * xsum_stride(blocks) : 0);
    scratch(xq_buf, xq_cap, M * K);
    scratch(xs_buf, xs_cap, xs_need);
    quantize_rows_i16(x, x_stride, M, K, xq_buf, xs_buf);
    if constexpr (std::is_same_v<T, q41_t>) {
      float* sums = xs_buf + M;
      const int64_t stride = xsum_stride(blocks);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < stride; ++b) {
          int32_t t = 0;
          for (int64_t k = 0; b < blocks && k < kQ8Block; ++k) t += xq_buf[m * K + b * kQ8Block + k];
          sums[m * stride + b] = static_cast<float>(t);
        }
      xsum = sums;
    }
    if constexpr (kNibbles<T>) permute_q4_pairs(xq_buf, M, K);
    xq = xq_buf, xs = xs_buf;
  }
  for_blocks(M, row_bytes<T>(K), n_begin, n_end, [&](auto mr, int64_t m, int64_t nb, int64_t ne) {
    linear_rows_mr<decltype(mr)::value>(x + m * x_stride, x_stride, xq ? xq + m * K : nullptr, xs ? xs + m : nullptr,
                                        xsum ? xsum + m * xsum_stride(K / kQ8Block) : nullptr, w, K, bias,
                                        out + m * out_stride, out_stride, accumulate, nb, ne);
  });
}

void linear_rows(ScalarKind wkind, const float* x, int64_t x_stride, int64_t M, const void* w, int64_t K,
                 const float* bias, float* out, int64_t out_stride, bool accumulate, int64_t n_begin, int64_t n_end) {
  if (wkind == ScalarKind::BF16)
    linear_rows_bf16(x, x_stride, M, static_cast<const bf16_t*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
  else if (wkind == ScalarKind::Q8)
    linear_rows_impl(x, x_stride, M, static_cast<const q8_t*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
  else if (wkind == ScalarKind::Q4)
    linear_rows_impl(x, x_stride, M, static_cast<const q4_t*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
  else if (wkind == ScalarKind::Q4_1)
    linear_rows_impl(x, x_stride, M, static_cast<const q41_t*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
  else
    linear_rows_impl(x, x_stride, M, static_cast<const float*>(w), K, bias, out, out_stride, accumulate, n_begin,
                     n_end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

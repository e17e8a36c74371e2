// Split-KV decode attention (one query token per sequence against its KV cache), CPU kernel
// (one capability; see csrc/cpu/capability.h). Argument layout: DecodeAttentionArgs.
#pragma once
#include "attention_args.h"
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// Horizontal sum by halving in registers (log2(W) shuffles + adds).
// NOTE: the same halving through memcpy went through the stack; perf showed it at ~15% of the kernel.
inline float hsum(vfloat v) {
#if BALCONY_VEC_WIDTH == 16
  {
    auto h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    auto q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
  }
#elif BALCONY_VEC_WIDTH == 8
  auto q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
#else
  return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}

// The W horizontal sums of W vectors at once: lane r of the result is the sum of v[r]. Each level
// adds the two halves of pairs (v[k], v[k + h]) into one vector (lanes with bit h clear from v[k],
// set from v[k + h]): W - 1 adds and 2(W - 1) shuffles for W sums, with no serial chain.
// NOTE: one hsum per score (a log2(W)-deep chain each) held the float32 scores at ~380 cycles per
// position for Llama-8B heads on one Zen 5 core.
#if BALCONY_VEC_WIDTH == 16
inline void reduce_level8(vfloat* v) {
  for (int k = 0; k < 8; ++k)
    v[k] = __builtin_shufflevector(v[k], v[k + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[k], v[k + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline void reduce_level4(vfloat* v) {
  for (int k = 0; k < 4; ++k)
    v[k] = __builtin_shufflevector(v[k], v[k + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(v[k], v[k + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline void reduce_level2(vfloat* v) {
  for (int k = 0; k < 2; ++k)
    v[k] = __builtin_shufflevector(v[k], v[k + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(v[k], v[k + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline vfloat reduce_level1(vfloat* v) {
  return __builtin_shufflevector(v[0], v[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(v[0], v[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline vfloat hsum_many(vfloat* v) {
  reduce_level8(v), reduce_level4(v), reduce_level2(v);
  return reduce_level1(v);
}
#elif BALCONY_VEC_WIDTH == 8
inline vfloat hsum_many(vfloat* v) {
  for (int k = 0; k < 4; ++k)
    v[k] = __builtin_shufflevector(v[k], v[k + 4], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[k], v[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int k = 0; k < 2; ++k)
    v[k] = __builtin_shufflevector(v[k], v[k + 2], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(v[k], v[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
}
#else
inline vfloat hsum_many(vfloat* v) {
  for (int k = 0; k < 2; ++k)
    v[k] = __builtin_shufflevector(v[k], v[k + 2], 0, 1, 4, 5) + __builtin_shufflevector(v[k], v[k + 2], 2, 3, 6, 7);
  return __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6) + __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
}
#endif

// Scores of W consecutive K rows (row stride ks) against one float query: out[0:W] = q . k_r.
template <typename T>
inline void dot_rows_w(const float* q, const T* k, int64_t ks, int64_t D, float* out) {
  constexpr int W = kVecWidth;
  vfloat acc[W];
  for (int r = 0; r < W; ++r) acc[r] = vsplat(0.f);
  int64_t i = 0;
  for (; i + W <= D; i += W) {
    const vfloat qv = vload(q + i);
    for (int r = 0; r < W; ++r) acc[r] += qv * vload(k + r * ks + i);
  }
  if (i < D) {
    const int n = static_cast<int>(D - i);
    const vfloat qv = vload_partial(q + i, n);
    for (int r = 0; r < W; ++r) acc[r] += qv * vload_partial(k + r * ks + i, n);
  }
  vstore(out, hsum_many(acc));
}

// The same in memory order, row by row over all of D = NV * W, with the query held in NV registers.
// NOTE: the column-major order above (one vector of each of the W rows, then the next) reads K at a
// 256-byte stride for Llama-8B heads; with such a pattern the hardware prefetcher fell behind and a
// cache past the L3 ran at ~0.4 of the read bandwidth on one Zen 5 core (0.55 in row order).
template <int NV, typename T>
inline void dot_rows_w_seq(const float* q, const T* k, int64_t ks, float* out) {
  constexpr int W = kVecWidth;
  vfloat qr[NV], acc[W];
  for (int c = 0; c < NV; ++c) qr[c] = vload(q + c * W);
  for (int r = 0; r < W; ++r) {
    vfloat s = qr[0] * vload(k + r * ks);
    for (int c = 1; c < NV; ++c) s += qr[c] * vload(k + r * ks + c * W);
    acc[r] = s;
  }
  vstore(out, hsum_many(acc));
}

// dot_rows_w_seq where the query fits in registers (AVX-512: D = 32, 64, 96 or 128), else dot_rows_w.
template <typename T>
inline void dot_rows_w_any(const float* q, const T* k, int64_t ks, int64_t D, float* out) {
  constexpr int W = kVecWidth;
  if constexpr (W == 16) {
    if (D % W == 0) switch (D / W) {
      case 2: return dot_rows_w_seq<2>(q, k, ks, out);
      case 4: return dot_rows_w_seq<4>(q, k, ks, out);
      case 6: return dot_rows_w_seq<6>(q, k, ks, out);
      case 8: return dot_rows_w_seq<8>(q, k, ks, out);
      default: break;
    }
  }
  dot_rows_w(q, k, ks, D, out);
}

template <typename T>
inline float dot_row(const float* q, const T* k, int64_t D) {
  constexpr int W = kVecWidth;
  vfloat s0 = vsplat(0.f), s1 = vsplat(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= D; i += 2 * W) {
    s0 += vload(q + i) * vload(k + i);
    s1 += vload(q + i + W) * vload(k + i + W);
  }
  for (; i + W <= D; i += W) s0 += vload(q + i) * vload(k + i);
  if (i < D) {
    const int n = static_cast<int>(D - i);
    s1 += vload_partial(q + i, n) * vload_partial(k + i, n);
  }
  return hsum(s0 + s1);
}

#ifdef BALCONY_CPU_BF16_INSN
// scale * q.k for bfloat16 q and k with vdpbf16ps (32 products per instruction, float sums; the
// products of two bfloat16 values are exact in float). Positions past the last multiple of 32 come
// from qf (q * scale in float).
inline float dot_row_bf16_insn(const bf16_t* q, const float* qf, const bf16_t* k, int64_t D, float scale) {
  constexpr int W = kVecWidth;
  vfloat s0 = vsplat(0.f), s1 = vsplat(0.f);
  int64_t i = 0;
  v32bh qa, ka, qb, kb;
  for (; i + 4 * W <= D; i += 4 * W) {
    std::memcpy(&qa, q + i, sizeof qa), std::memcpy(&ka, k + i, sizeof ka);
    std::memcpy(&qb, q + i + 2 * W, sizeof qb), std::memcpy(&kb, k + i + 2 * W, sizeof kb);
    s0 = dpbf16(s0, qa, ka);
    s1 = dpbf16(s1, qb, kb);
  }
  if (i + 2 * W <= D) {
    std::memcpy(&qa, q + i, sizeof qa), std::memcpy(&ka, k + i, sizeof ka);
    s0 = dpbf16(s0, qa, ka);
    i += 2 * W;
  }
  vfloat t = vsplat(0.f);
  for (; i + W <= D; i += W) t += vload(qf + i) * vload(k + i);
  if (i < D) {
    const int n = static_cast<int>(D - i);
    t += vload_partial(qf + i, n) * vload_partial(k + i, n);
  }
  return hsum((s0 + s1) * scale + t);
}

// The same for W consecutive K rows at once (D a multiple of 32): out[0:W] = scale * q . k_r.
// With D = 32 * NC (NC = 2, 4, 8) in memory order, the query in NC registers (see dot_rows_w_seq).
template <int NC>
inline void dot_rows_w_bf16_insn_seq(const bf16_t* q, const bf16_t* k, int64_t ks, float scale, float* out) {
  constexpr int W = kVecWidth;
  v32bh qr[NC], kr;
  vfloat acc[W];
  for (int c = 0; c < NC; ++c) std::memcpy(&qr[c], q + c * 2 * W, sizeof kr);
  for (int r = 0; r < W; ++r) {
    vfloat s = vsplat(0.f);
    for (int c = 0; c < NC; ++c) {
      std::memcpy(&kr, k + r * ks + c * 2 * W, sizeof kr);
      s = dpbf16(s, qr[c], kr);
    }
    acc[r] = s;
  }
  vstore(out, hsum_many(acc) * scale);
}

inline void dot_rows_w_bf16_insn(const bf16_t* q, const bf16_t* k, int64_t ks, int64_t D, float scale,
                                 float* out) {
  constexpr int W = kVecWidth;
  switch (D) {
    case 64: return dot_rows_w_bf16_insn_seq<2>(q, k, ks, scale, out);
    case 128: return dot_rows_w_bf16_insn_seq<4>(q, k, ks, scale, out);
    case 256: return dot_rows_w_bf16_insn_seq<8>(q, k, ks, scale, out);
    default: break;
  }
  vfloat acc[W];
  for (int r = 0; r < W; ++r) acc[r] = vsplat(0.f);
  v32bh qa, ka;
  for (int64_t i = 0; i < D; i += 2 * W) {
    std::memcpy(&qa, q + i, sizeof qa);
    for (int r = 0; r < W; ++r) {
      std::memcpy(&ka, k + r * ks + i, sizeof ka);
      acc[r] = dpbf16(acc[r], qa, ka);
    }
  }
  vstore(out, hsum_many(acc) * scale);
}
#endif

// acc[0:D] = acc * alpha (alpha != 1 only when the running max moved).
inline void scale_row(float* acc, float alpha, int64_t D) {
  constexpr int W = kVecWidth;
  const vfloat va = vsplat(alpha);
  int64_t i = 0;
  for (; i + W <= D; i += W) vstore(acc + i, vload(acc + i) * va);
  for (; i < D; ++i) acc[i] *= alpha;
}

// acc[g][c0:c0+NV*W] += sum_jj p[g][jj] * V[jj][c0:c0+NV*W] for GP heads at once (vblk and acc
// point at column c0; GP * NV accumulators stay in registers). Each V vector is loaded (and widened)
// once for the GP heads.
// NOTE: per head, bfloat16 V rows were widened G times (Llama-8B heads: G = 4), the largest cost of
// the bfloat16 kernel once the scores were batched.
template <int GP, int NV, typename T>
inline void accumulate_v_tile(const float* sc, const T* vblk, int64_t vs, int64_t nb, int64_t D, float* acc) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  vfloat a[GP][NV];
  for (int g = 0; g < GP; ++g)
    for (int c = 0; c < NV; ++c) a[g][c] = vload(acc + g * D + c * W);
  for (int64_t jj = 0; jj < nb; ++jj) {
    const T* vr = vblk + jj * vs;
    vfloat v[NV];
    for (int c = 0; c < NV; ++c) v[c] = vload(vr + c * W);
    for (int g = 0; g < GP; ++g) {
      const vfloat pv = vsplat(sc[g * NB + jj]);
      for (int c = 0; c < NV; ++c) a[g][c] += pv * v[c];
    }
  }
  for (int g = 0; g < GP; ++g)
    for (int c = 0; c < NV; ++c) vstore(acc + g * D + c * W, a[g][c]);
}

// A compile-time int passed to generic lambdas (decltype(x)::value).
template <int N>
struct Int {
  static constexpr int value = N;
};

// Heads [0, G) in passes of GP, the last one smaller: pass(Int<P>{}, g) for heads [g, g + P).
// With G <= GP, one pass of all G heads.
template <int GP, typename Pass>
inline void head_passes(int64_t G, Pass&& pass, int64_t g = 0) {
  for (; g + GP <= G; g += GP) pass(Int<GP>{}, g);
  if constexpr (GP > 1)
    if (g < G) head_passes<GP - 1>(G, pass, g);
}

// acc[g][0:D'] += sum_jj p[g][jj] * V[jj][0:D'] for the G heads of a group; returns D', the columns
// done (the per-head loops of the caller take the rest). Where a head's D columns fit in 16
// registers (AVX-512, D = 64 or 128) V is read in memory order, row by row, with the heads in passes
// of up to 16 / (D / W); otherwise in chunks of 4W columns for groups of up to 4 heads.
// NOTE: chunks of columns read a V row 128 or 256 bytes at a time at a 512-byte stride for
// Llama-8B heads (float32); like the scores (see dot_rows_w_seq) that starved the prefetcher.
template <typename T>
inline int64_t accumulate_v(const float* sc, const T* vblk, int64_t vs, int64_t nb, int64_t D, int64_t G,
                            float* acc) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  const auto rows = [&](auto nv_, auto gp_) {  // whole rows, NV = D / W vectors per head
    constexpr int NV = decltype(nv_)::value;
    head_passes<decltype(gp_)::value>(G, [&](auto p, int64_t g) {
      accumulate_v_tile<decltype(p)::value, NV>(sc + g * NB, vblk, vs, nb, D, acc + g * D);
    });
    return D;
  };
  if constexpr (W == 16) {
    if (D == 4 * W) return rows(Int<4>{}, Int<4>{});
    if (D == 8 * W) return rows(Int<8>{}, Int<2>{});
  }
  int64_t i = 0;
  if (G > 4) return i;
  for (; i + 4 * W <= D; i += 4 * W)
    head_passes<4>(G, [&](auto p, int64_t) {
      accumulate_v_tile<decltype(p)::value, 4>(sc, vblk + i, vs, nb, D, acc + i);
    });
  return i;
}

#ifdef BALCONY_CPU_BF16_INSN
// The same with vdpbf16ps for bfloat16 caches (D a multiple of 64): two positions per instruction,
// acc[c] += p_j V[j][c] + p_j+1 V[j+1][c], the probabilities rounded to bfloat16 (as flash attention
// does for its P V product; the running sums stay float). V rows j and j+1 are interleaved word by
// word within 128-bit lanes (vpunpck[lh]wd), which leaves the columns of the float accumulators in
// the order lo = {0-3, 8-11, 16-19, 24-27}, hi = {4-7, 12-15, 20-23, 28-31} of each 32; they are
// loaded and stored through that permutation once per block. An odd last position uses plain FMAs.
// NOTE: widening V and one FMA per head and vector made the bfloat16 kernel vector-bound at ~100
// cycles per position for Llama-8B heads on one Zen 5 core (one 512-bit FMA per cycle).
typedef int v16si __attribute__((vector_size(64)));

inline v32bh interleave_lo(v32bh a, v32bh b) {
  return __builtin_shufflevector(a, b, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43, 16, 48, 17, 49, 18,
                                 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59);
}
inline v32bh interleave_hi(v32bh a, v32bh b) {
  return __builtin_shufflevector(a, b, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46, 15, 47, 20, 52, 21, 53,
                                 22, 54, 23, 55, 28, 60, 29, 61, 30, 62, 31, 63);
}

// Columns [0, 32 NC) of the pointers given, heads [0, GP), positions in pairs (nb even):
// GP * 2NC accumulators in registers.
template <int GP, int NC>
inline void accumulate_v_pairs_tile(const bf16_t* pb, const bf16_t* vblk, int64_t vs, int64_t nb, int64_t D,
                                    float* acc) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  vfloat a[GP][2 * NC];
  for (int g = 0; g < GP; ++g)
    for (int c = 0; c < NC; ++c) {
      const vfloat n0 = vload(acc + g * D + 2 * c * W), n1 = vload(acc + g * D + (2 * c + 1) * W);
      a[g][2 * c] = __builtin_shufflevector(n0, n1, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
      a[g][2 * c + 1] = __builtin_shufflevector(n0, n1, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
  for (int64_t jj = 0; jj < nb; jj += 2) {
    const bf16_t* r0 = vblk + jj * vs;
    v32bh b[2 * NC];
    for (int c = 0; c < NC; ++c) {
      v32bh x, y;
      std::memcpy(&x, r0 + 2 * c * W, sizeof x), std::memcpy(&y, r0 + vs + 2 * c * W, sizeof y);
      b[2 * c] = interleave_lo(x, y), b[2 * c + 1] = interleave_hi(x, y);
    }
    for (int g = 0; g < GP; ++g) {
      int32_t word;
      std::memcpy(&word, pb + g * NB + jj, sizeof word);
      const v32bh pv = (v32bh)(v16si{} + word);
      for (int c = 0; c < 2 * NC; ++c) a[g][c] = dpbf16(a[g][c], pv, b[c]);
    }
  }
  for (int g = 0; g < GP; ++g)
    for (int c = 0; c < NC; ++c) {
      const vfloat lo = a[g][2 * c], hi = a[g][2 * c + 1];
      vstore(acc + g * D + 2 * c * W,
             __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23));
      vstore(acc + g * D + (2 * c + 1) * W,
             __builtin_shufflevector(lo, hi, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
    }
}

// Whether accumulate_v_pairs_bf16 takes a group: D = 64, 128 or 256 (whole rows in memory order,
// heads in passes), or D a multiple of 64 with at most 4 heads (chunks of 64 columns).
inline bool accumulate_v_pairs_bf16_fits(int64_t G, int64_t D) {
  return D == 64 || D == 128 || D == 256 || (G <= 4 && D % 64 == 0);
}

// pb: G * NB bfloat16 of scratch for the probabilities (positions j, j+1 in one 32-bit word).
inline void accumulate_v_pairs_bf16(const float* sc, const bf16_t* vblk, int64_t vs, int64_t nb, int64_t D,
                                    int64_t G, float* acc, bf16_t* pb) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t jj = 0; jj < nb; jj += W) {
      const auto h = __builtin_ia32_cvtneps2bf16_v16sf(vload(sc + g * NB + jj));
      std::memcpy(pb + g * NB + jj, &h, sizeof h);
    }
  const int64_t pairs = nb & ~int64_t{1};
  const auto rows = [&](auto nc_, auto gp_) {  // whole rows, D = 32 NC, heads in passes (registers: GP * 2NC)
    constexpr int NC = decltype(nc_)::value;
    head_passes<decltype(gp_)::value>(G, [&](auto p, int64_t g) {
      accumulate_v_pairs_tile<decltype(p)::value, NC>(pb + g * NB, vblk, vs, pairs, D, acc + g * D);
    });
  };
  if (D == 64)
    rows(Int<2>{}, Int<4>{});
  else if (D == 128)
    rows(Int<4>{}, Int<2>{});
  else if (D == 256)
    rows(Int<8>{}, Int<1>{});
  else  // G <= 4: chunks of 64 columns, all heads in one pass
    for (int64_t i = 0; i < D; i += 4 * W)
      head_passes<4>(G, [&](auto p, int64_t) {
        accumulate_v_pairs_tile<decltype(p)::value, 2>(pb, vblk + i, vs, pairs, D, acc + i);
      });
  if (nb & 1) {
    const bf16_t* vr = vblk + (nb - 1) * vs;
    for (int64_t g = 0; g < G; ++g) {
      const vfloat pv = vsplat(sc[g * NB + nb - 1]);
      for (int64_t i = 0; i < D; i += W) vstore(acc + g * D + i, vload(acc + g * D + i) + pv * vload(vr + i));
    }
  }
}
#endif

// One task: positions [lo + j * chunk, min(lo + (j + 1) * chunk, len)) of sequence b against the G query
// heads sharing kv head h. K and V rows are read from memory once for the whole group.
// kInsn (bfloat16 caches under Capability::AVX512_BF16): the scores with vdpbf16ps.
template <typename T, bool kInsn>
inline void decode_split_task(const DecodeAttentionArgs& a, int64_t task, float* scratch) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  const int64_t splits = a.num_splits, G = a.G, D = a.D, Hq = a.Hkv * a.G;
  const int64_t j = task % splits, bh = task / splits;
  const int64_t h = bh % a.Hkv, b = bh / a.Hkv;
  const int64_t len = a.seq_lens[b];
  const int64_t lo = a.window > 0 && len > a.window ? len - a.window : 0;
  const int64_t p_begin = lo + j * a.chunk;
  const int64_t p_end = p_begin + a.chunk < len ? p_begin + a.chunk : len;

  float* qf = scratch;        // [G, D] query * scale, float
  float* acc = qf + G * D;    // [G, D] unnormalised output
  float* sc = acc + G * D;    // [G, NB] scores, then probabilities
  float* m = sc + G * NB;     // [G] running max
  float* l = m + G;           // [G] running sum of exp; then [G, NB] bfloat16 probabilities (kInsn)
  // NOTE: bfloat16 K and V rows are widened in registers as they are used (two instructions per
  // vector, re-done per query head of the group) rather than converted into a float copy of the
  // block first: the copy's extra store and reload cost more than the repeated widening.
  const vfloat vscale = vsplat(a.scale);
  for (int64_t g = 0; g < G; ++g) {
    const T* q = static_cast<const T*>(a.query) + b * a.q_sb + (h * G + g) * a.q_sh;
    int64_t i = 0;
    for (; i + W <= D; i += W) vstore(qf + g * D + i, vload(q + i) * vscale);
    for (; i < D; ++i) qf[g * D + i] = to_float(q[i]) * a.scale;
    for (i = 0; i < D; ++i) acc[g * D + i] = 0.f;
    m[g] = -INFINITY;
    l[g] = 0.f;
  }

  const T* kbase = static_cast<const T*>(a.key_cache) + b * a.k_sb + h * a.k_sh;
  const T* vbase = static_cast<const T*>(a.value_cache) + b * a.v_sb + h * a.v_sh;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += NB) {
    const int64_t nb = p_end - p0 < NB ? p_end - p0 : NB;
    const T* kblk = kbase + p0 * a.k_ss;
    const T* vblk = vbase + p0 * a.v_ss;
    const int64_t ks = a.k_ss, vs = a.v_ss;
    // Scores: each K row is loaded once and stays in L1 for the G dot products.
    // NOTE: software prefetching of the next block (float32 caches, where it once helped) slowed
    // the memory-order loops below on one Zen 5 core, in cache and past the L3 alike (SmolLM2
    // heads float32 past the L3: 12 -> 18 GB/s without it); the hardware prefetcher does better.
    // W positions at a time with one transposed reduction, then the rest one by one.
    int64_t jw = 0;
#ifdef BALCONY_CPU_BF16_INSN
    if constexpr (kInsn) {
      const bf16_t* q = static_cast<const bf16_t*>(a.query) + b * a.q_sb + h * G * a.q_sh;
      if (D % (2 * W) == 0)
        for (; jw + W <= nb; jw += W)
          for (int64_t g = 0; g < G; ++g)
            dot_rows_w_bf16_insn(q + g * a.q_sh, kblk + jw * ks, ks, D, a.scale, sc + g * NB + jw);
      for (int64_t jj = jw; jj < nb; ++jj)
        for (int64_t g = 0; g < G; ++g)
          sc[g * NB + jj] = dot_row_bf16_insn(q + g * a.q_sh, qf + g * D, kblk + jj * ks, D, a.scale);
      jw = nb;
    }
#endif
    for (; jw + W <= nb; jw += W)
      for (int64_t g = 0; g < G; ++g) dot_rows_w_any(qf + g * D, kblk + jw * ks, ks, D, sc + g * NB + jw);
    for (int64_t jj = jw; jj < nb; ++jj)
      for (int64_t g = 0; g < G; ++g) sc[g * NB + jj] = dot_row(qf + g * D, kblk + jj * ks, D);
    if (a.softcap > 0.f)  // soft-capped scores (Gemma 2)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t jj = 0; jj < nb; ++jj) sc[g * NB + jj] = a.softcap * std::tanh(sc[g * NB + jj] / a.softcap);
    // Online softmax update per query head.
    for (int64_t g = 0; g < G; ++g) {
      float* s = sc + g * NB;
      vfloat vb = vsplat(-INFINITY);
      int64_t jm = 0;
      for (; jm + W <= nb; jm += W) vb = vmax(vb, vload(s + jm));
      if (jm < nb) vb = vmax(vb, vload_partial(s + jm, static_cast<int>(nb - jm), -INFINITY));
      const float bm = vmaxall(vb);
      const float m_new = m[g] > bm ? m[g] : bm;
      if (m_new > m[g]) {
        const float alpha = std::exp(m[g] - m_new);  // 0 on the first block (m = -inf)
        scale_row(acc + g * D, alpha, D);
        l[g] *= alpha;
        m[g] = m_new;
      }
      const vfloat vm = vsplat(m_new);
      vfloat sum = vsplat(0.f);
      int64_t jj = 0;
      for (; jj + W <= nb; jj += W) {
        const vfloat e = vexp(vload(s + jj) - vm);
        vstore(s + jj, e);
        sum += e;
      }
      if (jj < nb) {
        const int n = static_cast<int>(nb - jj);
        // Lanes past n load -inf and become exp(-inf) = 0.
        const vfloat e = vexp(vload_partial(s + jj, n, -INFINITY) - vm);
        vstore_partial(s + jj, e, n);
        sum += e;
      }
      l[g] += vsum(sum);
    }
    // acc_g += sum_jj p[g][jj] * V[jj], the V block re-read from L1 once per head.
    // NOTE: one accumulator per D-chunk made this a chain of dependent FMAs (4 cycles each; half
    // the kernel's time in perf); four chunks at once (or two interleaved positions) hide it.
#ifdef BALCONY_CPU_BF16_INSN
    if constexpr (kInsn) {
      if (accumulate_v_pairs_bf16_fits(G, D)) {
        accumulate_v_pairs_bf16(sc, vblk, vs, nb, D, G, acc, reinterpret_cast<bf16_t*>(l + G));
        continue;
      }
    }
#endif
    int64_t i = accumulate_v(sc, vblk, vs, nb, D, G, acc);
    for (; i + 4 * W <= D; i += 4 * W) {
      for (int64_t g = 0; g < G; ++g) {
        const float* p = sc + g * NB;
        float* ag = acc + g * D + i;
        vfloat a0 = vload(ag), a1 = vload(ag + W), a2 = vload(ag + 2 * W), a3 = vload(ag + 3 * W);
        for (int64_t jj = 0; jj < nb; ++jj) {
          const vfloat pv = vsplat(p[jj]);
          const T* vr = vblk + jj * vs + i;
          a0 += pv * vload(vr);
          a1 += pv * vload(vr + W);
          a2 += pv * vload(vr + 2 * W);
          a3 += pv * vload(vr + 3 * W);
        }
        vstore(ag, a0), vstore(ag + W, a1), vstore(ag + 2 * W, a2), vstore(ag + 3 * W, a3);
      }
    }
    for (; i + W <= D; i += W) {
      for (int64_t g = 0; g < G; ++g) {
        const float* p = sc + g * NB;
        vfloat a0 = vload(acc + g * D + i), a1 = vsplat(0.f);
        int64_t jj = 0;
        for (; jj + 2 <= nb; jj += 2) {
          a0 += vsplat(p[jj]) * vload(vblk + jj * vs + i);
          a1 += vsplat(p[jj + 1]) * vload(vblk + (jj + 1) * vs + i);
        }
        if (jj < nb) a0 += vsplat(p[jj]) * vload(vblk + jj * vs + i);
        vstore(acc + g * D + i, a0 + a1);
      }
    }
    if (i < D) {
      const int n = static_cast<int>(D - i);
      for (int64_t g = 0; g < G; ++g) {
        const float* p = sc + g * NB;
        vfloat va = vload_partial(acc + g * D + i, n);
        for (int64_t jj = 0; jj < nb; ++jj) va += vsplat(p[jj]) * vload_partial(vblk + jj * vs + i, n);
        vstore_partial(acc + g * D + i, va, n);
      }
    }
  }

  for (int64_t g = 0; g < G; ++g) {
    const int64_t row = b * Hq + h * G + g;
    if (splits == 1) {
      T* o = static_cast<T*>(a.out) + row * D;
      const float inv = l[g] > 0.f ? 1.0f / l[g] : 0.f;  // an empty sequence gives zeros
      const vfloat vinv = vsplat(inv);
      int64_t i = 0;
      for (; i + W <= D; i += W) vstore(o + i, vload(acc + g * D + i) * vinv);
      if (i < D) {
        const int n = static_cast<int>(D - i);
        vstore_partial(o + i, vload_partial(acc + g * D + i, n) * vinv, n);
      }
    } else {
      const int64_t part = row * splits + j;
      a.part_ml[part * 2] = m[g];
      a.part_ml[part * 2 + 1] = l[g];
      std::memcpy(a.part_o + part * D, acc + g * D, sizeof(float) * D);
    }
  }
}

// Tasks [begin, end) of the flattened (B, Hkv, num_splits); `scratch` holds
// decode_attention_scratch_floats(G, D) floats for this thread.
void decode_attention_split(ScalarKind kind, const DecodeAttentionArgs& args, float* scratch, int64_t begin,
                            int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    if (kind == ScalarKind::BF16 && bf16_insn())
      decode_split_task<bf16_t, true>(args, task, scratch);
    else if (kind == ScalarKind::BF16)
      decode_split_task<bf16_t, false>(args, task, scratch);
    else
      decode_split_task<float, false>(args, task, scratch);
  }
}

// Merge of the split partials for output rows [begin, end) of the flattened (B, Hq):
// out = sum_j e^(m_j - M) o_j / sum_j e^(m_j - M) l_j with M = max_j m_j (zeros when nothing was attended).
template <typename T>
inline void decode_merge_rows(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {
  constexpr int W = kVecWidth;
  const int64_t splits = a.num_splits, D = a.D;
  for (int64_t row = begin; row < end; ++row) {
    const float* ml = a.part_ml + row * splits * 2;
    const float* po = a.part_o + row * splits * D;
    float M = -INFINITY;
    for (int64_t j = 0; j < splits; ++j) M = ml[2 * j] > M ? ml[2 * j] : M;
    float L = 0.f;
    if (M > -INFINITY)
      for (int64_t j = 0; j < splits; ++j) L += std::exp(ml[2 * j] - M) * ml[2 * j + 1];
    const float inv = L > 0.f ? 1.0f / L : 0.f;
    T* o = static_cast<T*>(a.out) + row * D;
    int64_t i = 0;
    for (; i < D; i += W) {
      const int n = D - i < W ? static_cast<int>(D - i) : W;
      vfloat v = vsplat(0.f);
      for (int64_t j = 0; j < splits; ++j) {
        if (!(ml[2 * j] > -INFINITY)) continue;  // an empty split holds no output
        const vfloat w = vsplat(std::exp(ml[2 * j] - M) * inv);
        v += w * (n == W ? vload(po + j * D + i) : vload_partial(po + j * D + i, n));
      }
      if (n == W)
        vstore(o + i, v);
      else
        vstore_partial(o + i, v, n);
    }
  }
}

void decode_attention_merge(ScalarKind kind, const DecodeAttentionArgs& args, int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16)
    decode_merge_rows<bf16_t>(args, begin, end);
  else
    decode_merge_rows<float>(args, begin, end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

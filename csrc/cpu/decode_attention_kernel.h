// Split-KV decode attention (one query token per sequence against its KV cache), CPU kernel
// (one capability; see csrc/cpu/capability.h). Argument layout: DecodeAttentionArgs.
#pragma once
#include "attention_args.h"
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// Positions scored per online-softmax step.
// NOTE: 32 keeps the K/V block (32 x D x 4 bytes at most 16 KB for D = 128) in L1 while it is
// re-read once per query head of the group.
constexpr int64_t kDecodeBlock = 32;

// Floats of scratch one task needs (the caller gives each thread this much): the query group, its
// accumulators, scores, and running max and sum.
inline int64_t decode_attention_scratch_floats(int64_t G, int64_t D) { return G * (2 * D + kDecodeBlock + 2); }

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
  typedef short v32bh __attribute__((vector_size(64)));
  constexpr int W = kVecWidth;
  vfloat s0 = vsplat(0.f), s1 = vsplat(0.f);
  int64_t i = 0;
  v32bh qa, ka, qb, kb;
  for (; i + 4 * W <= D; i += 4 * W) {
    std::memcpy(&qa, q + i, sizeof qa), std::memcpy(&ka, k + i, sizeof ka);
    std::memcpy(&qb, q + i + 2 * W, sizeof qb), std::memcpy(&kb, k + i + 2 * W, sizeof kb);
    s0 = __builtin_ia32_dpbf16ps_v16sf(s0, qa, ka);
    s1 = __builtin_ia32_dpbf16ps_v16sf(s1, qb, kb);
  }
  if (i + 2 * W <= D) {
    std::memcpy(&qa, q + i, sizeof qa), std::memcpy(&ka, k + i, sizeof ka);
    s0 = __builtin_ia32_dpbf16ps_v16sf(s0, qa, ka);
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
inline void dot_rows_w_bf16_insn(const bf16_t* q, const bf16_t* k, int64_t ks, int64_t D, float scale,
                                 float* out) {
  typedef short v32bh __attribute__((vector_size(64)));
  constexpr int W = kVecWidth;
  vfloat acc[W];
  for (int r = 0; r < W; ++r) acc[r] = vsplat(0.f);
  v32bh qa, ka;
  for (int64_t i = 0; i < D; i += 2 * W) {
    std::memcpy(&qa, q + i, sizeof qa);
    for (int r = 0; r < W; ++r) {
      std::memcpy(&ka, k + r * ks + i, sizeof ka);
      acc[r] = __builtin_ia32_dpbf16ps_v16sf(acc[r], qa, ka);
    }
  }
  vstore(out, hsum_many(acc) * scale);
}
#endif

// Prefetches the n bytes at p (one request per cache line).
inline void prefetch_bytes(const void* p, int64_t n) {
  for (int64_t b = 0; b < n; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// acc[0:D] = acc * alpha (alpha != 1 only when the running max moved).
inline void scale_row(float* acc, float alpha, int64_t D) {
  constexpr int W = kVecWidth;
  const vfloat va = vsplat(alpha);
  int64_t i = 0;
  for (; i + W <= D; i += W) vstore(acc + i, vload(acc + i) * va);
  for (; i < D; ++i) acc[i] *= alpha;
}

// acc[g][0:D'] += sum_jj p[g][jj] * V[jj][0:D'] for the G (<= 4) heads of a group together, over the
// columns in whole chunks of 4W (returns D', where the per-head loops take over). The G x 4
// accumulators stay in registers; each V vector is loaded and widened once, not once per head.
// NOTE: per head, bfloat16 V rows were widened G times (Llama-8B heads: G = 4), the largest cost of
// the bfloat16 kernel once the scores were batched.
template <int G, typename T>
inline int64_t accumulate_v_group(const float* sc, const T* vblk, int64_t vs, int64_t nb, int64_t D, float* acc) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  int64_t i = 0;
  for (; i + 4 * W <= D; i += 4 * W) {
    vfloat a[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = vload(acc + g * D + i + c * W);
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* vr = vblk + jj * vs + i;
      const vfloat v0 = vload(vr), v1 = vload(vr + W), v2 = vload(vr + 2 * W), v3 = vload(vr + 3 * W);
      for (int g = 0; g < G; ++g) {
        const vfloat pv = vsplat(sc[g * NB + jj]);
        a[g][0] += pv * v0, a[g][1] += pv * v1, a[g][2] += pv * v2, a[g][3] += pv * v3;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) vstore(acc + g * D + i + c * W, a[g][c]);
  }
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
typedef short v32bh __attribute__((vector_size(64)));
typedef int v16si __attribute__((vector_size(64)));

inline v32bh interleave_lo(v32bh a, v32bh b) {
  return __builtin_shufflevector(a, b, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43, 16, 48, 17, 49, 18,
                                 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59);
}
inline v32bh interleave_hi(v32bh a, v32bh b) {
  return __builtin_shufflevector(a, b, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46, 15, 47, 20, 52, 21, 53,
                                 22, 54, 23, 55, 28, 60, 29, 61, 30, 62, 31, 63);
}

template <int G>
inline void accumulate_v_pairs_bf16(const float* sc, const bf16_t* vblk, int64_t vs, int64_t nb, int64_t D,
                                    float* acc) {
  constexpr int W = kVecWidth;
  constexpr int64_t NB = kDecodeBlock;
  alignas(64) bf16_t pb[G * NB];  // probabilities in bfloat16: positions j, j+1 in one 32-bit word
  for (int g = 0; g < G; ++g)
    for (int64_t jj = 0; jj < nb; jj += W) {
      const auto h = __builtin_ia32_cvtneps2bf16_v16sf(vload(sc + g * NB + jj));
      std::memcpy(pb + g * NB + jj, &h, sizeof h);
    }
  const int64_t pairs_end = nb & ~int64_t{1};
  for (int64_t i = 0; i < D; i += 4 * W) {
    vfloat a[G][4];
    for (int g = 0; g < G; ++g)
      for (int h = 0; h < 2; ++h) {
        const vfloat n0 = vload(acc + g * D + i + 2 * h * W), n1 = vload(acc + g * D + i + (2 * h + 1) * W);
        a[g][2 * h] = __builtin_shufflevector(n0, n1, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
        a[g][2 * h + 1] = __builtin_shufflevector(n0, n1, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
      }
    for (int64_t jj = 0; jj < pairs_end; jj += 2) {
      const bf16_t* r0 = vblk + jj * vs + i;
      v32bh x0, y0, x1, y1;
      std::memcpy(&x0, r0, sizeof x0), std::memcpy(&y0, r0 + vs, sizeof y0);
      std::memcpy(&x1, r0 + 2 * W, sizeof x1), std::memcpy(&y1, r0 + vs + 2 * W, sizeof y1);
      const v32bh b0 = interleave_lo(x0, y0), b1 = interleave_hi(x0, y0);
      const v32bh b2 = interleave_lo(x1, y1), b3 = interleave_hi(x1, y1);
      for (int g = 0; g < G; ++g) {
        int32_t word;
        std::memcpy(&word, pb + g * NB + jj, sizeof word);
        const v32bh pv = (v32bh)(v16si{} + word);
        a[g][0] = __builtin_ia32_dpbf16ps_v16sf(a[g][0], pv, b0);
        a[g][1] = __builtin_ia32_dpbf16ps_v16sf(a[g][1], pv, b1);
        a[g][2] = __builtin_ia32_dpbf16ps_v16sf(a[g][2], pv, b2);
        a[g][3] = __builtin_ia32_dpbf16ps_v16sf(a[g][3], pv, b3);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int h = 0; h < 2; ++h) {
        const vfloat lo = a[g][2 * h], hi = a[g][2 * h + 1];
        vstore(acc + g * D + i + 2 * h * W,
               __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23));
        vstore(acc + g * D + i + (2 * h + 1) * W,
               __builtin_shufflevector(lo, hi, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
      }
  }
  if (nb & 1) {
    const bf16_t* vr = vblk + (nb - 1) * vs;
    for (int g = 0; g < G; ++g) {
      const vfloat pv = vsplat(sc[g * NB + nb - 1]);
      for (int64_t i = 0; i < D; i += W) vstore(acc + g * D + i, vload(acc + g * D + i) + pv * vload(vr + i));
    }
  }
}
#endif

// One task: positions [j * chunk, min((j + 1) * chunk, len)) of sequence b against the G query
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
  const int64_t p_begin = j * a.chunk;
  const int64_t p_end = p_begin + a.chunk < len ? p_begin + a.chunk : len;

  float* qf = scratch;        // [G, D] query * scale, float
  float* acc = qf + G * D;    // [G, D] unnormalised output
  float* sc = acc + G * D;    // [G, NB] scores, then probabilities
  float* m = sc + G * NB;     // [G] running max
  float* l = m + G;           // [G] running sum of exp
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
    // Scores: each K row is loaded once and stays in L1 for the G dot products. With float32 caches
    // the K and V rows of the next block are prefetched meanwhile.
    // NOTE: on one Zen 5 core (a busy machine; best of three runs) that took Llama-8B-like heads at
    // 8192 positions from 6.7 to 5.9 ms and SmolLM2-like batch 8 from 10.7 to 7.0 ms; with bfloat16
    // caches (half the bytes per row, more arithmetic per byte) it was slightly slower, so it is off.
    const bool more = sizeof(T) == sizeof(float) && p0 + NB < p_end;
    if (more)
      for (int64_t jj = 0; jj < nb; ++jj) {
        prefetch_bytes(kblk + (jj + NB) * ks, D * static_cast<int64_t>(sizeof(T)));
        prefetch_bytes(vblk + (jj + NB) * vs, D * static_cast<int64_t>(sizeof(T)));
      }
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
      for (int64_t g = 0; g < G; ++g) dot_rows_w(qf + g * D, kblk + jw * ks, ks, D, sc + g * NB + jw);
    for (int64_t jj = jw; jj < nb; ++jj)
      for (int64_t g = 0; g < G; ++g) sc[g * NB + jj] = dot_row(qf + g * D, kblk + jj * ks, D);
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
      if (G <= 4 && D % (4 * W) == 0) {
        switch (G) {
          case 1: accumulate_v_pairs_bf16<1>(sc, vblk, vs, nb, D, acc); break;
          case 2: accumulate_v_pairs_bf16<2>(sc, vblk, vs, nb, D, acc); break;
          case 3: accumulate_v_pairs_bf16<3>(sc, vblk, vs, nb, D, acc); break;
          default: accumulate_v_pairs_bf16<4>(sc, vblk, vs, nb, D, acc); break;
        }
        continue;
      }
    }
#endif
    int64_t i = 0;
    switch (G) {  // up to 4 heads: each V vector loaded (and widened) once for the whole group
      case 1: i = accumulate_v_group<1>(sc, vblk, vs, nb, D, acc); break;
      case 2: i = accumulate_v_group<2>(sc, vblk, vs, nb, D, acc); break;
      case 3: i = accumulate_v_group<3>(sc, vblk, vs, nb, D, acc); break;
      case 4: i = accumulate_v_group<4>(sc, vblk, vs, nb, D, acc); break;
      default: break;
    }
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

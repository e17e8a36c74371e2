// Split-KV decode attention (flash-decoding) over a static KV cache, CUDA kernels and launchers
// (torch-free): a split kernel per (split, kv head, sequence) and a merge kernel.
#pragma once
#include "balcony/device.h"
#include "balcony/pack.h"

namespace balcony::cuda {

template <typename T>
struct DecodeAttentionParams {
  const T* query;  // [B,Hq,D], strides q_sb, q_sh
  long long q_sb, q_sh;
  const T* key_cache;  // [B,Hkv,S,D], strides k_sb, k_sh, k_ss
  long long k_sb, k_sh, k_ss;
  const T* value_cache;
  long long v_sb, v_sh, v_ss;
  const void* seq_lens;  // [B] int32 or int64 (seq_lens_64)
  bool seq_lens_64;
  int Hkv, G, D, S;
  int num_splits, chunk;  // split j covers [max(j * chunk, lo), min((j + 1) * chunk, len))
  float scale;
  long long window;  // > 0: the last `window` entries of each sequence only (lo = len - window); 0: all (lo = 0)
  float softcap;     // > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: off
  T* out;          // [B,Hq,D] contiguous; written directly when num_splits == 1
  float* part_ml;  // [B,Hq,splits,2]: max and sum of exp of each split
  float* part_o;   // [B,Hq,splits,D]: output of each split, weighted by exp(score - its max), unnormalised
};

constexpr int kDecodeWarps = 4;

BALCONY_DEVICE long long load_len(const void* lens, bool is64, int b) {
  return is64 ? static_cast<const long long*>(lens)[b] : static_cast<const int*>(lens)[b];
}

// Online-softmax state of up to MAXG query heads over one slice of the positions, for the VEC * PPL
// output elements a lane owns.
template <int MAXG, int PPL, int VEC>
struct SoftmaxState {
  float m[MAXG], l[MAXG];
  float acc[MAXG][PPL * VEC];
};

// Folds `other` (m2, l2, acc2) into (m, l, acc); either may be empty (m = -inf).
BALCONY_DEVICE void merge_ml(float& m, float& l, float m2, float l2, float& wa, float& wb) {
  const float mn = fmaxf(m, m2);
  wa = mn == -INFINITY ? 0.f : __expf(m - mn);
  wb = mn == -INFINITY ? 0.f : __expf(m2 - mn);
  l = l * wa + l2 * wb;
  m = mn;
}

// Lane c of a row loads packs c, c + L, ... of K and V row `pos` (zeros past p_end or npack).
template <typename T, int VEC, int PPL>
BALCONY_DEVICE void load_kv_row(const T* kbase, long long k_ss, const T* vbase, long long v_ss, long long pos,
                                long long p_end, int c, int L, int npack, Pack<T, VEC>* kp, Pack<T, VEC>* vp) {
  using P = Pack<T, VEC>;
#pragma unroll
  for (int k = 0; k < PPL; ++k) {
    const int pk = c + k * L;
    if (pos < p_end && pk < npack) {
      kp[k] = *reinterpret_cast<const P*>(kbase + pos * k_ss + pk * VEC);
      vp[k] = *reinterpret_cast<const P*>(vbase + pos * v_ss + pk * VEC);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) kp[k].v[e] = vp[k].v[e] = from_float<T>(0.f);
    }
  }
}

// NOTE: with __launch_bounds__(128), ptxas (CUDA 13, sm_90) gave the float16 MAXG = 8 instance
// 128 registers and spilled 8 bytes; a cap of 168 (at 128 threads, still 3 blocks per SM) has no
// spills in any instance. (__maxnreg__ and __launch_bounds__ cannot be combined.)
#if defined(BALCONY_CUDA_HARNESS)
#define BALCONY_DECODE_SPLIT_BOUNDS
#else
#define BALCONY_DECODE_SPLIT_BOUNDS __maxnreg__(168)
#endif

// grid (num_splits, Hkv * head_groups, B); block kDecodeWarps warps. A block takes kv head h of
// sequence b, the query heads g0 .. g0 + MAXG - 1 of its group (head_groups = ceil(G / MAXG)) and
// split j. Each row of a warp is L = 32 / ROWS lanes holding one cache position at a time: lane c
// of a row owns the 16-byte packs c, c + L, ... (PPL of them) of the K and V rows, so a warp reads
// ROWS whole rows per step with coalesced 16-byte loads, and K and V are read once for all MAXG
// heads. Scores are reduced over the row's lanes with shuffles; each row keeps its own online
// softmax state in registers; rows then merge through shuffles, warps through shared memory.
template <typename T, int VEC, int PPL, int MAXG>
__global__ void BALCONY_DECODE_SPLIT_BOUNDS decode_attention_split_kernel(DecodeAttentionParams<T> p, int lanes_per_row) {
  using P = Pack<T, VEC>;
  BALCONY_DYNAMIC_SHARED(float, smem);
  const int L = lanes_per_row, rows = kWarpSize / L;
  const int split = blockIdx.x, b = blockIdx.z;
  const int groups = (p.G + MAXG - 1) / MAXG;
  const int h = blockIdx.y / groups, g0 = (blockIdx.y % groups) * MAXG;
  const int gn = p.G - g0 < MAXG ? p.G - g0 : MAXG;
  const int Hq = p.Hkv * p.G, D = p.D, npack = D / VEC;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row = lane / L, c = lane % L;

  long long len = load_len(p.seq_lens, p.seq_lens_64, b);
  len = len > p.S ? p.S : len;  // the host does not check lengths on the GPU
  const long long first = static_cast<long long>(split) * p.chunk;
  const long long p_end = first + p.chunk < len ? first + p.chunk : len;
  const long long lo = p.window > 0 && len > p.window ? len - p.window : 0;  // (a sliding window)
  const long long p_begin = first > lo ? first : lo;  // a split wholly before the window does no work

  float* qs = smem;                        // [MAXG][D] query * scale
  float* wm = qs + MAXG * D;               // [warps][MAXG]
  float* wl = wm + kDecodeWarps * MAXG;    // [warps][MAXG]
  float* wacc = wl + kDecodeWarps * MAXG;  // [warps][MAXG][D]
  for (int i = threadIdx.x; i < MAXG * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    qs[i] = g < gn ? to_float(p.query[b * p.q_sb + (h * p.G + g0 + g) * p.q_sh + d]) * p.scale : 0.f;
  }
  __syncthreads();

  SoftmaxState<MAXG, PPL, VEC> st;
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    st.m[g] = -INFINITY;
    st.l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < PPL * VEC; ++e) st.acc[g][e] = 0.f;
  }

  const T* kbase = p.key_cache + b * p.k_sb + h * p.k_sh;
  const T* vbase = p.value_cache + b * p.v_sb + h * p.v_sh;
  // The loop bound is uniform over the warp so that every lane takes part in the shuffles. The
  // next step's K and V packs are loaded before this step's math, so two rows per lane are in flight.
  const int step = kDecodeWarps * rows;
  long long base = p_begin + warp * rows;
  P kp[PPL], vp[PPL];
  load_kv_row<T, VEC, PPL>(kbase, p.k_ss, vbase, p.v_ss, base + row, p_end, c, L, npack, kp, vp);
  for (; base < p_end; base += step) {
    const long long pos = base + row;
    const bool valid = pos < p_end;
    P kn[PPL], vn[PPL];
    load_kv_row<T, VEC, PPL>(kbase, p.k_ss, vbase, p.v_ss, pos + step, p_end, c, L, npack, kn, vn);
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= gn) break;  // uniform over the block
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < PPL; ++k) {
        const int pk = c + k * L;
        if (pk < npack) {
          // 16-byte shared loads: D % VEC == 0 and VEC >= 4 keep every query pack aligned.
          const Pack<float, VEC> q = *reinterpret_cast<const Pack<float, VEC>*>(qs + g * D + pk * VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e) s += q.v[e] * to_float(kp[k].v[e]);
        }
      }
      for (int off = L / 2; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
      if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);  // soft-capped scores (Gemma 2)
      if (valid) {
        const float mn = fmaxf(st.m[g], s);
        const float alpha = __expf(st.m[g] - mn);  // 0 while the state is empty (m = -inf)
        const float pr = __expf(s - mn);
        st.l[g] = st.l[g] * alpha + pr;
        st.m[g] = mn;
#pragma unroll
        for (int k = 0; k < PPL; ++k)
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            st.acc[g][k * VEC + e] = st.acc[g][k * VEC + e] * alpha + pr * to_float(vp[k].v[e]);
      }
    }
#pragma unroll
    for (int k = 0; k < PPL; ++k) {
      kp[k] = kn[k];
      vp[k] = vn[k];
    }
  }

  // Merge the rows of the warp: lanes c, c + L, c + 2L, ... own the same output elements.
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    for (int off = L; off < kWarpSize; off <<= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, st.m[g], off);
      const float l2 = __shfl_xor_sync(kFullMask, st.l[g], off);
      float wa, wb;
      merge_ml(st.m[g], st.l[g], m2, l2, wa, wb);
#pragma unroll
      for (int e = 0; e < PPL * VEC; ++e) {
        const float a2 = __shfl_xor_sync(kFullMask, st.acc[g][e], off);
        st.acc[g][e] = st.acc[g][e] * wa + a2 * wb;
      }
    }
  }
  if (row == 0) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (c == 0) {
        wm[warp * MAXG + g] = st.m[g];
        wl[warp * MAXG + g] = st.l[g];
      }
#pragma unroll
      for (int k = 0; k < PPL; ++k) {
        const int pk = c + k * L;
        if (pk < npack)
#pragma unroll
          for (int e = 0; e < VEC; ++e) wacc[(warp * MAXG + g) * D + pk * VEC + e] = st.acc[g][k * VEC + e];
      }
    }
  }
  __syncthreads();

  // Merge the warps and write: the output directly (one split) or this split's partial.
  for (int i = threadIdx.x; i < gn * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) M = fmaxf(M, wm[w * MAXG + g]);
    float lsum = 0.f, o = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float wt = __expf(wm[w * MAXG + g] - M);
        lsum += wl[w * MAXG + g] * wt;
        o += wacc[(w * MAXG + g) * D + d] * wt;
      }
    }
    const long long qrow = static_cast<long long>(b) * Hq + h * p.G + g0 + g;
    if (p.num_splits == 1) {
      p.out[qrow * D + d] = from_float<T>(lsum > 0.f ? o / lsum : 0.f);  // an empty sequence gives zeros
    } else {
      const long long part = qrow * p.num_splits + split;
      p.part_o[part * D + d] = o;
      if (d == 0) {
        p.part_ml[part * 2] = M;
        p.part_ml[part * 2 + 1] = lsum;
      }
    }
  }
}

// One warp per output row (b, query head): out[d] = sum_j w_j o_j[d] / sum_j w_j l_j with
// w_j = exp(m_j - M), M = max_j m_j. Lanes own output elements d; each recomputes the weights
// (a few exps per split) rather than sharing them through memory.
template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * kWarpSize)
    decode_attention_merge_kernel(const float* __restrict__ part_ml, const float* __restrict__ part_o, T* out,
                                  int rows, int splits, int D) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const long long qrow = static_cast<long long>(blockIdx.x) * kDecodeWarps + warp;
  if (qrow >= rows) return;  // whole warps leave; no block barrier follows
  const float* ml = part_ml + qrow * splits * 2;
  float M = -INFINITY;
  for (int j = lane; j < splits; j += kWarpSize) M = fmaxf(M, ml[2 * j]);
  M = warp_reduce_max(M);
  float lsum = 0.f;
  if (M != -INFINITY)
    for (int j = lane; j < splits; j += kWarpSize) lsum += __expf(ml[2 * j] - M) * ml[2 * j + 1];
  lsum = warp_reduce_sum(lsum);
  const float inv = lsum > 0.f ? 1.0f / lsum : 0.f;  // an empty sequence gives zeros
  const float* po = part_o + qrow * splits * D;
  for (int d = lane; d < D; d += kWarpSize) {
    float o = 0.f;
    for (int j = 0; j < splits; ++j) {
      const float mj = ml[2 * j];
      if (mj != -INFINITY) o += __expf(mj - M) * po[static_cast<long long>(j) * D + d];  // skips empty splits
    }
    out[qrow * D + d] = from_float<T>(o * inv);
  }
}

// Query heads per block, and the shared memory of the split kernel.
inline int decode_max_group(int G) { return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8; }
inline size_t decode_split_smem(int maxg, int D) {
  return sizeof(float) * (static_cast<size_t>(maxg) * D * (1 + kDecodeWarps) + 2 * kDecodeWarps * maxg);
}

// Whether the vectorised kernel takes this layout: D a multiple of the 16-byte pack with at most
// 32 * 2 packs, 16-byte aligned bases and strides (pack_aligned).
template <typename T>
bool decode_attention_supported(const DecodeAttentionParams<T>& p) {
  constexpr int N = Pack<T>::kElems;
  return p.D / N <= (sizeof(T) == 4 ? 64 : 32) &&
         pack_aligned(N, {p.query, p.key_cache, p.value_cache},
                      {p.D, p.q_sb, p.q_sh, p.k_sb, p.k_sh, p.k_ss, p.v_sb, p.v_sh, p.v_ss});
}

template <typename T, int PPL, int MAXG>
cudaError_t launch_decode_split(const DecodeAttentionParams<T>& p, int B, int lanes, cudaStream_t stream) {
  constexpr int N = Pack<T>::kElems;
  const int groups = (p.G + MAXG - 1) / MAXG;
  const dim3 grid(p.num_splits, p.Hkv * groups, B);
  const size_t smem = decode_split_smem(MAXG, p.D);
  BALCONY_LAUNCH((decode_attention_split_kernel<T, N, PPL, MAXG>), grid, dim3(kDecodeWarps * kWarpSize), smem, stream,
                 p, lanes);
  return BALCONY_LAST_ERROR();
}

template <typename T, int PPL>
cudaError_t launch_decode_split_g(const DecodeAttentionParams<T>& p, int B, int lanes, cudaStream_t stream) {
  switch (decode_max_group(p.G)) {
    case 1: return launch_decode_split<T, PPL, 1>(p, B, lanes, stream);
    case 2: return launch_decode_split<T, PPL, 2>(p, B, lanes, stream);
    case 4: return launch_decode_split<T, PPL, 4>(p, B, lanes, stream);
    default: return launch_decode_split<T, PPL, 8>(p, B, lanes, stream);
  }
}

// p.num_splits and p.chunk set by the caller; part_ml/part_o hold B*Hq*num_splits*(2 | D) floats
// when num_splits > 1. Returns cudaErrorInvalidValue for a layout decode_attention_supported rejects.
template <typename T>
cudaError_t launch_decode_attention(const DecodeAttentionParams<T>& p, int B, cudaStream_t stream) {
  if (B == 0 || p.Hkv == 0 || p.G == 0 || p.D == 0) return cudaSuccess;
  if (!decode_attention_supported(p)) return cudaErrorInvalidValue;
  constexpr int N = Pack<T>::kElems;
  const int npack = p.D / N;
  const int ppl = npack > 32 ? 2 : 1;
  int lanes = 1;
  while (lanes < (npack + ppl - 1) / ppl) lanes <<= 1;
  cudaError_t err;
  if constexpr (sizeof(T) == 4) {
    err = ppl == 2 ? launch_decode_split_g<T, 2>(p, B, lanes, stream) : launch_decode_split_g<T, 1>(p, B, lanes, stream);
  } else {
    err = launch_decode_split_g<T, 1>(p, B, lanes, stream);
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int rows = B * p.Hkv * p.G;
  BALCONY_LAUNCH((decode_attention_merge_kernel<T>), dim3(ceil_div(rows, kDecodeWarps)),
                 dim3(kDecodeWarps * kWarpSize), 0, stream, p.part_ml,
                 p.part_o, p.out, rows, p.num_splits, p.D);
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

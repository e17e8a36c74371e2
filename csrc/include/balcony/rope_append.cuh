// Rotary embedding (rotate-half) on query and key, with key/value appended to the KV cache,
// CUDA kernel and launcher (torch-free).
#pragma once
#include "balcony/device.h"
#include "balcony/pack.h"

namespace balcony::cuda {

template <typename T>
struct RopeAppendParams {
  T* query;  // [B,T,Hq,D], strides q_sb, q_st, q_sh (elements), last dim contiguous
  long long q_sb, q_st, q_sh;
  const T* key;  // [B,T,Hkv,D]
  long long k_sb, k_st, k_sh;
  const T* value;
  long long v_sb, v_st, v_sh;
  T* key_cache;  // [B,Hkv,S,D] contiguous
  T* value_cache;
  const long long* positions;  // [B,T] contiguous
  const float* cos;            // [P, R/2] contiguous: the first R <= D dimensions of a head are rotated
  const float* sin;
  int T_len, Hq, Hkv, D, S, P;
  int rot_half;  // R/2 (D/2: full rotary)
};

// One block per token (b, t), all its heads. Thread i handles VEC elements of the first half of a
// head's rotated dimensions and the matching VEC of the second half (so the rotation is local to the
// thread), then the key's unrotated dimensions (partial rotary) and the value rows are copied in packs
// of VEC. A padding position (< 0) is skipped; so is a position
// >= S or >= P (the host does not check positions on the GPU; see csrc/cuda/attention.cu).
template <typename T, int VEC>
__global__ void rope_append_kernel(RopeAppendParams<T> p) {
  using P = Pack<T, VEC>;
  using F = Pack<float, VEC>;
  const int token = blockIdx.x;
  const long long pos = p.positions[token];
  if (pos < 0 || pos >= p.S || pos >= p.P) return;
  const int b = token / p.T_len, t = token % p.T_len;
  const int half = p.rot_half, nvec = half / VEC;
  const float* cs = p.cos + pos * half;
  const float* sn = p.sin + pos * half;
  const int rot_items = (p.Hq + p.Hkv) * nvec;
  for (int i = threadIdx.x; i < rot_items; i += blockDim.x) {
    const int head = i / nvec, off = (i % nvec) * VEC;
    const T* src;
    T* dst;
    if (head < p.Hq) {
      T* q = p.query + b * p.q_sb + t * p.q_st + head * p.q_sh;
      src = q;
      dst = q;
    } else {
      const int h = head - p.Hq;
      src = p.key + b * p.k_sb + t * p.k_st + h * p.k_sh;
      dst = p.key_cache + ((static_cast<long long>(b) * p.Hkv + h) * p.S + pos) * p.D;
    }
    const P x1 = *reinterpret_cast<const P*>(src + off);
    const P x2 = *reinterpret_cast<const P*>(src + half + off);
    const F c = *reinterpret_cast<const F*>(cs + off);
    const F s = *reinterpret_cast<const F*>(sn + off);
    P o1, o2;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = to_float(x1.v[j]), bb = to_float(x2.v[j]);
      o1.v[j] = from_float<T>(a * c.v[j] - bb * s.v[j]);
      o2.v[j] = from_float<T>(bb * c.v[j] + a * s.v[j]);
    }
    *reinterpret_cast<P*>(dst + off) = o1;
    *reinterpret_cast<P*>(dst + half + off) = o2;
  }
  const int rest = p.D - 2 * half, rvec = rest / VEC;
  for (int i = threadIdx.x; i < p.Hkv * rvec; i += blockDim.x) {
    const int h = i / rvec, off = 2 * half + (i % rvec) * VEC;
    const T* src = p.key + b * p.k_sb + t * p.k_st + h * p.k_sh;
    T* dst = p.key_cache + ((static_cast<long long>(b) * p.Hkv + h) * p.S + pos) * p.D;
    *reinterpret_cast<P*>(dst + off) = *reinterpret_cast<const P*>(src + off);
  }
  const int dvec = p.D / VEC;
  for (int i = threadIdx.x; i < p.Hkv * dvec; i += blockDim.x) {
    const int h = i / dvec, off = (i % dvec) * VEC;
    const T* src = p.value + b * p.v_sb + t * p.v_st + h * p.v_sh;
    T* dst = p.value_cache + ((static_cast<long long>(b) * p.Hkv + h) * p.S + pos) * p.D;
    *reinterpret_cast<P*>(dst + off) = *reinterpret_cast<const P*>(src + off);
  }
}

template <typename T>
cudaError_t launch_rope_append(const RopeAppendParams<T>& p, int tokens, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  constexpr int N = Pack<T>::kElems;
  const int half = p.rot_half;
  // The float cos/sin rows must be 16-byte aligned too: half % 4 == 0 (given half % N == 0 and N >= 4);
  // D % N == 0 for the copied dimensions.
  const bool vec = pack_aligned(N, {p.query, p.key, p.value, p.key_cache, p.value_cache, p.cos, p.sin},
                                {half, p.D, p.q_sb, p.q_st, p.q_sh, p.k_sb, p.k_st, p.k_sh, p.v_sb, p.v_st, p.v_sh});
  const int items = (p.Hq + p.Hkv) * (vec ? half / N : half);
  int threads = ((items + kWarpSize - 1) / kWarpSize) * kWarpSize;
  threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
  if (vec)
    BALCONY_LAUNCH((rope_append_kernel<T, N>), dim3(tokens), dim3(threads), 0, stream, p);
  else
    BALCONY_LAUNCH((rope_append_kernel<T, 1>), dim3(tokens), dim3(threads), 0, stream, p);
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

// Next-token sampling (greedy / temperature / top-k / top-p), CUDA (torch-free). One block per
// row. No sort: the thresholds are found by bisection on the float bit pattern of the
// unnormalised probabilities e = exp((x - max) / T) (monotone for non-negative floats), each step
// one count + mass block reduction; the same algorithm as the CPU kernel
// (csrc/cpu/sample_tokens_kernel.h), so both pick the same token for the same uniform up to
// summation rounding at a boundary.
#pragma once
#include "balcony/device.h"

namespace balcony::cuda {

BALCONY_DEVICE float bits_as_float(unsigned b) { return __uint_as_float(b); }

// Count (exact: float integers below 2^24) and mass of e >= tau over the row.
BALCONY_DEVICE void block_count_mass(const float* e, int vocab, float tau, float* count, double* mass, float* fs,
                                     double* ds) {
  float c = 0.f, m = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = e[i];
    if (v >= tau) {
      c += 1.f;
      m += v;
    }
  }
  *count = block_reduce_sum(c, fs);
  *mass = block_reduce_sum(static_cast<double>(m), ds);
}

// scratch: rows * vocab floats (the e values of each row). Parameters as in the op: temperature
// <= 0 greedy; top_k <= 0 or >= vocab all; top_p >= 1 all; uniform clamped to [0, 1).
template <typename T>
__global__ void sample_tokens_kernel(const T* __restrict__ logits, int64_t stride, int vocab,
                                     const float* __restrict__ temperature, const int64_t* __restrict__ top_k,
                                     const float* __restrict__ top_p, const float* __restrict__ uniform,
                                     int64_t* __restrict__ out, float* __restrict__ scratch) {
  BALCONY_SHARED(float, fs, 32);
  BALCONY_SHARED(double, ds, 32);
  const int64_t row = blockIdx.x;
  const T* x = logits + row * stride;
  const float temp = temperature[row];
  // Maximum, and for greedy the lowest index holding it (threads walk increasing indices).
  float best = -INFINITY;
  int best_idx = vocab;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = to_float(x[i]);
    if (v > best) {
      best = v;
      best_idx = i;
    }
  }
  const float m = block_reduce_max(best, fs);
  if (!(temp > 0.f)) {
    const float neg = block_reduce_max(best == m ? -static_cast<float>(best_idx) : -INFINITY, fs);
    if (threadIdx.x == 0) {
      const float idx = -neg;
      out[row] = idx >= 0.f && idx < static_cast<float>(vocab) ? static_cast<int64_t>(idx) : 0;
    }
    return;
  }
  float* e = scratch + row * static_cast<int64_t>(vocab);
  const float inv = 1.0f / temp;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) e[i] = expf((to_float(x[i]) - m) * inv);
  __syncthreads();
  const unsigned kInfBits = 0x7f800000u;
  unsigned lo = 0;  // threshold bits; count(e >= 0) = vocab: always valid
  float count;
  double kept_mass;
  block_count_mass(e, vocab, 0.f, &count, &kept_mass, fs, ds);
  const int64_t k = top_k[row];
  if (k > 0 && k < vocab) {  // the largest tau with count(e >= tau) >= k
    unsigned hi = kInfBits;
    while (hi - lo > 1) {
      const unsigned mid = lo + (hi - lo) / 2;
      double mass;
      block_count_mass(e, vocab, bits_as_float(mid), &count, &mass, fs, ds);
      if (count >= static_cast<float>(k)) lo = mid; else hi = mid;
    }
    block_count_mass(e, vocab, bits_as_float(lo), &count, &kept_mass, fs, ds);
  }
  const float p = top_p[row];
  if (p < 1.f) {  // the largest tau with mass(e >= tau) >= top_p * kept mass
    const double target = static_cast<double>(p) * kept_mass;
    unsigned hi = kInfBits;
    while (hi - lo > 1) {
      const unsigned mid = lo + (hi - lo) / 2;
      double mass;
      block_count_mass(e, vocab, bits_as_float(mid), &count, &mass, fs, ds);
      if (count > 0.f && mass >= target) lo = mid; else hi = mid;
    }
  }
  const float tau = bits_as_float(lo);
  // Inverse CDF in vocabulary order: each thread owns a contiguous segment; an exclusive block
  // scan of the segment masses gives each its starting cumulative mass.
  // NOTE: the segment walk is uncoalesced, but it is one pass over a row just read (L2-resident).
  const int seg = (vocab + blockDim.x - 1) / blockDim.x;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * seg), end = min(vocab, begin + seg);
  float local_f = 0.f;
  for (int i = begin; i < end; ++i)
    if (e[i] >= tau) local_f += e[i];
  const double local = local_f;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, num_warps = blockDim.x / kWarpSize;
  double incl = local;
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const double y = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += y;
  }
  double excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0.0;
  if (lane == kWarpSize - 1) ds[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double w = lane < num_warps ? ds[lane] : 0.0;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
      const double y = __shfl_up_sync(kFullMask, w, off);
      if (lane >= off) w += y;
    }
    if (lane < num_warps) ds[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  const double total = ds[num_warps - 1];
  if (warp > 0) excl += ds[warp - 1];
  float u = uniform[row];
  u = u >= 0.f ? (u < 1.f ? u : 0x1.fffffep-1f) : 0.f;  // clamp to [0, 1); NaN -> 0
  const double target = static_cast<double>(u) * total;
  int pick = -1, last = -1;
  double cum = excl;
  for (int i = begin; i < end; ++i) {
    const float v = e[i];
    if (!(v >= tau)) continue;
    last = i;
    cum += v;
    if (cum > target) {
      pick = i;
      break;
    }
  }
  __syncthreads();  // ds is reused by the reductions below
  const float first = -block_reduce_max(pick >= 0 ? -static_cast<float>(pick) : -INFINITY, fs);
  const float last_kept = block_reduce_max(static_cast<float>(last), fs);
  if (threadIdx.x == 0)
    out[row] = first < static_cast<float>(vocab) ? static_cast<int64_t>(first)
                                                   : static_cast<int64_t>(last_kept > 0.f ? last_kept : 0.f);
}

template <typename T>
cudaError_t launch_sample_tokens(const T* logits, int64_t stride, int64_t rows, int vocab, const float* temperature,
                                 const int64_t* top_k, const float* top_p, const float* uniform, int64_t* out,
                                 float* scratch, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  // NOTE: 512 threads: a 49152 row is 96 entries per thread per bisection pass.
  int threads = ((ceil_div(vocab, 4) + kWarpSize - 1) / kWarpSize) * kWarpSize;
  threads = threads < 32 ? 32 : (threads > 512 ? 512 : threads);
  BALCONY_LAUNCH((sample_tokens_kernel<T>), dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream, logits,
                 stride, vocab, temperature, top_k, top_p, uniform, out, scratch);
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

// RMSNorm and fused residual-add + RMSNorm, CUDA kernels and launchers (torch-free).
// One block per row; 16-byte vector loads when the row allows; float32 accumulation; block reduction.
#pragma once
#include "balcony/device.h"

namespace balcony::cuda {

template <typename T>
struct alignas(16) Pack16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// residual == nullptr: out = w * x * rsqrt(mean(x^2) + eps)
// residual != nullptr: residual = x + residual (rounded to T); out = rmsnorm(residual) * w
// VEC: rows are 16-byte aligned and hidden % Pack16<T>::N == 0.
template <typename T, bool VEC>
__global__ void rms_norm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w, T* out,
                                int64_t out_stride, T* residual, int64_t res_stride, int hidden, float eps) {
  BALCONY_SHARED(float, scratch, 32);
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  T* orow = out + row * out_stride;
  T* rr = residual ? residual + row * res_stride : nullptr;
  float sumsq = 0.f;
  if constexpr (VEC) {
    using P = Pack16<T>;
    const int n = hidden / P::N;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      P a = reinterpret_cast<const P*>(xr)[i];
      if (rr) {
        P r = reinterpret_cast<const P*>(rr)[i];
#pragma unroll
        for (int j = 0; j < P::N; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(r.v[j]));
        reinterpret_cast<P*>(rr)[i] = a;
      }
#pragma unroll
      for (int j = 0; j < P::N; ++j) {
        float f = to_float(a.v[j]);
        sumsq += f * f;
      }
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
      T a = xr[i];
      if (rr) {
        a = from_float<T>(to_float(a) + to_float(rr[i]));
        rr[i] = a;
      }
      float f = to_float(a);
      sumsq += f * f;
    }
  }
  const float rstd = rsqrtf(block_reduce_sum(sumsq, scratch) / static_cast<float>(hidden) + eps);
  // block_reduce_sum ends with a barrier, so the residual written above is visible to all threads.
  const T* src = rr ? rr : xr;
  if constexpr (VEC) {
    using P = Pack16<T>;
    const int n = hidden / P::N;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      P a = reinterpret_cast<const P*>(src)[i];
      P g = reinterpret_cast<const P*>(w)[i];
      P o;
#pragma unroll
      for (int j = 0; j < P::N; ++j) o.v[j] = from_float<T>(to_float(a.v[j]) * rstd * to_float(g.v[j]));
      reinterpret_cast<P*>(orow)[i] = o;
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
      orow[i] = from_float<T>(to_float(src[i]) * rstd * to_float(w[i]));
  }
}

inline int rms_norm_block_size(int hidden, int elems_per_thread) {
  int threads = ceil_div(hidden, elems_per_thread);
  threads = ((threads + kWarpSize - 1) / kWarpSize) * kWarpSize;
  return threads < 64 ? 64 : (threads > 1024 ? 1024 : threads);
}

template <typename T>
cudaError_t launch_rms_norm(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride, T* residual,
                            int64_t res_stride, int64_t rows, int hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int N = Pack16<T>::N;
  auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; };
  const bool vec = hidden % N == 0 && x_stride % N == 0 && out_stride % N == 0 && aligned(x) && aligned(w) &&
                   aligned(out) && (residual == nullptr || (res_stride % N == 0 && aligned(residual)));
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec) {
    const dim3 block(rms_norm_block_size(hidden / N, 1));
    BALCONY_LAUNCH((rms_norm_kernel<T, true>), grid, block, 0, stream, x, x_stride, w, out, out_stride, residual,
                   res_stride, hidden, eps);
  } else {
    const dim3 block(rms_norm_block_size(hidden, 4));
    BALCONY_LAUNCH((rms_norm_kernel<T, false>), grid, block, 0, stream, x, x_stride, w, out, out_stride, residual,
                   res_stride, hidden, eps);
  }
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

// SiLU-and-multiply (SwiGLU activation) and its backward, CUDA kernels and launchers (torch-free).
// A row of the input is [gate (inter) | up (inter)]. Grid-stride in two dimensions: blockIdx.y over
// rows, blockIdx.x * blockDim.x + threadIdx.x over chunks of the row (no integer division);
// 16-byte vector accesses when every row start is aligned; float32 math.
#pragma once
#include <algorithm>
#include <cstdint>

#include "balcony/device.h"
#include "balcony/pack.h"

namespace balcony::cuda {

BALCONY_DEVICE float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// out = silu(gate) * up. N elements per access (a full Pack<T> when vectorised, else 1).
template <typename T, int N>
__global__ void silu_and_mul_kernel(const T* __restrict__ in, int64_t in_stride, T* __restrict__ out,
                                    int64_t out_stride, int64_t rows, int inter) {
  using P = Pack<T, N>;
  const int chunks = inter / N;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const P* gate = reinterpret_cast<const P*>(in + row * in_stride);
    const P* up = reinterpret_cast<const P*>(in + row * in_stride + inter);
    P* o = reinterpret_cast<P*>(out + row * out_stride);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += gridDim.x * blockDim.x) {
      const P a = gate[c], b = up[c];
      P r;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float gv = to_float(a.v[j]);
        r.v[j] = from_float<T>(gv * sigmoidf(gv) * to_float(b.v[j]));
      }
      o[c] = r;
    }
  }
}

// With s = sigmoid(gate): grad_gate = grad * up * s * (1 + gate * (1 - s)), grad_up = grad * gate * s.
template <typename T, int N>
__global__ void silu_and_mul_backward_kernel(const T* __restrict__ grad, int64_t grad_stride,
                                             const T* __restrict__ in, int64_t in_stride, T* __restrict__ grad_in,
                                             int64_t gi_stride, int64_t rows, int inter) {
  using P = Pack<T, N>;
  const int chunks = inter / N;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const P* gr = reinterpret_cast<const P*>(grad + row * grad_stride);
    const P* gate = reinterpret_cast<const P*>(in + row * in_stride);
    const P* up = reinterpret_cast<const P*>(in + row * in_stride + inter);
    P* dgate = reinterpret_cast<P*>(grad_in + row * gi_stride);
    P* dup = reinterpret_cast<P*>(grad_in + row * gi_stride + inter);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += gridDim.x * blockDim.x) {
      const P gp = gr[c], a = gate[c], b = up[c];
      P da, db;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float gv = to_float(gp.v[j]), av = to_float(a.v[j]), bv = to_float(b.v[j]);
        const float s = sigmoidf(av);
        da.v[j] = from_float<T>(gv * bv * s * (1.0f + av * (1.0f - s)));
        db.v[j] = from_float<T>(gv * av * s);
      }
      dgate[c] = da;
      dup[c] = db;
    }
  }
}

// Grid for `rows` rows of `chunks` accesses each: 256 threads per block; blocks along x cover a
// row (capped: they stride), blocks along y take rows (capped at the hardware limit: they stride).
inline void silu_and_mul_grid(int64_t rows, int chunks, dim3* grid, dim3* block) {
  constexpr int kThreads = 256;
  *block = dim3(kThreads);
  const int gx = std::min(std::max(1, ceil_div(chunks, kThreads)), 1024);
  const int64_t gy = std::min<int64_t>(rows, 65535);
  *grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

template <typename T>
cudaError_t launch_silu_and_mul(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t rows, int inter,
                                cudaStream_t stream) {
  if (rows == 0 || inter == 0) return cudaSuccess;
  constexpr int N = Pack<T>::kElems;
  const bool vec = pack_aligned(N, {in, out}, {inter, in_stride, out_stride});
  dim3 grid, block;
  silu_and_mul_grid(rows, vec ? inter / N : inter, &grid, &block);
  if (vec)
    BALCONY_LAUNCH((silu_and_mul_kernel<T, N>), grid, block, 0, stream, in, in_stride, out, out_stride, rows, inter);
  else
    BALCONY_LAUNCH((silu_and_mul_kernel<T, 1>), grid, block, 0, stream, in, in_stride, out, out_stride, rows, inter);
  return BALCONY_LAST_ERROR();
}

template <typename T>
cudaError_t launch_silu_and_mul_backward(const T* grad, int64_t grad_stride, const T* in, int64_t in_stride,
                                         T* grad_in, int64_t gi_stride, int64_t rows, int inter, cudaStream_t stream) {
  if (rows == 0 || inter == 0) return cudaSuccess;
  constexpr int N = Pack<T>::kElems;
  const bool vec = pack_aligned(N, {grad, in, grad_in}, {inter, grad_stride, in_stride, gi_stride});
  dim3 grid, block;
  silu_and_mul_grid(rows, vec ? inter / N : inter, &grid, &block);
  if (vec)
    BALCONY_LAUNCH((silu_and_mul_backward_kernel<T, N>), grid, block, 0, stream, grad, grad_stride, in, in_stride,
                   grad_in, gi_stride, rows, inter);
  else
    BALCONY_LAUNCH((silu_and_mul_backward_kernel<T, 1>), grid, block, 0, stream, grad, grad_stride, in, in_stride,
                   grad_in, gi_stride, rows, inter);
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

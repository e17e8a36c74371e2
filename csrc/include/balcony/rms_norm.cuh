// RMSNorm (forward and backward) and fused residual-add + RMSNorm, CUDA kernels and launchers
// (torch-free). Forward: one block per row; 16-byte vector loads when the row allows; float32
// accumulation; block reduction.
#pragma once
#include <algorithm>
#include <cstdint>

#include "balcony/device.h"
#include "balcony/pack.h"

namespace balcony::cuda {

// residual == nullptr: out = w * x * rsqrt(mean(x^2) + eps)
// residual != nullptr: residual = x + residual (rounded to T); out = rmsnorm(residual) * w
// VEC: rows are 16-byte aligned and hidden % Pack<T>::kElems == 0.
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
    using P = Pack<T>;
    const int n = hidden / P::kElems;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      P a = reinterpret_cast<const P*>(xr)[i];
      if (rr) {
        P r = reinterpret_cast<const P*>(rr)[i];
#pragma unroll
        for (int j = 0; j < P::kElems; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(r.v[j]));
        reinterpret_cast<P*>(rr)[i] = a;
      }
#pragma unroll
      for (int j = 0; j < P::kElems; ++j) {
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
    using P = Pack<T>;
    const int n = hidden / P::kElems;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      P a = reinterpret_cast<const P*>(src)[i];
      P g = reinterpret_cast<const P*>(w)[i];
      P o;
#pragma unroll
      for (int j = 0; j < P::kElems; ++j) o.v[j] = from_float<T>(to_float(a.v[j]) * rstd * to_float(g.v[j]));
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
  constexpr int N = Pack<T>::kElems;
  const bool vec = pack_aligned(N, {x, w, out}, {hidden, x_stride, out_stride}) &&
                   (residual == nullptr || pack_aligned(N, {residual}, {res_stride}));
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

// ---------------------------------------------------------------------------------------------
// Backward. With r = rsqrt(mean(x^2) + eps) and gw = g * w:
//   grad_x = r * gw - x * r^3 * mean(gw * x)          (per row)
//   grad_w = sum over rows of g * x * r               (per column)
// rms_norm_backward_kernel: a grid of `parts` blocks, block b taking rows b, b + parts, ...; each
// thread owns the same K chunks of N = 16 / sizeof(T) columns in every row, keeps its row of x and
// g in registers between the reduction and the write (one pass over memory), and accumulates its
// columns' grad_w in float32 registers across rows. At the end each block writes its partial sums
// (one row of `partial`, [parts, hidden]); sum_partials_kernel then adds the rows in a fixed order,
// so grad_w is deterministic (no atomics).

#if defined(BALCONY_CUDA_HARNESS)
#define BALCONY_RMS_LAUNCH_BOUNDS(n)
#else
#define BALCONY_RMS_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#endif

// Chunk `c` of a row (N = Pack<T>::kElems consecutive elements): one 16-byte access when VEC, else
// element by element, zero past `hidden` (loads) or nothing written there (stores).
template <typename T, bool VEC>
BALCONY_DEVICE Pack<T> load_chunk(const T* row, int c, int hidden) {
  constexpr int N = Pack<T>::kElems;
  if constexpr (VEC) {
    return reinterpret_cast<const Pack<T>*>(row)[c];
  } else {
    const T* src = row + c * N;
    const int n = hidden - c * N;
    Pack<T> p;
#pragma unroll
    for (int j = 0; j < N; ++j) p.v[j] = j < n ? src[j] : from_float<T>(0.f);
    return p;
  }
}

template <typename T, bool VEC>
BALCONY_DEVICE void store_chunk(T* row, int c, int hidden, const Pack<T>& p) {
  constexpr int N = Pack<T>::kElems;
  if constexpr (VEC) {
    reinterpret_cast<Pack<T>*>(row)[c] = p;
  } else {
    T* dst = row + c * N;
    const int n = hidden - c * N;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) dst[j] = p.v[j];
  }
}

// Two block-wide sums at once; `scratch` holds 64 floats; blockDim.x a multiple of 32.
BALCONY_DEVICE void block_reduce_sum2(float& a, float& b, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  a = warp_reduce_sum(a);
  b = warp_reduce_sum(b);
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = warp_reduce_sum(lane < num_warps ? scratch[lane] : 0.f);
  b = warp_reduce_sum(lane < num_warps ? scratch[32 + lane] : 0.f);
  __syncthreads();  // scratch may be reused right after
}

// Most threads per block for K chunks per thread: what keeps x, g (K chunks each) and the K chunks
// of float accumulators in registers without spilling.
// NOTE: measured with -Xptxas -v (sm_90): K = 4 uses 78-128 registers when vectorised, and the
// element-wise (unaligned) variant spills at 128 for 16-bit types, hence 256 threads for it.
template <int K, bool VEC>
constexpr int rms_norm_backward_max_threads() {
  return K == 1 ? 1024 : (VEC ? 512 : 256);
}

template <typename T, bool VEC, int K>
__global__ void BALCONY_RMS_LAUNCH_BOUNDS((rms_norm_backward_max_threads<K, VEC>()))
    rms_norm_backward_kernel(const T* __restrict__ g, int64_t g_stride, const T* __restrict__ x, int64_t x_stride,
                             const T* __restrict__ w, T* __restrict__ grad_x, int64_t gx_stride,
                             float* __restrict__ partial, int64_t rows, int hidden, float eps) {
  constexpr int N = Pack<T>::kElems;
  BALCONY_SHARED(float, scratch, 64);
  const int chunks = (hidden + N - 1) / N;
  const float inv_h = 1.0f / static_cast<float>(hidden);
  float acc[K][N];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < N; ++j) acc[k][j] = 0.f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gr = g + row * g_stride;
    const T* xr = x + row * x_stride;
    // The row's chunks stay in registers in storage precision (half the registers of floats for
    // 16-bit types) from the reduction to the write: one pass over memory.
    Pack<T> xp[K], gp[K];
    float ss = 0.f, dot = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < chunks) {
        xp[k] = load_chunk<T, VEC>(xr, c, hidden);
        gp[k] = load_chunk<T, VEC>(gr, c, hidden);
        const Pack<T> wp = load_chunk<T, VEC>(w, c, hidden);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xv = to_float(xp[k].v[j]);
          ss += xv * xv;
          dot += to_float(gp[k].v[j]) * to_float(wp.v[j]) * xv;
        }
      }
    }
    block_reduce_sum2(ss, dot, scratch);
    const float r = rsqrtf(ss * inv_h + eps);
    const float coef = r * r * r * dot * inv_h;
    T* out = grad_x + row * gx_stride;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < chunks) {
        // NOTE: w is read again (an L1/L2 hit, shared by every row) rather than kept in registers,
        // which would cost K more packs per thread and limit the block size.
        const Pack<T> wp = load_chunk<T, VEC>(w, c, hidden);
        Pack<T> o;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xv = to_float(xp[k].v[j]), gv = to_float(gp[k].v[j]);
          o.v[j] = from_float<T>(r * gv * to_float(wp.v[j]) - coef * xv);
          acc[k][j] += gv * xv * r;
        }
        store_chunk<T, VEC>(out, c, hidden, o);
      }
    }
  }
  float* prow = partial + static_cast<int64_t>(blockIdx.x) * hidden;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (c < chunks && c * N + j < hidden) prow[c * N + j] = acc[k][j];
  }
}

// grad_w[col] = sum over p < parts of partial[p][col], p in increasing order within each of the
// blockDim.y lanes, then the lanes in increasing order: a fixed order, so deterministic.
// Block (32, 32): 32 columns per block, coalesced 128-byte rows of `partial` per warp.
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partial, int parts, int hidden, T* __restrict__ out) {
  BALCONY_SHARED(float, tile, 32 * 33);
  const int col = blockIdx.x * kWarpSize + threadIdx.x;
  float s = 0.f;
  if (col < hidden)
    for (int p = threadIdx.y; p < parts; p += blockDim.y) s += partial[static_cast<int64_t>(p) * hidden + col];
  tile[threadIdx.y * 33 + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float total = 0.f;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += tile[y * 33 + threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

// Launch shape of the backward (for the vectorised or the element-wise kernel, see
// rms_norm_backward_vectorized): chunks per thread, threads per block, and the number of blocks
// (= rows of the float32 `partial` scratch, [parts, hidden], that the caller allocates).
struct RmsNormBackwardShape {
  int k = 0;  // 0: hidden too large for these kernels (see rms_norm_backward_max_hidden)
  int threads = 0;
  int parts = 0;
};

// Whether the 16-byte vectorised kernel applies (every row start and the weight aligned).
template <typename T>
inline bool rms_norm_backward_vectorized(const T* g, int64_t g_stride, const T* x, int64_t x_stride, const T* w,
                                         const T* grad_x, int64_t gx_stride, int hidden) {
  constexpr int N = Pack<T>::kElems;
  return pack_aligned(N, {g, x, w, grad_x}, {hidden, g_stride, x_stride, gx_stride});
}

template <typename T>
constexpr int rms_norm_backward_max_hidden(bool vec) {
  return 4 * (vec ? rms_norm_backward_max_threads<4, true>() : rms_norm_backward_max_threads<4, false>()) *
         Pack<T>::kElems;
}

template <typename T>
inline RmsNormBackwardShape rms_norm_backward_shape(int64_t rows, int hidden, bool vec, int sm_count) {
  RmsNormBackwardShape s;
  const int chunks = ceil_div(hidden, Pack<T>::kElems);
  if (chunks <= rms_norm_backward_max_threads<1, true>()) {
    s.k = 1;
  } else if (hidden <= rms_norm_backward_max_hidden<T>(vec)) {
    s.k = 4;
  } else {
    return s;
  }
  s.threads = std::max(kWarpSize, ((ceil_div(chunks, s.k) + kWarpSize - 1) / kWarpSize) * kWarpSize);
  // NOTE: enough blocks to fill every SM (about 2048 resident threads each); more would only add
  // rows to the partial-sum scratch.
  const int64_t per_sm = std::max(1, 2048 / s.threads);
  s.parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, per_sm * std::max(1, sm_count))));
  return s;
}

template <typename T>
cudaError_t launch_rms_norm_backward(const T* g, int64_t g_stride, const T* x, int64_t x_stride, const T* w,
                                     T* grad_x, int64_t gx_stride, T* grad_w, float* partial,
                                     const RmsNormBackwardShape& shape, int64_t rows, int hidden, float eps,
                                     cudaStream_t stream) {
  if (shape.k == 0) return cudaErrorInvalidValue;
  if (hidden == 0) return cudaSuccess;
  const bool vec = rms_norm_backward_vectorized(g, g_stride, x, x_stride, w, grad_x, gx_stride, hidden);
  // The block may not exceed the __launch_bounds__ of the instance launched (K = 1: 1024 threads,
  // vectorised or not; K = 4: 512 vectorised, 256 element-wise).
  const int max_threads = shape.k == 1 ? rms_norm_backward_max_threads<1, false>()
                          : vec        ? rms_norm_backward_max_threads<4, true>()
                                       : rms_norm_backward_max_threads<4, false>();
  if (shape.threads > max_threads) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(shape.parts)), block(static_cast<unsigned>(shape.threads));
#define BALCONY_RMS_BWD(VEC, K)                                                                                   \
  BALCONY_LAUNCH((rms_norm_backward_kernel<T, VEC, K>), grid, block, 0, stream, g, g_stride, x, x_stride, w, grad_x, \
                 gx_stride, partial, rows, hidden, eps)
  if (shape.k == 1) {
    if (vec) BALCONY_RMS_BWD(true, 1);
    else BALCONY_RMS_BWD(false, 1);
  } else {
    if (vec) BALCONY_RMS_BWD(true, 4);
    else BALCONY_RMS_BWD(false, 4);
  }
#undef BALCONY_RMS_BWD
  cudaError_t err = BALCONY_LAST_ERROR();
  if (err != cudaSuccess) return err;
  BALCONY_LAUNCH((sum_partials_kernel<T>), dim3(ceil_div(hidden, kWarpSize)), dim3(kWarpSize, 32), 0, stream, partial,
                 shape.parts, hidden, grad_w);
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

// What every CUDA kernel header includes. The kernel headers (csrc/include/balcony/*.cuh) are
// compiled by nvcc for the GPU, and by the host compiler under the CPU execution harness
// (csrc/harness/, BALCONY_CUDA_HARNESS defined), which supplies threadIdx, barriers, warp
// primitives and launches. So kernel code keeps to this contract:
//   - static shared memory:  BALCONY_SHARED(type, name, count)   (a `type name[count]` array)
//   - dynamic shared memory: BALCONY_DYNAMIC_SHARED(type, name)  (a `type* name`)
//   - launches:              BALCONY_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
//   - launchers return cudaError_t (BALCONY_LAST_ERROR() after a launch);
//   - no inline PTX without a portable fallback under BALCONY_CUDA_HARNESS.
#pragma once

#if defined(BALCONY_CUDA_HARNESS)
#include "cuda_harness.h"  // csrc/harness/, on the include path of harness builds only
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define BALCONY_SHARED(type, name, count) __shared__ type name[count]
#define BALCONY_DYNAMIC_SHARED(type, name)                  \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
#define BALCONY_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define BALCONY_LAST_ERROR() cudaGetLastError()
#endif

#define BALCONY_DEVICE __device__ __forceinline__
#define BALCONY_HOST_DEVICE __host__ __device__ __forceinline__

namespace balcony::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// float <-> storage type conversions used by every kernel.
template <typename T> BALCONY_DEVICE float to_float(T x);
template <> BALCONY_DEVICE float to_float<float>(float x) { return x; }
template <> BALCONY_DEVICE float to_float<__half>(__half x) { return __half2float(x); }
template <> BALCONY_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> BALCONY_DEVICE T from_float(float x);
template <> BALCONY_DEVICE float from_float<float>(float x) { return x; }
template <> BALCONY_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> BALCONY_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
BALCONY_DEVICE T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
BALCONY_DEVICE T warp_reduce_max(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Sum over the block (float or double); every thread gets the result. `scratch` holds at least
// 32 values of T. blockDim.x must be a multiple of 32.
template <typename T>
BALCONY_DEVICE T block_reduce_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_reduce_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < num_warps ? scratch[lane] : T(0);
  total = warp_reduce_sum(total);
  __syncthreads();  // scratch may be reused right after
  return total;
}

BALCONY_DEVICE float block_reduce_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_reduce_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < num_warps ? scratch[lane] : -INFINITY;
  total = warp_reduce_max(total);
  __syncthreads();
  return total;
}

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace balcony::cuda

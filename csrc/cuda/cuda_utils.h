// Helpers for the CUDA op entry points: stream lookup, the SM count, dtype dispatch to the kernel's types.
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>

#include "../torch_utils.h"

namespace balcony::cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

#define BALCONY_CUDA_CHECK(expr)                                                              \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    TORCH_CHECK(err_ == cudaSuccess, "CUDA error in ", #expr, ": ", cudaGetErrorString(err_)); \
  } while (0)

// The number of SMs of `device`, queried once per device (the launch choices need it on every call).
inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int n = counts[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  BALCONY_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  n = std::max(1, n);
  if (cached) counts[device].store(n, std::memory_order_relaxed);
  return n;
}

// Calls body with `scalar_t` set to float, __half or __nv_bfloat16.
#define BALCONY_DISPATCH_CUDA_FLOATING(dtype, name, ...)                                                  \
  [&] {                                                                                                  \
    switch (dtype) {                                                                                     \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                                 \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                                 \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }                      \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype, " (CUDA kernels take float32, float16, bfloat16)"); \
    }                                                                                                    \
  }()

}  // namespace balcony::cuda

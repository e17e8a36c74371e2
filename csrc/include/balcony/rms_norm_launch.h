// Host-side launch choice of torch.ops.balcony.rms_norm_backward on CUDA: which kernel (vectorised or
// element-wise), its shape (chunks per thread, threads, blocks = rows of the float32 partial scratch),
// or the ATen fallback past the kernels' reach. One definition for csrc/cuda/rms_norm.cu and for the
// CPU execution harness's entry (csrc/harness/run_rms_norm_backward.cpp), so the harness launches
// exactly what the op launches. Torch-free.
#pragma once
#include <cstdint>

#include "balcony/rms_norm.cuh"

namespace balcony::cuda {

struct RmsNormBackwardPlan {
  bool vec = false;            // the 16-byte vectorised kernel (rms_norm_backward_vectorized)
  RmsNormBackwardShape shape;  // k, threads, parts; the op allocates partial as float32 [parts, hidden]
  // hidden past the kernels' reach (rms_norm_backward_max_hidden): the op computes the same formula
  // in ATen ops instead of launching
  bool aten_fallback() const { return shape.k == 0; }
};

// Rows of g, x and grad_x at their strides (elements), w contiguous; sm_count is the device's.
template <typename T>
inline RmsNormBackwardPlan rms_norm_backward_plan(const T* g, int64_t g_stride, const T* x, int64_t x_stride,
                                                  const T* w, const T* grad_x, int64_t gx_stride, int64_t rows,
                                                  int hidden, int sm_count) {
  RmsNormBackwardPlan p;
  p.vec = rms_norm_backward_vectorized(g, g_stride, x, x_stride, w, grad_x, gx_stride, hidden);
  p.shape = rms_norm_backward_shape<T>(rows, hidden, p.vec, sm_count);
  return p;
}

}  // namespace balcony::cuda

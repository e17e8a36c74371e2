// Argument checks and small helpers shared by the op entry points (csrc/cpu/*.cpp, csrc/cuda/*.cu).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "balcony/dtypes.h"

#define BALCONY_CHECK_DEVICE(t, dev) \
  TORCH_CHECK((t).device().type() == (dev), #t " must be on ", (dev), ", got a tensor on ", (t).device())
#define BALCONY_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device, got ", (a).device(), " and ", (b).device())
#define BALCONY_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must have ", (n), " dimensions, got shape ", (t).sizes())
#define BALCONY_CHECK_SAME_DTYPE(a, b) \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " must have the same dtype, got ", (a).scalar_type(), " and ", (b).scalar_type())
#define BALCONY_CHECK_LAST_DIM_CONTIGUOUS(t) \
  TORCH_CHECK((t).stride(-1) == 1, #t " must be contiguous in its last dimension, got strides ", (t).strides())

namespace balcony {

// CPU kernels take float32 and bfloat16.
inline ScalarKind cpu_scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::F32;
    case at::kBFloat16: return ScalarKind::BF16;
    default: TORCH_CHECK(false, name, " has dtype ", t.scalar_type(), "; the CPU kernels support float32 and bfloat16");
  }
  return ScalarKind::F32;
}

// t [..., cols] as a (rows x cols) matrix with a unit stride along the row (copied only when it has none).
inline at::Tensor rows_of(const at::Tensor& t, int64_t cols) {
  if (t.numel() == 0) return t.new_empty({0, cols});
  at::Tensor m = t.reshape({-1, cols});
  return m.stride(-1) == 1 ? m : m.contiguous();
}

// Rows per task for at::parallel_for so that a task moves about `bytes_per_task` bytes.
inline int64_t grain_rows(int64_t bytes_per_row, int64_t bytes_per_task = 64 * 1024) {
  return std::max<int64_t>(1, bytes_per_task / std::max<int64_t>(1, bytes_per_row));
}

}  // namespace balcony

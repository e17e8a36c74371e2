// Argument checks and shapes of silu_and_mul / silu_and_mul_backward, shared by the CPU and CUDA entry points.
#pragma once

#include <vector>

#include "torch_utils.h"

namespace balcony {

// input [..., 2I] ([gate | up]) on `device`: returns I.
inline int64_t check_silu_and_mul_input(const at::Tensor& input, c10::DeviceType device) {
  BALCONY_CHECK_DEVICE(input, device);
  TORCH_CHECK(input.dim() >= 1, "silu_and_mul: input must have at least 1 dimension, got a scalar");
  TORCH_CHECK(input.size(-1) % 2 == 0, "silu_and_mul: input's last dimension must be even ([gate | up]), got ",
              input.size(-1));
  return input.size(-1) / 2;
}

// The output's shape: input's with the last dimension halved.
inline std::vector<int64_t> half_last(const at::Tensor& input) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() /= 2;
  return shape;
}

}  // namespace balcony

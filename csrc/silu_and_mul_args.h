// Argument checks and shapes of silu_and_mul / silu_and_mul_out / silu_and_mul_backward, shared by the CPU
// and CUDA entry points (each adds only its backend's dtype and size limits).
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

// silu_and_mul_out's out: input's device and dtype, input's shape with the last dimension halved, contiguous.
inline void check_silu_and_mul_out_args(const at::Tensor& input, const at::Tensor& out) {
  BALCONY_CHECK_SAME_DEVICE(out, input);
  BALCONY_CHECK_SAME_DTYPE(out, input);
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(half_last(input)), "silu_and_mul_out: out ", out.sizes(),
              " must have input's shape ", input.sizes(), " with the last dimension halved");
  TORCH_CHECK(out.is_contiguous(), "silu_and_mul_out: out must be contiguous");
}

// silu_and_mul_backward's grad_out: input's device and dtype, the output's shape.
inline void check_silu_and_mul_backward_args(const at::Tensor& grad_out, const at::Tensor& input) {
  BALCONY_CHECK_SAME_DEVICE(grad_out, input);
  BALCONY_CHECK_SAME_DTYPE(grad_out, input);
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(half_last(input)), "silu_and_mul_backward: grad_out ",
              grad_out.sizes(), " must have input's shape ", input.sizes(), " with the last dimension halved");
}

}  // namespace balcony

// Argument checks and row views of the RMSNorm ops, shared by the CPU and CUDA entry points.
#pragma once
#include "torch_utils.h"

namespace balcony {

// input [..., H] on `device`, weight [H] on the same device, same dtype.
inline void check_rms_norm_args(const at::Tensor& input, const at::Tensor& weight, c10::DeviceType device) {
  BALCONY_CHECK_DEVICE(input, device);
  BALCONY_CHECK_SAME_DEVICE(input, weight);
  BALCONY_CHECK_DIM(weight, 1);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(0), "rms_norm: input's last dimension (",
              input.dim() ? input.size(-1) : 0, ") must equal weight's size (", weight.size(0), ")");
  BALCONY_CHECK_SAME_DTYPE(input, weight);
}

// fused_add_rms_norm updates input and residual in place: same shape, dtype, device, contiguous.
inline void check_fused_add_rms_norm_args(const at::Tensor& input, const at::Tensor& residual) {
  BALCONY_CHECK_SAME_DEVICE(input, residual);
  TORCH_CHECK(input.sizes() == residual.sizes(), "fused_add_rms_norm: input ", input.sizes(), " and residual ",
              residual.sizes(), " must have the same shape");
  BALCONY_CHECK_SAME_DTYPE(input, residual);
  TORCH_CHECK(input.is_contiguous() && residual.is_contiguous(),
              "fused_add_rms_norm: input and residual are updated in place and must be contiguous");
}

inline void check_rms_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input) {
  BALCONY_CHECK_SAME_DEVICE(grad_out, input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "rms_norm_backward: grad_out ", grad_out.sizes(), " and input ",
              input.sizes(), " must have the same shape");
  BALCONY_CHECK_SAME_DTYPE(grad_out, input);
}

}  // namespace balcony

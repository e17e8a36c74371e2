// torch.ops.balcony.rms_norm / fused_add_rms_norm on CUDA: checks, dtype dispatch, one launcher call.
#include <torch/library.h>

#include "balcony/rms_norm.cuh"
#include "cuda_utils.h"

namespace balcony {
namespace {

void check_norm_args_cuda(const at::Tensor& input, const at::Tensor& weight) {
  BALCONY_CHECK_DEVICE(input, at::kCUDA);
  BALCONY_CHECK_SAME_DEVICE(input, weight);
  BALCONY_CHECK_DIM(weight, 1);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(0), "rms_norm: input's last dimension (",
              input.dim() ? input.size(-1) : 0, ") must equal weight's size (", weight.size(0), ")");
  BALCONY_CHECK_SAME_DTYPE(input, weight);
}

}  // namespace

at::Tensor rms_norm_cuda(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_args_cuda(input, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = weight.size(0);
  at::Tensor x = input.reshape({-1, hidden});
  if (x.stride(-1) != 1) x = x.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({x.size(0), hidden}, input.options());
  BALCONY_DISPATCH_CUDA_FLOATING(input.scalar_type(), "rms_norm", [&] {
    BALCONY_CUDA_CHECK(cuda::launch_rms_norm<scalar_t>(
        static_cast<const scalar_t*>(x.data_ptr()), x.stride(0), static_cast<const scalar_t*>(w.data_ptr()),
        static_cast<scalar_t*>(out.data_ptr()), out.stride(0), nullptr, 0, x.size(0), static_cast<int>(hidden),
        static_cast<float>(eps), cuda::current_stream()));
  });
  return out.view(input.sizes());
}

void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm_args_cuda(input, weight);
  BALCONY_CHECK_SAME_DEVICE(input, residual);
  TORCH_CHECK(input.sizes() == residual.sizes(), "fused_add_rms_norm: input ", input.sizes(), " and residual ",
              residual.sizes(), " must have the same shape");
  BALCONY_CHECK_SAME_DTYPE(input, residual);
  TORCH_CHECK(input.is_contiguous() && residual.is_contiguous(),
              "fused_add_rms_norm: input and residual are updated in place and must be contiguous");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = weight.size(0);
  at::Tensor w = weight.contiguous();
  BALCONY_DISPATCH_CUDA_FLOATING(input.scalar_type(), "fused_add_rms_norm", [&] {
    auto* x = static_cast<scalar_t*>(input.data_ptr());
    BALCONY_CUDA_CHECK(cuda::launch_rms_norm<scalar_t>(
        x, hidden, static_cast<const scalar_t*>(w.data_ptr()), x, hidden, static_cast<scalar_t*>(residual.data_ptr()),
        hidden, input.numel() / std::max<int64_t>(1, hidden), static_cast<int>(hidden), static_cast<float>(eps),
        cuda::current_stream()));
  });
}

TORCH_LIBRARY_IMPL(balcony, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
}

}  // namespace balcony

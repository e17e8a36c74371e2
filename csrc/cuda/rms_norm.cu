// torch.ops.balcony.rms_norm / rms_norm_backward / fused_add_rms_norm on CUDA: checks, dtype dispatch, one launcher call.
#include <torch/library.h>

#include "balcony/rms_norm.cuh"
#include "balcony/rms_norm_launch.h"
#include "../rms_norm_args.h"
#include "cuda_utils.h"

namespace balcony {
at::Tensor rms_norm_cuda(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_rms_norm_args(input, weight, at::kCUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = weight.size(0);
  const at::Tensor x = rows_of(input, hidden);
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
  check_rms_norm_args(input, weight, at::kCUDA);
  check_fused_add_rms_norm_args(input, residual);
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

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& weight, double eps) {
  check_rms_norm_args(input, weight, at::kCUDA);
  check_rms_norm_backward_args(grad_out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = weight.size(0);
  const at::Tensor x = rows_of(input, hidden);
  const at::Tensor g = rows_of(grad_out, hidden);
  at::Tensor w = weight.contiguous();
  const int64_t rows = x.size(0);
  at::Tensor grad_x = at::empty({rows, hidden}, input.options());
  at::Tensor grad_w = at::empty({hidden}, weight.options());
  const int sm_count = cuda::sm_count(input.device().index());
  BALCONY_DISPATCH_CUDA_FLOATING(input.scalar_type(), "rms_norm_backward", [&] {
    const auto* gp = static_cast<const scalar_t*>(g.data_ptr());
    const auto* xp = static_cast<const scalar_t*>(x.data_ptr());
    const auto* wp = static_cast<const scalar_t*>(w.data_ptr());
    auto* gxp = static_cast<scalar_t*>(grad_x.data_ptr());
    // Kernel, shape or fallback: balcony/rms_norm_launch.h, shared with the CPU execution harness.
    const auto plan = cuda::rms_norm_backward_plan<scalar_t>(
        gp, g.stride(0), xp, x.stride(0), wp, gxp, grad_x.stride(0), rows, static_cast<int>(hidden), sm_count);
    const auto& shape = plan.shape;
    if (plan.aten_fallback()) {
      // Past the register-resident kernel's reach (hidden > 16384 for 16-bit types, 8192 for
      // float32; half that when rows are unaligned): the same formula in ATen ops, float32.
      const at::Tensor xf = x.to(at::kFloat), gf = g.to(at::kFloat), wf = w.to(at::kFloat);
      const at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, true) + eps);
      const at::Tensor gw = gf * wf;
      grad_x.copy_(r * gw - xf * r.pow(3) * (gw * xf).mean(-1, true));
      grad_w.copy_((gf * xf * r).sum(0));
      return;
    }
    at::Tensor partial = at::empty({shape.parts, hidden}, input.options().dtype(at::kFloat));
    BALCONY_CUDA_CHECK(cuda::launch_rms_norm_backward<scalar_t>(gp, g.stride(0), xp, x.stride(0), wp, gxp,
                                                                grad_x.stride(0), static_cast<scalar_t*>(grad_w.data_ptr()),
                                                                partial.data_ptr<float>(), shape, rows,
                                                                static_cast<int>(hidden), static_cast<float>(eps),
                                                                cuda::current_stream()));
  });
  return {grad_x.view(input.sizes()), grad_w};
}

TORCH_LIBRARY_IMPL(balcony, CUDA, m) {
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
}

}  // namespace balcony

// torch.ops.balcony.rms_norm / rms_norm_backward / fused_add_rms_norm on CPU: checks, then the vectorised kernel
// (csrc/cpu/rms_norm_kernel.h) over rows in parallel.
#include <torch/library.h>

#include "../torch_utils.h"
#include "capability.h"

BALCONY_CPU_KERNEL(void, rms_norm,
                   (balcony::ScalarKind kind, const void* x, int64_t x_stride, const void* w, void* out,
                    int64_t out_stride, void* residual, int64_t res_stride, int64_t hidden, float eps, int64_t begin,
                    int64_t end))
BALCONY_CPU_KERNEL(void, rms_norm_backward,
                   (balcony::ScalarKind kind, const void* g, int64_t g_stride, const void* x, int64_t x_stride,
                    const void* w, void* grad_x, int64_t gx_stride, float* grad_w_acc, int64_t hidden, float eps,
                    int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, sum_partials,
                   (balcony::ScalarKind kind, const float* acc, int64_t parts, int64_t hidden, void* out))

namespace balcony {
namespace {

void check_norm_args(const at::Tensor& input, const at::Tensor& weight) {
  BALCONY_CHECK_DEVICE(input, at::kCPU);
  BALCONY_CHECK_DEVICE(weight, at::kCPU);
  BALCONY_CHECK_DIM(weight, 1);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(0), "rms_norm: input's last dimension (",
              input.dim() ? input.size(-1) : 0, ") must equal weight's size (", weight.size(0), ")");
  BALCONY_CHECK_SAME_DTYPE(input, weight);
  cpu_scalar_kind(input, "input");
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_args(input, weight);
  const int64_t hidden = weight.size(0);
  at::Tensor x = input.reshape({-1, hidden});
  if (x.stride(-1) != 1) x = x.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({x.size(0), hidden}, input.options());
  const int64_t rows = x.size(0);
  auto kind = cpu_scalar_kind(input, "input");
  auto kernel = BALCONY_CPU_DISPATCH(rms_norm);
  at::parallel_for(0, rows, grain_rows(hidden * static_cast<int64_t>(input.element_size()) * 2),
                   [&](int64_t begin, int64_t end) {
                     kernel(kind, x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), out.stride(0), nullptr, 0,
                            hidden, static_cast<float>(eps), begin, end);
                   });
  return out.view(input.sizes());
}

void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm_args(input, weight);
  BALCONY_CHECK_DEVICE(residual, at::kCPU);
  TORCH_CHECK(input.sizes() == residual.sizes(), "fused_add_rms_norm: input ", input.sizes(), " and residual ",
              residual.sizes(), " must have the same shape");
  BALCONY_CHECK_SAME_DTYPE(input, residual);
  TORCH_CHECK(input.is_contiguous() && residual.is_contiguous(),
              "fused_add_rms_norm: input and residual are updated in place and must be contiguous");
  const int64_t hidden = weight.size(0);
  const int64_t rows = input.numel() / std::max<int64_t>(1, hidden);
  at::Tensor w = weight.contiguous();
  auto kind = cpu_scalar_kind(input, "input");
  auto kernel = BALCONY_CPU_DISPATCH(rms_norm);
  at::parallel_for(0, rows, grain_rows(hidden * static_cast<int64_t>(input.element_size()) * 3),
                   [&](int64_t begin, int64_t end) {
                     kernel(kind, input.data_ptr(), hidden, w.data_ptr(), input.data_ptr(), hidden,
                            residual.data_ptr(), hidden, hidden, static_cast<float>(eps), begin, end);
                   });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                         const at::Tensor& weight, double eps) {
  check_norm_args(input, weight);
  BALCONY_CHECK_DEVICE(grad_out, at::kCPU);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "rms_norm_backward: grad_out ", grad_out.sizes(), " and input ",
              input.sizes(), " must have the same shape");
  BALCONY_CHECK_SAME_DTYPE(grad_out, input);
  const int64_t hidden = weight.size(0);
  at::Tensor x = input.reshape({-1, hidden});
  if (x.stride(-1) != 1) x = x.contiguous();
  at::Tensor g = grad_out.reshape({-1, hidden});
  if (g.stride(-1) != 1) g = g.contiguous();
  at::Tensor w = weight.contiguous();
  const int64_t rows = x.size(0);
  at::Tensor grad_x = at::empty({rows, hidden}, input.options());
  at::Tensor grad_w = at::empty({hidden}, weight.options());
  // grad_weight: one float32 accumulator row per block of rows, summed in block order afterwards.
  // The blocks depend only on the sizes and the thread count, so the result is deterministic.
  const int64_t grain = grain_rows(hidden * static_cast<int64_t>(input.element_size()) * 3);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
  at::Tensor acc = at::zeros({parts, hidden}, input.options().dtype(at::kFloat));
  auto kind = cpu_scalar_kind(input, "input");
  auto kernel = BALCONY_CPU_DISPATCH(rms_norm_backward);
  float* acc_ptr = acc.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p)
      kernel(kind, g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), w.data_ptr(), grad_x.data_ptr(),
             grad_x.stride(0), acc_ptr + p * hidden, hidden, static_cast<float>(eps), rows * p / parts,
             rows * (p + 1) / parts);
  });
  BALCONY_CPU_DISPATCH(sum_partials)(kind, acc_ptr, parts, hidden, grad_w.data_ptr());
  return {grad_x.view(input.sizes()), grad_w};
}

TORCH_LIBRARY_IMPL(balcony, CPU, m) {
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}

}  // namespace balcony

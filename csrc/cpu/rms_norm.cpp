// torch.ops.balcony.rms_norm / fused_add_rms_norm on CPU: checks, then the vectorised kernel
// (csrc/cpu/rms_norm_kernel.h) over rows in parallel.
#include <torch/library.h>

#include "../torch_utils.h"
#include "capability.h"

BALCONY_CPU_KERNEL(void, rms_norm,
                   (balcony::ScalarKind kind, const void* x, int64_t x_stride, const void* w, void* out,
                    int64_t out_stride, void* residual, int64_t res_stride, int64_t hidden, float eps, int64_t begin,
                    int64_t end))

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

TORCH_LIBRARY_IMPL(balcony, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}

}  // namespace balcony

// torch.ops.balcony.rms_norm / rms_norm_backward / fused_add_rms_norm on CPU: checks, then the vectorised kernel
// (csrc/cpu/rms_norm_kernel.h) over rows in parallel.
#include <torch/library.h>

#include "../rms_norm_args.h"
#include "capability.h"
#include "kernels.h"


namespace balcony {
namespace {

void check_norm_args(const at::Tensor& input, const at::Tensor& weight) {
  check_rms_norm_args(input, weight, at::kCPU);
  cpu_scalar_kind(input, "input");
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_args(input, weight);
  const int64_t hidden = weight.size(0);
  const at::Tensor x = rows_of(input, hidden);
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
  check_fused_add_rms_norm_args(input, residual);
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
  check_rms_norm_backward_args(grad_out, input);
  const int64_t hidden = weight.size(0);
  const at::Tensor x = rows_of(input, hidden);
  const at::Tensor g = rows_of(grad_out, hidden);
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

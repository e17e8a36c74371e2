// torch.ops.balcony.silu_and_mul / silu_and_mul_backward on CPU: checks, then the vectorised kernel
// (csrc/cpu/silu_and_mul_kernel.h) over rows in parallel.
#include <torch/library.h>

#include "../silu_and_mul_args.h"
#include "capability.h"
#include "kernels.h"


namespace balcony {
namespace {

int64_t check_silu_input(const at::Tensor& input) {
  const int64_t inter = check_silu_and_mul_input(input, at::kCPU);
  cpu_scalar_kind(input, "input");
  return inter;
}

void silu_and_mul_into(const at::Tensor& input, int64_t inter, at::Tensor& out) {
  if (out.numel() == 0) return;
  at::Tensor x = rows_of(input, 2 * inter);
  const int64_t rows = x.size(0);
  auto kind = cpu_scalar_kind(input, "input");
  auto kernel = BALCONY_CPU_DISPATCH(silu_and_mul);
  at::parallel_for(0, rows, grain_rows(inter * static_cast<int64_t>(input.element_size()) * 3),
                   [&](int64_t begin, int64_t end) {
                     kernel(kind, x.data_ptr(), x.stride(0), out.data_ptr(), inter, inter, begin, end);
                   });
}

}  // namespace

at::Tensor silu_and_mul_cpu(const at::Tensor& input) {
  const int64_t inter = check_silu_input(input);
  at::Tensor out = at::empty(half_last(input), input.options());
  silu_and_mul_into(input, inter, out);
  return out;
}

void silu_and_mul_out_cpu(const at::Tensor& input, at::Tensor& out) {
  const int64_t inter = check_silu_input(input);
  check_silu_and_mul_out_args(input, out);
  silu_and_mul_into(input, inter, out);
}

at::Tensor silu_and_mul_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input) {
  const int64_t inter = check_silu_input(input);
  check_silu_and_mul_backward_args(grad_out, input);
  at::Tensor grad_in = at::empty(input.sizes(), input.options());
  if (grad_in.numel() == 0) return grad_in;
  at::Tensor x = rows_of(input, 2 * inter);
  at::Tensor g = rows_of(grad_out, inter);
  const int64_t rows = x.size(0);
  auto kind = cpu_scalar_kind(input, "input");
  auto kernel = BALCONY_CPU_DISPATCH(silu_and_mul_backward);
  at::parallel_for(0, rows, grain_rows(inter * static_cast<int64_t>(input.element_size()) * 5),
                   [&](int64_t begin, int64_t end) {
                     kernel(kind, g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), grad_in.data_ptr(),
                            2 * inter, inter, begin, end);
                   });
  return grad_in;
}

TORCH_LIBRARY_IMPL(balcony, CPU, m) {
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("silu_and_mul_out", &silu_and_mul_out_cpu);
  m.impl("silu_and_mul_backward", &silu_and_mul_backward_cpu);
}

}  // namespace balcony

// torch.ops.balcony.silu_and_mul / silu_and_mul_backward on CUDA: checks, dtype dispatch, one launcher call.
#include <torch/library.h>

#include "balcony/silu_and_mul.cuh"
#include "../silu_and_mul_args.h"
#include "cuda_utils.h"

namespace balcony {
namespace {

int64_t check_silu_input_cuda(const at::Tensor& input) {
  const int64_t inter = check_silu_and_mul_input(input, at::kCUDA);
  TORCH_CHECK(inter <= std::numeric_limits<int>::max(), "silu_and_mul: last dimension too large");
  return inter;
}

void silu_and_mul_into_cuda(const at::Tensor& input, int64_t inter, at::Tensor& out) {
  if (out.numel() == 0) return;
  at::Tensor x = rows_of(input, 2 * inter);
  BALCONY_DISPATCH_CUDA_FLOATING(input.scalar_type(), "silu_and_mul", [&] {
    BALCONY_CUDA_CHECK(cuda::launch_silu_and_mul<scalar_t>(
        static_cast<const scalar_t*>(x.data_ptr()), x.stride(0), static_cast<scalar_t*>(out.data_ptr()), inter,
        x.size(0), static_cast<int>(inter), cuda::current_stream()));
  });
}

}  // namespace

at::Tensor silu_and_mul_cuda(const at::Tensor& input) {
  const int64_t inter = check_silu_input_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(half_last(input), input.options());
  silu_and_mul_into_cuda(input, inter, out);
  return out;
}

void silu_and_mul_out_cuda(const at::Tensor& input, at::Tensor& out) {
  const int64_t inter = check_silu_input_cuda(input);
  check_silu_and_mul_out_args(input, out);
  const c10::cuda::CUDAGuard guard(input.device());
  silu_and_mul_into_cuda(input, inter, out);
}

at::Tensor silu_and_mul_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input) {
  const int64_t inter = check_silu_input_cuda(input);
  check_silu_and_mul_backward_args(grad_out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_in = at::empty(input.sizes(), input.options());
  if (grad_in.numel() == 0) return grad_in;
  at::Tensor x = rows_of(input, 2 * inter);
  at::Tensor g = rows_of(grad_out, inter);
  BALCONY_DISPATCH_CUDA_FLOATING(input.scalar_type(), "silu_and_mul_backward", [&] {
    BALCONY_CUDA_CHECK(cuda::launch_silu_and_mul_backward<scalar_t>(
        static_cast<const scalar_t*>(g.data_ptr()), g.stride(0), static_cast<const scalar_t*>(x.data_ptr()),
        x.stride(0), static_cast<scalar_t*>(grad_in.data_ptr()), 2 * inter, x.size(0), static_cast<int>(inter),
        cuda::current_stream()));
  });
  return grad_in;
}

TORCH_LIBRARY_IMPL(balcony, CUDA, m) {
  m.impl("silu_and_mul", &silu_and_mul_cuda);
  m.impl("silu_and_mul_out", &silu_and_mul_out_cuda);
  m.impl("silu_and_mul_backward", &silu_and_mul_backward_cuda);
}

}  // namespace balcony

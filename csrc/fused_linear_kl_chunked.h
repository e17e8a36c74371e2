// The chunked forward/backward loop of fused_linear_kl, shared by the CPU and CUDA entry points:
// per chunk of tokens, student (and teacher) logits by at::mm (vendor BLAS), one fused row kernel
// (the backend's: loss and, in place, the gradient of the logits), and grad_student[chunk] =
// grad_logits @ weight by at::mm. At most one chunk of logits exists at a time. The arguments
// are checked first by check_fused_linear_kl_args (fused_linear_kl_args.h).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "fused_linear_kl_args.h"

namespace balcony {

// row_kernel(s_logits [c, V] contiguous (overwritten by the gradient when compute_grad),
//            t_logits [c, V] last dim contiguous, loss [c] float32 contiguous, grad_scale, compute_grad)
template <typename RowKernel>
std::tuple<at::Tensor, at::Tensor> fused_linear_kl_chunked(const at::Tensor& student_in, const at::Tensor& weight_in,
                                                           const at::Tensor& teacher_in, bool teacher_is_logits,
                                                           const KlArgs& a, bool compute_grad, RowKernel&& row_kernel) {
  const at::Tensor student = student_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor teacher = teacher_in;
  if (teacher.stride(-1) != 1) teacher = teacher.contiguous();
  const at::Tensor weight_t = weight.t();
  at::Tensor row_loss = at::empty({a.n}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({a.n, a.h}, student.options()) : at::empty({0}, student.options());
  const float grad_scale = a.mean ? 1.0f / static_cast<float>(std::max<int64_t>(1, a.n)) : 1.0f;
  at::Tensor s_buf = at::empty({a.chunk, a.v}, student.options());
  at::Tensor t_buf = teacher_is_logits ? at::Tensor() : at::empty({a.chunk, a.v}, student.options());
  for (int64_t start = 0; start < a.n; start += a.chunk) {
    const int64_t c = std::min(a.chunk, a.n - start);
    at::Tensor s_logits = s_buf.narrow(0, 0, c);
    at::mm_out(s_logits, student.narrow(0, start, c), weight_t);
    at::Tensor t_logits;
    if (teacher_is_logits) {
      t_logits = teacher.narrow(0, start, c);
    } else {
      t_logits = t_buf.narrow(0, 0, c);
      at::mm_out(t_logits, teacher.narrow(0, start, c), weight_t);
    }
    row_kernel(s_logits, t_logits, row_loss.narrow(0, start, c), grad_scale, compute_grad);
    if (compute_grad) {
      at::Tensor g = grad.narrow(0, start, c);
      at::mm_out(g, s_logits, weight);
    }
  }
  at::Tensor total = row_loss.sum(at::kDouble);
  if (a.mean) total = total / static_cast<double>(a.n);
  return {total.to(at::kFloat), grad};
}

}  // namespace balcony

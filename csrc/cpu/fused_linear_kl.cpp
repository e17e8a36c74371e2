// torch.ops.balcony.fused_linear_kl on CPU: the chunked loop (csrc/fused_linear_kl_chunked.h)
// with the vectorised row kernel (csrc/cpu/fused_linear_kl_kernel.h) over rows in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../fused_linear_kl_chunked.h"
#include "capability.h"
#include "kernels.h"


namespace balcony {

std::tuple<at::Tensor, at::Tensor> fused_linear_kl_cpu(const at::Tensor& student, const at::Tensor& weight,
                                                       const at::Tensor& teacher, bool teacher_is_logits,
                                                       c10::string_view reduction, int64_t chunk_size,
                                                       bool compute_grad) {
  BALCONY_CHECK_DEVICE(student, at::kCPU);
  const KlArgs a = check_fused_linear_kl_args(student, weight, teacher, teacher_is_logits, std::string(reduction),
                                              chunk_size);
  const ScalarKind kind = cpu_scalar_kind(student, "student");
  auto kernel = BALCONY_CPU_DISPATCH(fused_kl_rows);
  // Two float rows of scratch per thread (the exponentials of both rows).
  at::Tensor scratch = at::empty({at::get_num_threads(), 2 * a.v}, student.options().dtype(at::kFloat));
  return fused_linear_kl_chunked(
      student, weight, teacher, teacher_is_logits, a, compute_grad,
      [&](at::Tensor& s, const at::Tensor& t, at::Tensor loss, float grad_scale, bool grad) {
        const int64_t rows = s.size(0);
        char* s_ptr = static_cast<char*>(s.data_ptr());
        const char* t_ptr = static_cast<const char*>(t.data_ptr());
        float* loss_ptr = loss.data_ptr<float>();
        float* scratch_ptr = scratch.data_ptr<float>();
        const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
        at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
          kernel(kind, s_ptr, s_stride, t_ptr, t_stride, a.v, loss_ptr, grad_scale, grad,
                 scratch_ptr + at::get_thread_num() * 2 * a.v, begin, end);
        });
      });
}

TORCH_LIBRARY_IMPL(balcony, CPU, m) { m.impl("fused_linear_kl", &fused_linear_kl_cpu); }

}  // namespace balcony

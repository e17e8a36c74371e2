// torch.ops.balcony.fused_linear_kl on CUDA: the chunked loop (csrc/fused_linear_kl_chunked.h;
// at::mm -> cuBLAS) with the fused row kernel of balcony/fused_linear_kl.cuh.
#include <torch/library.h>

#include "../fused_linear_kl_chunked.h"
#include "balcony/fused_linear_kl.cuh"
#include "cuda_utils.h"

namespace balcony {

std::tuple<at::Tensor, at::Tensor> fused_linear_kl_cuda(const at::Tensor& student, const at::Tensor& weight,
                                                        const at::Tensor& teacher, bool teacher_is_logits,
                                                        c10::string_view reduction, int64_t chunk_size,
                                                        bool compute_grad) {
  BALCONY_CHECK_DEVICE(student, at::kCUDA);
  const KlArgs a = check_fused_linear_kl_args(student, weight, teacher, teacher_is_logits, std::string(reduction),
                                              chunk_size);
  TORCH_CHECK(a.v <= INT32_MAX, "fused_linear_kl: vocabulary too large");
  const c10::cuda::CUDAGuard guard(student.device());
  return fused_linear_kl_chunked(
      student, weight, teacher, teacher_is_logits, a, compute_grad,
      [&](at::Tensor& s, const at::Tensor& t, at::Tensor loss, float grad_scale, bool grad) {
        BALCONY_DISPATCH_CUDA_FLOATING(student.scalar_type(), "fused_linear_kl", [&] {
          BALCONY_CUDA_CHECK(cuda::launch_fused_kl<scalar_t>(
              static_cast<scalar_t*>(s.data_ptr()), s.stride(0), static_cast<const scalar_t*>(t.data_ptr()),
              t.stride(0), s.size(0), static_cast<int>(a.v), loss.data_ptr<float>(), grad_scale, grad,
              cuda::current_stream()));
        });
      });
}

TORCH_LIBRARY_IMPL(balcony, CUDA, m) { m.impl("fused_linear_kl", &fused_linear_kl_cuda); }

}  // namespace balcony

// torch.ops.balcony.sample_tokens on CUDA: checks, dtype dispatch, one launcher call
// (balcony/sample_tokens.cuh).
#include <torch/library.h>

#include "../sample_tokens_args.h"
#include "balcony/sample_tokens.cuh"
#include "cuda_utils.h"

namespace balcony {

at::Tensor sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& uniform) {
  BALCONY_CHECK_DEVICE(logits, at::kCUDA);
  const SampleArgs a = check_sample_tokens_args(logits, temperature, top_k, top_p, uniform);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = a.logits.size(0), vocab = a.logits.size(1);
  TORCH_CHECK(vocab < (int64_t{1} << 24), "sample_tokens: vocabulary of ", vocab, " entries exceeds 2^24");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor scratch = at::empty({rows, vocab}, logits.options().dtype(at::kFloat));
  BALCONY_DISPATCH_CUDA_FLOATING(logits.scalar_type(), "sample_tokens", [&] {
    BALCONY_CUDA_CHECK(cuda::launch_sample_tokens<scalar_t>(
        static_cast<const scalar_t*>(a.logits.data_ptr()), a.logits.stride(0), rows, static_cast<int>(vocab),
        a.temperature.data_ptr<float>(), a.top_k.data_ptr<int64_t>(), a.top_p.data_ptr<float>(),
        a.uniform.data_ptr<float>(), out.data_ptr<int64_t>(), scratch.data_ptr<float>(), cuda::current_stream()));
  });
  return out;
}

TORCH_LIBRARY_IMPL(balcony, CUDA, m) { m.impl("sample_tokens", &sample_tokens_cuda); }

}  // namespace balcony

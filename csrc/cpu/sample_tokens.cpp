// torch.ops.balcony.sample_tokens on CPU: checks, then the sort-free sampling kernel
// (csrc/cpu/sample_tokens_kernel.h) over rows in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../sample_tokens_args.h"
#include "capability.h"
#include "kernels.h"
#include "cpu_ops.h"


namespace balcony {

void sample_tokens_cpu_into(const SampleArgs& a, int64_t* out, float* scratch) {
  const ScalarKind kind = cpu_scalar_kind(a.logits, "logits");
  const int64_t vocab = a.logits.size(1);
  auto kernel = BALCONY_CPU_DISPATCH(sample_rows);
  const char* x = static_cast<const char*>(a.logits.data_ptr());
  at::parallel_for(0, a.logits.size(0), 1, [&](int64_t begin, int64_t end) {
    kernel(kind, x, a.logits.stride(0), vocab, a.temperature.data_ptr<float>(), a.top_k.data_ptr<int64_t>(),
           a.top_p.data_ptr<float>(), a.uniform.data_ptr<float>(), out, scratch + at::get_thread_num() * vocab, begin,
           end);
  });
}

at::Tensor sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                             const at::Tensor& top_p, const at::Tensor& uniform) {
  BALCONY_CHECK_DEVICE(logits, at::kCPU);
  const SampleArgs a = check_sample_tokens_args(logits, temperature, top_k, top_p, uniform);
  cpu_scalar_kind(logits, "logits");
  const int64_t rows = a.logits.size(0), vocab = a.logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor scratch = at::empty({at::get_num_threads(), vocab}, logits.options().dtype(at::kFloat));
  sample_tokens_cpu_into(a, out.data_ptr<int64_t>(), scratch.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_IMPL(balcony, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace balcony

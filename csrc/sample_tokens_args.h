// Argument checks of sample_tokens, shared by the CPU and CUDA entry points: shapes, devices,
// and the per-row parameters converted to float32 / int64 contiguous tensors.
#pragma once
#include <ATen/ATen.h>

#include "torch_utils.h"

namespace balcony {

struct SampleArgs {
  at::Tensor logits, temperature, top_k, top_p, uniform;
};

inline SampleArgs check_sample_tokens_args(const at::Tensor& logits, const at::Tensor& temperature,
                                           const at::Tensor& top_k, const at::Tensor& top_p,
                                           const at::Tensor& uniform) {
  BALCONY_CHECK_DIM(logits, 2);
  const int64_t b = logits.size(0);
  TORCH_CHECK(logits.size(1) >= 1, "sample_tokens: logits must have at least one column, got shape ", logits.sizes());
  auto check_param = [&](const at::Tensor& t, const char* name, bool integral) {
    TORCH_CHECK(t.device() == logits.device(), "sample_tokens: ", name, " must be on ", logits.device(), " like logits, got ",
                t.device());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == b, "sample_tokens: ", name, " must have shape [B] = [", b, "], got ",
                t.sizes());
    if (integral) {
      TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                      t.scalar_type() != at::kBool,
                  "sample_tokens: ", name, " must be an integer tensor, got ", t.scalar_type());
    } else {
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), "sample_tokens: ", name, " must be a floating tensor, got ",
                  t.scalar_type());
    }
  };
  check_param(temperature, "temperature", false);
  check_param(top_k, "top_k", true);
  check_param(top_p, "top_p", false);
  check_param(uniform, "uniform", false);
  at::Tensor x = logits.stride(-1) == 1 ? logits : logits.contiguous();
  return SampleArgs{x, temperature.to(at::kFloat).contiguous(), top_k.to(at::kLong).contiguous(),
                    top_p.to(at::kFloat).contiguous(), uniform.to(at::kFloat).contiguous()};
}

}  // namespace balcony

// torch.ops.balcony.rope_append on CPU: checks (every position before anything is written), then
// the vectorised kernel (csrc/cpu/rope_append_kernel.h) over tokens in parallel.
#include <torch/library.h>

#include "../attention_checks.h"
#include "../torch_utils.h"
#include "attention_args.h"
#include "capability.h"
#include "kernels.h"


namespace balcony {

namespace {

void rope_append_cpu(at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                     at::Tensor& value_cache, const at::Tensor& positions, const at::Tensor& cos,
                     const at::Tensor& sin) {
  BALCONY_CHECK_DEVICE(query, at::kCPU);
  check_rope_append_args(query, key, value, key_cache, value_cache, positions, cos, sin);
  const auto kind = cpu_scalar_kind(query, "query");
  const int64_t S = key_cache.size(2), P = cos.size(0);
  at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); ++i)
    TORCH_CHECK(pp[i] < S && pp[i] < P, "rope_append: position ", pp[i], " (at index ", i,
                " of the flattened positions) is out of range: the cache holds S = ", S,
                " slots and the cos/sin tables P = ", P, " positions");
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  cpu::RopeAppendArgs a{};
  a.query = query.data_ptr();
  a.q_sb = query.stride(0), a.q_st = query.stride(1), a.q_sh = query.stride(2);
  a.key = key.data_ptr();
  a.k_sb = key.stride(0), a.k_st = key.stride(1), a.k_sh = key.stride(2);
  a.value = value.data_ptr();
  a.v_sb = value.stride(0), a.v_st = value.stride(1), a.v_sh = value.stride(2);
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.positions = pp;
  a.cos = c.data_ptr<float>();
  a.sin = s.data_ptr<float>();
  a.T = query.size(1), a.Hq = query.size(2), a.Hkv = key.size(2), a.D = query.size(3), a.S = S;
  a.rot_half = cos.size(1);
  const int64_t tokens = pos.numel();
  const int64_t bytes_per_token = (a.Hq * 2 + a.Hkv * 4) * a.D * static_cast<int64_t>(query.element_size());
  auto kernel = BALCONY_CPU_DISPATCH(rope_append);
  at::parallel_for(0, tokens, grain_rows(bytes_per_token),
                   [&](int64_t begin, int64_t end) { kernel(kind, a, begin, end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(balcony, CPU, m) { m.impl("rope_append", &rope_append_cpu); }

}  // namespace balcony

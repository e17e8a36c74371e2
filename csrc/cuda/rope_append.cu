// torch.ops.balcony.rope_append on CUDA: checks, dtype dispatch, one launcher call.
// Positions live on the GPU and are not copied back to check them (that would synchronise every
// decode step): the kernel skips a position >= S or >= P, as it skips padding (< 0). The CPU op
// raises instead.
#include <torch/library.h>

#include "../attention_checks.h"
#include "balcony/rope_append.cuh"
#include "cuda_utils.h"

namespace balcony {
namespace {

void rope_append_cuda(at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                      at::Tensor& value_cache, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin) {
  BALCONY_CHECK_DEVICE(query, at::kCUDA);
  check_rope_append_args(query, key, value, key_cache, value_cache, positions, cos, sin);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor pos = positions.contiguous();
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t tokens = pos.numel();
  BALCONY_DISPATCH_CUDA_FLOATING(query.scalar_type(), "rope_append", [&] {
    cuda::RopeAppendParams<scalar_t> p{};
    p.query = static_cast<scalar_t*>(query.data_ptr());
    p.q_sb = query.stride(0), p.q_st = query.stride(1), p.q_sh = query.stride(2);
    p.key = static_cast<const scalar_t*>(key.data_ptr());
    p.k_sb = key.stride(0), p.k_st = key.stride(1), p.k_sh = key.stride(2);
    p.value = static_cast<const scalar_t*>(value.data_ptr());
    p.v_sb = value.stride(0), p.v_st = value.stride(1), p.v_sh = value.stride(2);
    p.key_cache = static_cast<scalar_t*>(key_cache.data_ptr());
    p.value_cache = static_cast<scalar_t*>(value_cache.data_ptr());
    p.positions = reinterpret_cast<const long long*>(pos.data_ptr<int64_t>());
    p.cos = c.data_ptr<float>();
    p.sin = s.data_ptr<float>();
    p.T_len = static_cast<int>(query.size(1));
    p.Hq = static_cast<int>(query.size(2));
    p.Hkv = static_cast<int>(key.size(2));
    p.D = static_cast<int>(query.size(3));
    p.S = static_cast<int>(key_cache.size(2));
    p.P = static_cast<int>(cos.size(0));
    p.rot_half = static_cast<int>(cos.size(1));
    BALCONY_CUDA_CHECK(cuda::launch_rope_append<scalar_t>(p, static_cast<int>(tokens), cuda::current_stream()));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(balcony, CUDA, m) { m.impl("rope_append", &rope_append_cuda); }

}  // namespace balcony

// torch.ops.balcony.decode_attention on CUDA: checks, split choice (balcony/decode_attention_launch.h,
// shared with the CPU execution harness), dtype dispatch, launcher call.
// seq_lens stay on the GPU (no synchronisation): splits are cut from the cache capacity S, and a
// split past a sequence's length does no work. The kernel clamps a length to [0, S] (the CPU op
// raises on one outside it).
#include <torch/library.h>

#include <algorithm>

#include "../attention_checks.h"
#include "balcony/decode_attention.cuh"
#include "balcony/decode_attention_launch.h"
#include "cuda_utils.h"

namespace balcony {
namespace {

at::Tensor decode_attention_cuda(const at::Tensor& query_in, const at::Tensor& key_cache_in,
                                 const at::Tensor& value_cache_in, const at::Tensor& seq_lens_in, double scale,
                                 int64_t num_splits, int64_t window, double softcap) {
  BALCONY_CHECK_DEVICE(query_in, at::kCUDA);
  check_decode_attention_args(query_in, key_cache_in, value_cache_in, seq_lens_in, num_splits, window, softcap);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const int64_t B = query_in.size(0), Hq = query_in.size(1), D = query_in.size(2);
  const int64_t Hkv = key_cache_in.size(1), S = key_cache_in.size(2), G = Hq / Hkv;
  const int64_t pack = cuda::pack_elems(query_in.element_size());
  TORCH_CHECK(cuda::decode_attention_head_dim_ok(D, query_in.element_size()),
              "decode_attention: the CUDA kernel needs the head dimension to be a multiple of ", pack,
              " (16 bytes) and at most 256 for dtype ", query_in.scalar_type(), ", got D = ", D);
  at::Tensor out = at::empty({B, Hq, D}, query_in.options());
  if (out.numel() == 0) return out;
  // The kernel reads 16-byte packs: strides must be multiples of a pack, bases 16-byte aligned.
  auto packed = [&](const at::Tensor& t) {
    const bool ok = cuda::decode_attention_packed(t.data_ptr(), t.strides().data(), static_cast<int>(t.dim()), pack);
    return ok ? t : t.contiguous();
  };
  const at::Tensor query = packed(query_in), key_cache = packed(key_cache_in), value_cache = packed(value_cache_in);
  const at::Tensor seq_lens = seq_lens_in.contiguous();

  const int device = query.get_device();
  const cuda::DecodeAttentionSplits plan =
      cuda::decode_attention_splits(num_splits, cuda::sm_count(device), B, Hkv, G, S);
  const int64_t splits = plan.num_splits;
  TORCH_CHECK(splits <= cuda::kDecodeMaxSplits, "decode_attention: num_splits must be at most ", cuda::kDecodeMaxSplits,
              " on CUDA, got ", splits);
  at::Tensor part_ml, part_o;
  if (splits > 1) {
    part_ml = at::empty({B, Hq, splits, 2}, query.options().dtype(at::kFloat));
    part_o = at::empty({B, Hq, splits, D}, query.options().dtype(at::kFloat));
  }
  BALCONY_DISPATCH_CUDA_FLOATING(query.scalar_type(), "decode_attention", [&] {
    cuda::DecodeAttentionParams<scalar_t> p{};
    p.query = static_cast<const scalar_t*>(query.data_ptr());
    p.q_sb = query.stride(0), p.q_sh = query.stride(1);
    p.key_cache = static_cast<const scalar_t*>(key_cache.data_ptr());
    p.k_sb = key_cache.stride(0), p.k_sh = key_cache.stride(1), p.k_ss = key_cache.stride(2);
    p.value_cache = static_cast<const scalar_t*>(value_cache.data_ptr());
    p.v_sb = value_cache.stride(0), p.v_sh = value_cache.stride(1), p.v_ss = value_cache.stride(2);
    p.seq_lens = seq_lens.data_ptr();
    p.seq_lens_64 = seq_lens.scalar_type() == at::kLong;
    p.Hkv = static_cast<int>(Hkv), p.G = static_cast<int>(G), p.D = static_cast<int>(D), p.S = static_cast<int>(S);
    p.num_splits = static_cast<int>(splits);
    p.chunk = static_cast<int>(plan.chunk);
    p.scale = static_cast<float>(scale);
    p.window = window;
    p.softcap = static_cast<float>(softcap);
    p.out = static_cast<scalar_t*>(out.data_ptr());
    p.part_ml = splits > 1 ? part_ml.data_ptr<float>() : nullptr;
    p.part_o = splits > 1 ? part_o.data_ptr<float>() : nullptr;
    BALCONY_CUDA_CHECK(cuda::launch_decode_attention<scalar_t>(p, static_cast<int>(B), cuda::current_stream()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(balcony, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace balcony

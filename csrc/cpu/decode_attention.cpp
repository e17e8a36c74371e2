// torch.ops.balcony.decode_attention on CPU: checks, then split-KV attention
// (csrc/cpu/decode_attention_kernel.h) in parallel over (batch, kv head, split), then the merge
// of the split partials in parallel over (batch, query head).
#include <torch/library.h>

#include <algorithm>

#include "../attention_checks.h"
#include "../torch_utils.h"
#include "attention_args.h"
#include "capability.h"
#include "kernels.h"
#include "cpu_ops.h"


namespace balcony {
namespace {

// Splits so that every thread gets work when B * Hkv is small (batch-1 long context), while each
// split keeps at least kMinSplitLen positions.
// NOTE: below ~256 positions a split's fixed cost (query load, partial write, merge) is a visible
// share of its time; four tasks per thread even out uneven sequence lengths.
int64_t choose_cpu_splits(int64_t B, int64_t Hkv, int64_t max_len) {
  constexpr int64_t kMinSplitLen = 256;
  const int64_t threads = at::get_num_threads();
  int64_t want = (4 * threads + B * Hkv - 1) / (B * Hkv);
  // A task count that is a multiple of the thread count: parallel_for hands out equal ranges.
  for (int64_t s = want; s < want + threads; ++s)
    if ((B * Hkv * s) % threads == 0) {
      want = s;
      break;
    }
  const int64_t most = std::max<int64_t>(1, (max_len + kMinSplitLen - 1) / kMinSplitLen);
  return std::max<int64_t>(1, std::min(want, most));
}

}  // namespace

int64_t decode_attention_cpu_splits(int64_t B, int64_t Hkv, int64_t max_len, int64_t requested) {
  const int64_t splits = requested > 0 ? requested : choose_cpu_splits(B, Hkv, max_len);
  return std::max<int64_t>(1, std::min(splits, std::max<int64_t>(1, max_len)));
}

int64_t decode_attention_cpu_scratch_floats(int64_t G, int64_t D) {
  return cpu::decode_attention_scratch_floats(G, D);
}

void decode_attention_cpu_into(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const int64_t* seq_lens, int64_t max_len, double scale, int64_t splits, void* out,
                               float* part_ml, float* part_o, float* scratch, int64_t window, double softcap) {
  const auto kind = cpu_scalar_kind(query, "query");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = key_cache.size(1), G = Hq / Hkv;
  cpu::DecodeAttentionArgs a{};
  a.query = query.data_ptr();
  a.q_sb = query.stride(0), a.q_sh = query.stride(1);
  a.key_cache = key_cache.data_ptr();
  a.k_sb = key_cache.stride(0), a.k_sh = key_cache.stride(1), a.k_ss = key_cache.stride(2);
  a.value_cache = value_cache.data_ptr();
  a.v_sb = value_cache.stride(0), a.v_sh = value_cache.stride(1), a.v_ss = value_cache.stride(2);
  a.seq_lens = seq_lens;
  a.Hkv = Hkv, a.G = G, a.D = D;
  a.num_splits = splits;
  a.chunk = std::max<int64_t>(1, (max_len + splits - 1) / splits);
  a.window = window;
  a.softcap = static_cast<float>(softcap);
  a.scale = static_cast<float>(scale);
  a.out = out;
  a.part_ml = splits > 1 ? part_ml : nullptr;
  a.part_o = splits > 1 ? part_o : nullptr;
  const int64_t scratch_floats = decode_attention_cpu_scratch_floats(G, D);
  auto split_kernel = BALCONY_CPU_DISPATCH(decode_attention_split);
  at::parallel_for(0, B * Hkv * splits, 1, [&](int64_t begin, int64_t end) {
    split_kernel(kind, a, scratch + at::get_thread_num() * scratch_floats, begin, end);
  });
  if (splits > 1) {
    auto merge_kernel = BALCONY_CPU_DISPATCH(decode_attention_merge);
    at::parallel_for(0, B * Hq, grain_rows(splits * D * 4),
                     [&](int64_t begin, int64_t end) { merge_kernel(kind, a, begin, end); });
  }
}

namespace {

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& seq_lens, double scale, int64_t num_splits, int64_t window,
                                double softcap) {
  BALCONY_CHECK_DEVICE(query, at::kCPU);
  check_decode_attention_args(query, key_cache, value_cache, seq_lens, num_splits, window, softcap);
  cpu_scalar_kind(query, "query");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = key_cache.size(1), S = key_cache.size(2), G = Hq / Hkv;
  at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= S, "decode_attention: seq_lens[", b, "] = ", lp[b],
                " is out of range: expected 0 <= len <= S = ", S);
    max_len = std::max(max_len, lp[b]);
  }
  if (window > 0) max_len = std::min(max_len, window);  // the longest span attended
  at::Tensor out = at::empty({B, Hq, D}, query.options());
  if (out.numel() == 0) return out;
  const int64_t splits = decode_attention_cpu_splits(B, Hkv, max_len, num_splits);
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor part_ml, part_o;
  if (splits > 1) {
    part_ml = at::empty({B, Hq, splits, 2}, f32);
    part_o = at::empty({B, Hq, splits, D}, f32);
  }
  at::Tensor scratch = at::empty({at::get_num_threads(), decode_attention_cpu_scratch_floats(G, D)}, f32);
  decode_attention_cpu_into(query, key_cache, value_cache, lp, max_len, scale, splits, out.data_ptr(),
                            splits > 1 ? part_ml.data_ptr<float>() : nullptr,
                            splits > 1 ? part_o.data_ptr<float>() : nullptr, scratch.data_ptr<float>(), window,
                            softcap);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(balcony, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace balcony

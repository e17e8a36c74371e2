// Harness entry for balcony/decode_attention.cuh: split-KV decode attention (split kernel, plus the
// merge kernel when there are several splits), set up as csrc/cuda/decode_attention.cu sets it up,
// through the same host logic (balcony/decode_attention_launch.h): the head-dimension check, the
// contiguous copy of a query or cache that is not packed, the split count (`num_splits` is the op's
// argument: 0 = automatic, from `sm_count`, default the modelled device's) and the chunk. The float32
// split scratch (part_ml, part_o) is allocated here at the size the op allocates. Parameters: shapes,
// strides (elements) and element offsets of query [B, Hkv * G, D] and the caches [B, Hkv, S, D].
// Reports num_splits, chunk, and query_copied / key_cache_copied / value_cache_copied.
#include <cstdio>
#include <string>

#include "balcony/decode_attention.cuh"
#include "balcony/decode_attention_launch.h"
#include "runner.h"

namespace {

// What the op's t.contiguous() gives for a tensor of `dims` sizes and strides: a dense row-major copy
// (in scratch); `strides` is updated to its strides.
template <typename T>
const T* contiguous_copy(balcony_harness::Case& c, const T* src, const int64_t* sizes, int64_t* strides, int dims) {
  int64_t n = 1;
  for (int d = 0; d < dims; ++d) n *= sizes[d];
  T* dst = c.scratch<T>(size_t(n));
  int64_t idx[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int d = 0; d < dims; ++d) off += idx[d] * strides[d];
    dst[i] = src[off];
    for (int d = dims - 1; d >= 0 && ++idx[d] == sizes[d]; --d) idx[d] = 0;
  }
  for (int64_t d = dims - 1, step = 1; d >= 0; step *= sizes[d], --d) strides[d] = step;
  return dst;
}

}  // namespace

BALCONY_HARNESS_ENTRY(decode_attention) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    namespace bc = balcony::cuda;
    const int64_t B = c.i("B"), Hkv = c.i("Hkv"), G = c.i("G"), D = c.i("D"), S = c.i("S"), Hq = Hkv * G;
    if (!bc::decode_attention_head_dim_ok(D, sizeof(T))) {
      fprintf(stderr, "decode_attention entry: the op raises for D = %lld with %zu-byte elements\n", (long long)D,
              sizeof(T));
      return cudaErrorInvalidValue;
    }
    if (B * Hq * D == 0) return cudaSuccess;  // the op returns its empty output before any launch
    const int64_t pack = bc::pack_elems(sizeof(T));
    // A query or cache the kernel cannot read in packs is copied to a contiguous layout first.
    auto take = [&](const std::string& name, const char* offset, const int64_t* sizes, int64_t* strides, int dims) {
      const T* data = c.ptr<T>(name, c.i(offset, 0));
      const bool packed = bc::decode_attention_packed(data, strides, dims, pack);
      c.report(name + "_copied", !packed);
      return packed ? data : contiguous_copy(c, data, sizes, strides, dims);
    };
    const int64_t q_sizes[3] = {B, Hq, D}, cache_sizes[4] = {B, Hkv, S, D};
    int64_t q_st[3] = {c.i("q_sb"), c.i("q_sh"), 1};
    int64_t k_st[4] = {c.i("k_sb"), c.i("k_sh"), c.i("k_ss"), 1};
    int64_t v_st[4] = {c.i("v_sb"), c.i("v_sh"), c.i("v_ss"), 1};
    balcony::cuda::DecodeAttentionParams<T> p{};
    p.query = take("query", "q_offset", q_sizes, q_st, 3);
    p.key_cache = take("key_cache", "k_offset", cache_sizes, k_st, 4);
    p.value_cache = take("value_cache", "v_offset", cache_sizes, v_st, 4);
    p.q_sb = q_st[0], p.q_sh = q_st[1];
    p.k_sb = k_st[0], p.k_sh = k_st[1], p.k_ss = k_st[2];
    p.v_sb = v_st[0], p.v_sh = v_st[1], p.v_ss = v_st[2];

    int sm_count = 0;
    cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0);
    sm_count = int(c.i("sm_count", sm_count > 1 ? sm_count : 1));
    const bc::DecodeAttentionSplits plan = bc::decode_attention_splits(c.i("num_splits"), sm_count, B, Hkv, G, S);
    c.report("num_splits", plan.num_splits);
    c.report("chunk", plan.chunk);
    if (plan.num_splits > bc::kDecodeMaxSplits) {
      fprintf(stderr, "decode_attention entry: the op raises for %lld splits\n", (long long)plan.num_splits);
      return cudaErrorInvalidValue;
    }
    p.seq_lens = c.raw("seq_lens", false);
    p.seq_lens_64 = c.i("seq_lens_64") != 0;
    p.Hkv = int(Hkv), p.G = int(G), p.D = int(D), p.S = int(S);
    p.num_splits = int(plan.num_splits);
    p.chunk = int(plan.chunk);
    p.scale = float(c.f("scale"));
    p.window = c.i("window", 0);
    p.softcap = c.has("softcap") ? float(c.f("softcap")) : 0.f;
    p.out = c.ptr<T>("out");
    if (plan.num_splits > 1) {  // as the op: [B, Hq, splits, 2] and [B, Hq, splits, D] float32
      p.part_ml = c.scratch<float>(size_t(B * Hq * plan.num_splits * 2));
      p.part_o = c.scratch<float>(size_t(B * Hq * plan.num_splits * D));
    }
    return balcony::cuda::launch_decode_attention<T>(p, int(B), nullptr);
  });
}

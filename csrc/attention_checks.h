// Argument checks of the attention-side ops (rope_append, decode_attention), shared by the CPU
// and CUDA entry points. Device-independent: the entry points check the device type themselves.
#pragma once
#include <cmath>

#include "torch_utils.h"

namespace balcony {

// rope_append: shapes, dtypes, layout, devices (not the position values).
inline void check_rope_append_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& positions,
                            const at::Tensor& cos, const at::Tensor& sin) {
  BALCONY_CHECK_DIM(query, 4);
  BALCONY_CHECK_DIM(key, 4);
  BALCONY_CHECK_DIM(value, 4);
  BALCONY_CHECK_DIM(key_cache, 4);
  BALCONY_CHECK_DIM(value_cache, 4);
  BALCONY_CHECK_DIM(positions, 2);
  BALCONY_CHECK_DIM(cos, 2);
  BALCONY_CHECK_DIM(sin, 2);
  const int64_t B = query.size(0), T = query.size(1), D = query.size(3);
  const int64_t Hkv = key.size(2);
  TORCH_CHECK(D % 2 == 0, "rope_append: head dimension must be even, got query of shape ", query.sizes());
  TORCH_CHECK(key.size(0) == B && key.size(1) == T && key.size(3) == D,
              "rope_append: key must be [B, T, Hkv, D] with B, T, D of query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), "rope_append: value must have key's shape ", key.sizes(), ", got ",
              value.sizes());
  TORCH_CHECK(key_cache.size(0) == B && key_cache.size(1) == Hkv && key_cache.size(3) == D,
              "rope_append: key_cache must be [B, Hkv, S, D] = [", B, ", ", Hkv, ", S, ", D, "], got ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "rope_append: value_cache must have key_cache's shape ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  TORCH_CHECK(positions.size(0) == B && positions.size(1) == T, "rope_append: positions must be [B, T] = [", B, ", ",
              T, "], got ", positions.sizes());
  TORCH_CHECK(cos.size(1) >= 1 && cos.size(1) <= D / 2 && sin.sizes() == cos.sizes(),
              "rope_append: cos and sin must be [P, R/2] with R <= D = ", D, " the rotated dimensions of a head "
              "(R/2 = ", D / 2, " for full rotary), alike; got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong, "rope_append: positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_append: cos and sin must be float32, got ", cos.scalar_type(), " and ", sin.scalar_type());
  BALCONY_CHECK_SAME_DTYPE(query, key);
  BALCONY_CHECK_SAME_DTYPE(key, value);
  BALCONY_CHECK_SAME_DTYPE(key, key_cache);
  BALCONY_CHECK_SAME_DTYPE(key, value_cache);
  BALCONY_CHECK_LAST_DIM_CONTIGUOUS(query);
  BALCONY_CHECK_LAST_DIM_CONTIGUOUS(key);
  BALCONY_CHECK_LAST_DIM_CONTIGUOUS(value);
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "rope_append: key_cache and value_cache must be contiguous, got strides ", key_cache.strides(), " and ",
              value_cache.strides());
  for (const at::Tensor* t : {&key, &value, &key_cache, &value_cache, &positions, &cos, &sin})
    TORCH_CHECK(t->device() == query.device(), "rope_append: every tensor must be on query's device ",
                query.device(), ", got one on ", t->device());
}


// decode_attention: shapes, dtypes, layout, devices (not the seq_lens values).
inline void check_decode_attention_args(const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& value_cache, const at::Tensor& seq_lens,
                                        int64_t num_splits, int64_t window, double softcap) {
  BALCONY_CHECK_DIM(query, 3);
  BALCONY_CHECK_DIM(key_cache, 4);
  BALCONY_CHECK_DIM(value_cache, 4);
  BALCONY_CHECK_DIM(seq_lens, 1);
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = key_cache.size(1);
  TORCH_CHECK(key_cache.size(0) == B && key_cache.size(3) == D,
              "decode_attention: key_cache must be [B, Hkv, S, D] with B = ", B, " and D = ", D, " of query ",
              query.sizes(), ", got ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "decode_attention: value_cache must have key_cache's shape ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_attention: query heads (", Hq,
              ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(seq_lens.size(0) == B, "decode_attention: seq_lens must be [B] = [", B, "], got ", seq_lens.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt || seq_lens.scalar_type() == at::kLong,
              "decode_attention: seq_lens must be int32 or int64, got ", seq_lens.scalar_type());
  TORCH_CHECK(num_splits >= 0, "decode_attention: num_splits must be >= 0 (0 = choose), got ", num_splits);
  TORCH_CHECK(window >= 0, "decode_attention: window must be >= 0 (0: every entry), got ", window);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "decode_attention: softcap must be a finite number >= 0 (0: off), got ",
              softcap);
  BALCONY_CHECK_SAME_DTYPE(query, key_cache);
  BALCONY_CHECK_SAME_DTYPE(key_cache, value_cache);
  BALCONY_CHECK_LAST_DIM_CONTIGUOUS(query);
  BALCONY_CHECK_LAST_DIM_CONTIGUOUS(key_cache);
  BALCONY_CHECK_LAST_DIM_CONTIGUOUS(value_cache);
  for (const at::Tensor* t : {&key_cache, &value_cache, &seq_lens})
    TORCH_CHECK(t->device() == query.device(), "decode_attention: every tensor must be on query's device ",
                query.device(), ", got one on ", t->device());
}

}  // namespace balcony

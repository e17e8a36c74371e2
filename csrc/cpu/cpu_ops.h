// CPU op bodies shared between op entry points: the decode step calls them on buffers it owns
// (no allocation), the torch.ops entry points allocate and call them.
#pragma once

#include <ATen/ATen.h>

#include "../sample_tokens_args.h"

namespace balcony {

// sample_tokens on checked arguments: out [rows] int64, scratch get_num_threads() x vocab floats.
void sample_tokens_cpu_into(const SampleArgs& a, int64_t* out, float* scratch);

// decode_attention on checked arguments into caller-owned buffers: out [B,Hq,D] of the query's
// dtype; with splits > 1, part_ml [B,Hq,splits,2] and part_o [B,Hq,splits,D] floats; scratch
// get_num_threads() x decode_attention_cpu_scratch_floats(G, D) floats. seq_lens int64 [B]. window > 0:
// each row attends to its last `window` positions only (sliding-window layers); max_len is then the
// longest span attended, min(longest row, window), for the splits as for the chunks. softcap > 0: the
// scores soft-capped, softcap * tanh(score / softcap) (Gemma 2).
int64_t decode_attention_cpu_splits(int64_t B, int64_t Hkv, int64_t max_len, int64_t requested);
int64_t decode_attention_cpu_scratch_floats(int64_t G, int64_t D);
void decode_attention_cpu_into(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const int64_t* seq_lens, int64_t max_len, double scale, int64_t splits, void* out,
                               float* part_ml, float* part_o, float* scratch, int64_t window = 0,
                               double softcap = 0.0);

// Float32 elements of torch.ops.balcony.decode_step's workspace (for the current thread count).
int64_t decode_step_workspace(int64_t batch, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t inter, int64_t vocab);

}  // namespace balcony

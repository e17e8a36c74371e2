// CPU op bodies shared between op entry points: the decode step calls them on buffers it owns
// (no allocation), the torch.ops entry points allocate and call them.
#pragma once

#include <ATen/ATen.h>

#include "../sample_tokens_args.h"

namespace balcony {

// sample_tokens on checked arguments: out [rows] int64, scratch get_num_threads() x vocab floats.
void sample_tokens_cpu_into(const SampleArgs& a, int64_t* out, float* scratch);

// Float32 elements of torch.ops.balcony.decode_step's workspace (for the current thread count).
int64_t decode_step_workspace(int64_t batch, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t inter, int64_t vocab);

}  // namespace balcony

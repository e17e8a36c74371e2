// Harness entry for balcony/sample_tokens.cuh: next-token sampling, one block per row. `scratch` holds
// rows * vocab floats (the kernel's unnormalised probabilities); an offset (in elements) lets a test
// pick misaligned logits.
#include "balcony/sample_tokens.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(sample_tokens) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    return balcony::cuda::launch_sample_tokens<T>(
        c.ptr<T>("logits", c.i("offset", 0)), c.i("stride"), c.i("rows"), int(c.i("vocab")),
        c.ptr<float>("temperature"), c.ptr<int64_t>("top_k"), c.ptr<float>("top_p"), c.ptr<float>("uniform"),
        c.ptr<int64_t>("out"), c.ptr<float>("scratch"), nullptr);
  });
}

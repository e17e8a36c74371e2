// Harness entry for balcony/fused_linear_kl.cuh: the fused KL row kernel (launch_fused_kl) on logits
// the test computes. `s` (student logits) is overwritten by the gradient when compute_grad. Offsets
// (in elements) let a test pick misaligned rows.
#include "balcony/fused_linear_kl.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(fused_kl) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    return balcony::cuda::launch_fused_kl<T>(c.ptr<T>("s", c.i("s_offset", 0)), c.i("s_stride"),
                                             c.ptr<T>("t", c.i("t_offset", 0)), c.i("t_stride"), c.i("rows"),
                                             int(c.i("vocab")), c.ptr<float>("loss"), float(c.f("grad_scale")),
                                             c.i("compute_grad") != 0, nullptr);
  });
}

// Harness entry for balcony/rms_norm.cuh: RMSNorm, and the fused residual-add + RMSNorm when a
// `residual` buffer is given. Offsets (in elements) let a test pick misaligned pointers.
#include "balcony/rms_norm.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(rms_norm) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    return balcony::cuda::launch_rms_norm<T>(
        c.ptr<T>("x", c.i("x_offset", 0)), c.i("x_stride"), c.ptr<T>("w", c.i("w_offset", 0)),
        c.ptr<T>("out", c.i("out_offset", 0)), c.i("out_stride"), c.ptr<T>("residual", c.i("res_offset", 0), true),
        c.i("res_stride", 0), c.i("rows"), int(c.i("hidden")), float(c.f("eps")), nullptr);
  });
}

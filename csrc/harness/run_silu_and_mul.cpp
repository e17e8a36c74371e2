// Harness entries for balcony/silu_and_mul.cuh: the forward (silu_and_mul) and the backward
// (silu_and_mul_backward). Offsets (in elements) let a test pick misaligned pointers; strides (in
// elements) may exceed the row so padding between rows can be checked.
#include "balcony/silu_and_mul.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(silu_and_mul) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    return balcony::cuda::launch_silu_and_mul<T>(c.ptr<T>("x", c.i("x_offset", 0)), c.i("x_stride"),
                                                 c.ptr<T>("out", c.i("out_offset", 0)), c.i("out_stride"),
                                                 c.i("rows"), int(c.i("inter")), nullptr);
  });
}

BALCONY_HARNESS_ENTRY(silu_and_mul_backward) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    return balcony::cuda::launch_silu_and_mul_backward<T>(
        c.ptr<T>("grad", c.i("grad_offset", 0)), c.i("grad_stride"), c.ptr<T>("x", c.i("x_offset", 0)),
        c.i("x_stride"), c.ptr<T>("grad_in", c.i("gi_offset", 0)), c.i("gi_stride"), c.i("rows"),
        int(c.i("inter")), nullptr);
  });
}

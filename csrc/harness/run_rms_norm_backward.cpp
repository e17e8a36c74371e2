// Harness entry for balcony/rms_norm.cuh's backward: launch_rms_norm_backward (per-block partials of
// grad_w plus grad_x, then the fixed-order reduction of the partials). The launch shape comes from
// rms_norm_backward_shape (as in csrc/cuda/rms_norm.cu) for `sm_count`; the test states the k and
// threads it expects (checked here, so a case cannot miss its path) and the number of blocks `parts`
// (at most the shape's: fewer blocks give each block several rows), which sizes `partial`.
#include <cstdio>

#include "balcony/rms_norm.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(rms_norm_backward) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    namespace bc = balcony::cuda;
    const T* g = c.ptr<T>("g", c.i("offset", 0));
    const T* x = c.ptr<T>("x", c.i("offset", 0));
    const T* w = c.ptr<T>("w", c.i("offset", 0));
    T* grad_x = c.ptr<T>("grad_x", c.i("offset", 0));
    const long long stride = c.i("stride"), rows = c.i("rows");
    const int hidden = int(c.i("hidden"));
    const bool vec = bc::rms_norm_backward_vectorized(g, stride, x, stride, w, grad_x, stride, hidden);
    bc::RmsNormBackwardShape shape = bc::rms_norm_backward_shape<T>(rows, hidden, vec, int(c.i("sm_count")));
    if (vec != (c.i("vec") != 0) || shape.k != c.i("k") || shape.threads != c.i("threads") ||
        c.i("parts") > shape.parts) {
      fprintf(stderr, "rms_norm_backward entry: shape vec=%d k=%d threads=%d parts=%d, not what the test expects\n",
              int(vec), shape.k, shape.threads, shape.parts);
      return cudaErrorInvalidValue;
    }
    shape.parts = int(c.i("parts"));
    return bc::launch_rms_norm_backward<T>(g, stride, x, stride, w, grad_x, stride, c.ptr<T>("grad_w"),
                                           c.ptr<float>("partial"), shape, rows, hidden, float(c.f("eps")), nullptr);
  });
}

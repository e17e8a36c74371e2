// Harness entry for balcony/rms_norm.cuh's backward: launch_rms_norm_backward (per-block partials of
// grad_w plus grad_x, then the fixed-order reduction of the partials), with the kernel, shape and
// fallback chosen by the op's own host logic (rms_norm_backward_plan, balcony/rms_norm_launch.h, as in
// csrc/cuda/rms_norm.cu) for `sm_count` SMs (default: the modelled device's). Reports vec, k, threads,
// parts (the op's choice), aten_fallback, and blocks (what was launched). Optional `max_blocks` caps
// the blocks below the op's choice, so that small cases give each block several rows (the op does
// that only when rows exceed what the GPU holds); `plan_only` = 1 reports without launching. The
// float32 `partial` scratch [blocks, hidden] is allocated here. With the ATen fallback nothing is
// launched (the op computes in ATen ops).
#include <algorithm>

#include "balcony/rms_norm.cuh"
#include "balcony/rms_norm_launch.h"
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
    int sm_count = 0;
    cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0);
    sm_count = int(c.i("sm_count", sm_count));
    const bc::RmsNormBackwardPlan plan =
        bc::rms_norm_backward_plan<T>(g, stride, x, stride, w, grad_x, stride, rows, hidden, sm_count);
    c.report("vec", plan.vec);
    c.report("k", plan.shape.k);
    c.report("threads", plan.shape.threads);
    c.report("parts", plan.shape.parts);
    c.report("aten_fallback", plan.aten_fallback());
    if (plan.aten_fallback() || c.i("plan_only", 0) != 0) return cudaSuccess;
    bc::RmsNormBackwardShape shape = plan.shape;
    shape.parts = int(std::min<long long>(shape.parts, c.i("max_blocks", shape.parts)));
    c.report("blocks", shape.parts);
    float* partial = c.scratch<float>(size_t(shape.parts) * size_t(hidden));
    return bc::launch_rms_norm_backward<T>(g, stride, x, stride, w, grad_x, stride, c.ptr<T>("grad_w"), partial, shape,
                                           rows, hidden, float(c.f("eps")), nullptr);
  });
}

// RMSNorm and fused residual-add + RMSNorm, CPU kernel (one capability; see csrc/cpu/capability.h).
#pragma once
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// Rows [begin, end) of a (rows x hidden) matrix whose rows are `*_stride` elements apart.
// residual == nullptr: out = w * x * rsqrt(mean(x^2) + eps).
// residual != nullptr: residual = x + residual (rounded to T), then out = rmsnorm(residual) * w.
template <typename T>
inline void rms_norm_rows(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride, T* residual,
                          int64_t res_stride, int64_t hidden, float eps, int64_t begin, int64_t end) {
  constexpr int W = kVecWidth;
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * x_stride;
    T* orow = out + row * out_stride;
    const T* src = xr;
    vfloat acc = vsplat(0.f);
    int64_t i = 0;
    if (residual != nullptr) {
      T* rr = residual + row * res_stride;
      for (; i + W <= hidden; i += W) {
        vfloat s = vload(xr + i) + vload(rr + i);
        vstore(rr + i, s);
        s = vload(rr + i);  // the rounded value is what gets normalised
        acc += s * s;
      }
      if (i < hidden) {
        int n = static_cast<int>(hidden - i);
        vfloat s = vload_partial(xr + i, n) + vload_partial(rr + i, n);
        vstore_partial(rr + i, s, n);
        s = vload_partial(rr + i, n);
        acc += s * s;
      }
      src = rr;
    } else {
      for (; i + W <= hidden; i += W) {
        vfloat v = vload(xr + i);
        acc += v * v;
      }
      if (i < hidden) {
        vfloat v = vload_partial(xr + i, static_cast<int>(hidden - i));
        acc += v * v;
      }
    }
    const float rstd = 1.0f / std::sqrt(vsum(acc) / static_cast<float>(hidden) + eps);
    const vfloat vr = vsplat(rstd);
    for (i = 0; i + W <= hidden; i += W) vstore(orow + i, vload(src + i) * vr * vload(w + i));
    if (i < hidden) {
      int n = static_cast<int>(hidden - i);
      vstore_partial(orow + i, vload_partial(src + i, n) * vr * vload_partial(w + i, n), n);
    }
  }
}

void rms_norm(ScalarKind kind, const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride,
              void* residual, int64_t res_stride, int64_t hidden, float eps, int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16)
    rms_norm_rows(static_cast<const bf16_t*>(x), x_stride, static_cast<const bf16_t*>(w), static_cast<bf16_t*>(out),
                  out_stride, static_cast<bf16_t*>(residual), res_stride, hidden, eps, begin, end);
  else
    rms_norm_rows(static_cast<const float*>(x), x_stride, static_cast<const float*>(w), static_cast<float*>(out),
                  out_stride, static_cast<float*>(residual), res_stride, hidden, eps, begin, end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

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

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// Backward of rms_norm for rows [begin, end). With r = rsqrt(mean(x^2) + eps) and gw = g * w:
//   grad_x = r * gw - x * r^3 * mean(gw * x)
//   grad_w_acc += g * x * r           (float32, `hidden` entries; the caller zeroes it and sums
//                                      the accumulators of all row ranges in a fixed order)
// Two passes over the row: the first gathers sum(x^2) and sum(gw * x), the second writes.
// NOTE: a row of x and g is at most a few tens of KiB, so the second pass reads from L1/L2.
template <typename T>
inline void rms_norm_backward_rows(const T* g, int64_t g_stride, const T* x, int64_t x_stride, const T* w, T* grad_x,
                                   int64_t gx_stride, float* grad_w_acc, int64_t hidden, float eps, int64_t begin,
                                   int64_t end) {
  constexpr int W = kVecWidth;
  const float inv_h = 1.0f / static_cast<float>(hidden);
  for (int64_t row = begin; row < end; ++row) {
    const T* gr = g + row * g_stride;
    const T* xr = x + row * x_stride;
    T* out = grad_x + row * gx_stride;
    vfloat ss = vsplat(0.f), dot = vsplat(0.f);
    int64_t i = 0;
    for (; i + W <= hidden; i += W) {
      vfloat xv = vload(xr + i);
      ss += xv * xv;
      dot += vload(gr + i) * vload(w + i) * xv;
    }
    if (i < hidden) {
      const int n = static_cast<int>(hidden - i);
      vfloat xv = vload_partial(xr + i, n);
      ss += xv * xv;
      dot += vload_partial(gr + i, n) * vload_partial(w + i, n) * xv;
    }
    const float r = 1.0f / std::sqrt(vsum(ss) * inv_h + eps);
    const vfloat vr = vsplat(r);
    const vfloat vc = vsplat(r * r * r * vsum(dot) * inv_h);
    for (i = 0; i + W <= hidden; i += W) {
      vfloat xv = vload(xr + i), gv = vload(gr + i);
      vstore(out + i, vr * gv * vload(w + i) - vc * xv);
      vstore(grad_w_acc + i, vload(grad_w_acc + i) + gv * xv * vr);
    }
    if (i < hidden) {
      const int n = static_cast<int>(hidden - i);
      vfloat xv = vload_partial(xr + i, n), gv = vload_partial(gr + i, n);
      vstore_partial(out + i, vr * gv * vload_partial(w + i, n) - vc * xv, n);
      vstore_partial(grad_w_acc + i, vload_partial(grad_w_acc + i, n) + gv * xv * vr, n);
    }
  }
}

void rms_norm_backward(ScalarKind kind, const void* g, int64_t g_stride, const void* x, int64_t x_stride,
                       const void* w, void* grad_x, int64_t gx_stride, float* grad_w_acc, int64_t hidden, float eps,
                       int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16)
    rms_norm_backward_rows(static_cast<const bf16_t*>(g), g_stride, static_cast<const bf16_t*>(x), x_stride,
                           static_cast<const bf16_t*>(w), static_cast<bf16_t*>(grad_x), gx_stride, grad_w_acc, hidden,
                           eps, begin, end);
  else
    rms_norm_backward_rows(static_cast<const float*>(g), g_stride, static_cast<const float*>(x), x_stride,
                           static_cast<const float*>(w), static_cast<float*>(grad_x), gx_stride, grad_w_acc, hidden,
                           eps, begin, end);
}

// out[i] = sum over p < parts of acc[p * hidden + i], summed in order p = 0, 1, ... (deterministic).
void sum_partials(ScalarKind kind, const float* acc, int64_t parts, int64_t hidden, void* out) {
  constexpr int W = kVecWidth;
  int64_t i = 0;
  auto store = [&](int64_t at, vfloat v, int n) {
    if (kind == ScalarKind::BF16) {
      if (n == W) vstore(static_cast<bf16_t*>(out) + at, v);
      else vstore_partial(static_cast<bf16_t*>(out) + at, v, n);
    } else {
      if (n == W) vstore(static_cast<float*>(out) + at, v);
      else vstore_partial(static_cast<float*>(out) + at, v, n);
    }
  };
  for (; i + W <= hidden; i += W) {
    vfloat s = vload(acc + i);
    for (int64_t p = 1; p < parts; ++p) s += vload(acc + p * hidden + i);
    store(i, s, W);
  }
  if (i < hidden) {
    const int n = static_cast<int>(hidden - i);
    vfloat s = vload_partial(acc + i, n);
    for (int64_t p = 1; p < parts; ++p) s += vload_partial(acc + p * hidden + i, n);
    store(i, s, n);
  }
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

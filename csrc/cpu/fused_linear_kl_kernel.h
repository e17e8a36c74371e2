// Row kernel of the fused linear + KL(p_teacher || p_student) loss, CPU (one capability; see
// csrc/cpu/capability.h). The matrix products live in the op (csrc/fused_linear_kl_chunked.h);
// this is the one pass over a chunk of logits between them.
#pragma once
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// Rows [begin, end) of a chunk. s: student logits (row stride s_stride), t: teacher logits
// (row stride t_stride), both `vocab` wide, in T. Per row:
//   loss[row] = sum_v p_t (log p_t - log p_s), with p = softmax over the row (float32 math;
//               the final combination in double),
//   and when compute_grad, s[row] is overwritten with grad_scale * (softmax(s) - softmax(t)).
// scratch: 2 * vocab floats owned by the calling thread (exp(s - max_s) and exp(t - max_t), so
// the gradient pass needs no second exp).
template <typename T>
inline void fused_kl_rows_t(T* s, int64_t s_stride, const T* t, int64_t t_stride, int64_t vocab, float* loss,
                            float grad_scale, bool compute_grad, float* scratch, int64_t begin, int64_t end) {
  constexpr int W = kVecWidth;
  const float ninf = -INFINITY;
  float* es_buf = scratch;
  float* et_buf = scratch + vocab;
  for (int64_t row = begin; row < end; ++row) {
    T* sr = s + row * s_stride;
    const T* tr = t + row * t_stride;
    // Pass 1: both maxima.
    vfloat ms_v = vsplat(ninf), mt_v = vsplat(ninf);
    int64_t i = 0;
    for (; i + W <= vocab; i += W) {
      ms_v = vmax(ms_v, vload(sr + i));
      mt_v = vmax(mt_v, vload(tr + i));
    }
    const int tail = static_cast<int>(vocab - i);
    if (tail > 0) {
      ms_v = vmax(ms_v, vload_partial(sr + i, tail, ninf));
      mt_v = vmax(mt_v, vload_partial(tr + i, tail, ninf));
    }
    const float ms = vmaxall(ms_v), mt = vmaxall(mt_v);
    // Pass 2: the exponentials (kept in scratch), both partition sums and
    // A = sum_v exp(t - mt) * (t - s). Lanes where exp(t - mt) is 0 add nothing (so a -inf
    // teacher logit gives no 0 * inf NaN). Tail lanes load -inf and so contribute 0.
    const vfloat vms = vsplat(ms), vmt = vsplat(mt), zero = vsplat(0.f);
    vfloat zs = zero, zt = zero, acc = zero;
    auto step = [&](vfloat sv, vfloat tv, float* es_out, float* et_out, int n) {
      vfloat es = vexp(sv - vms), et = vexp(tv - vmt);
      zs += es;
      zt += et;
      acc += et > 0.f ? et * (tv - sv) : zero;
      if (n == W) {
        vstore(es_out, es);
        vstore(et_out, et);
      } else {
        vstore_partial(es_out, es, n);
        vstore_partial(et_out, et, n);
      }
    };
    for (i = 0; i + W <= vocab; i += W) step(vload(sr + i), vload(tr + i), es_buf + i, et_buf + i, W);
    if (tail > 0) step(vload_partial(sr + i, tail, ninf), vload_partial(tr + i, tail, ninf), es_buf + i, et_buf + i, tail);
    const double sum_s = vsum(zs), sum_t = vsum(zt), a = vsum(acc);
    // KL = sum p_t (t - mt - log Zt - s + ms + log Zs) = A / Zt + (ms - mt) + log Zs - log Zt.
    loss[row] = static_cast<float>(a / sum_t + (static_cast<double>(ms) - mt) + std::log(sum_s) - std::log(sum_t));
    if (!compute_grad) continue;
    // Pass 3: grad_scale * (softmax(s) - softmax(t)) over the student logits, from scratch.
    const vfloat cs = vsplat(static_cast<float>(grad_scale / sum_s));
    const vfloat ct = vsplat(static_cast<float>(grad_scale / sum_t));
    for (i = 0; i + W <= vocab; i += W) vstore(sr + i, vload(es_buf + i) * cs - vload(et_buf + i) * ct);
    if (tail > 0) vstore_partial(sr + i, vload_partial(es_buf + i, tail) * cs - vload_partial(et_buf + i, tail) * ct, tail);
  }
}

void fused_kl_rows(ScalarKind kind, void* s, int64_t s_stride, const void* t, int64_t t_stride, int64_t vocab,
                   float* loss, float grad_scale, bool compute_grad, float* scratch, int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16)
    fused_kl_rows_t(static_cast<bf16_t*>(s), s_stride, static_cast<const bf16_t*>(t), t_stride, vocab, loss,
                    grad_scale, compute_grad, scratch, begin, end);
  else
    fused_kl_rows_t(static_cast<float*>(s), s_stride, static_cast<const float*>(t), t_stride, vocab, loss,
                    grad_scale, compute_grad, scratch, begin, end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

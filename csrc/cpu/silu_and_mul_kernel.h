// SiLU-and-multiply (SwiGLU activation) and its backward, CPU kernel (one capability; see
// csrc/cpu/capability.h). A row of the input is [gate (inter) | up (inter)]; float32 math.
#pragma once
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// sigmoid(x) = 1 / (1 + exp(-x)); -x clamped to exp's normal range keeps both limits exact
// (1 / (1 + tiny) = 1, 1 / (1 + huge) = 0 after rounding to any output type).
inline vfloat vsigmoid(vfloat x) {
  return 1.0f / (1.0f + vexp_clamped(vmin(vmax(-x, vsplat(kExpLo)), vsplat(kExpHi))));
}

// Output store: with kInsn (bfloat16 output under Capability::AVX512_BF16) one conversion instruction.
template <bool kInsn, typename T>
inline void store_out(T* p, vfloat v) {
#ifdef BALCONY_CPU_BF16_INSN
  if constexpr (kInsn) {
    vstore_bf16_insn(p, v);
    return;
  }
#endif
  vstore(p, v);
}

// Software prefetch this far ahead of the loads (bytes). Gate and up are two read streams per row.
// NOTE: on one Zen 5 core, 4096 x 1536 bfloat16 went from ~8.7 to ~10.3 GB/s with it (the hardware
// prefetcher alone left the loads waiting); 512 B to 2 KB ahead all gave the same.
constexpr int64_t kPrefetchBytes = 1024;

// Prefetches the cache lines [p + ahead, p + ahead + n * sizeof(T)) for a step that reads n elements.
template <typename T, int N>
inline void prefetch_ahead(const T* p) {
  constexpr int64_t ahead = kPrefetchBytes / sizeof(T);
  for (int64_t b = 0; b < static_cast<int64_t>(N * sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p + ahead) + b);
}

// out = silu(gate) * up for rows [begin, end).
template <typename T, bool kInsn>
inline void silu_and_mul_rows(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t inter,
                              int64_t begin, int64_t end) {
  constexpr int W = kVecWidth;
  for (int64_t row = begin; row < end; ++row) {
    const T* gate = in + row * in_stride;
    const T* up = gate + inter;
    T* o = out + row * out_stride;
    int64_t i = 0;
    // Two vectors per step: two independent exp/divide chains in flight.
    for (; i + 2 * W <= inter; i += 2 * W) {
      prefetch_ahead<T, 2 * W>(gate + i);
      prefetch_ahead<T, 2 * W>(up + i);
      const vfloat a = vsilu(vload(gate + i)), b = vsilu(vload(gate + i + W));
      store_out<kInsn>(o + i, a * vload(up + i));
      store_out<kInsn>(o + i + W, b * vload(up + i + W));
    }
    if (i + W <= inter) {
      store_out<kInsn>(o + i, vsilu(vload(gate + i)) * vload(up + i));
      i += W;
    }
    if (i < inter) {
      const int n = static_cast<int>(inter - i);
      vstore_partial(o + i, vsilu(vload_partial(gate + i, n)) * vload_partial(up + i, n), n);
    }
  }
}

// With s = sigmoid(gate): grad_gate = grad * up * s * (1 + gate * (1 - s)), grad_up = grad * gate * s.
inline vfloat silu_mul_grads(vfloat g, vfloat gate, vfloat up, vfloat* grad_up) {
  vfloat s = vsigmoid(gate);
  *grad_up = g * gate * s;
  return g * up * s * (1.0f + gate * (1.0f - s));
}

template <typename T, bool kInsn>
inline void silu_and_mul_backward_rows(const T* grad, int64_t grad_stride, const T* in, int64_t in_stride,
                                       T* grad_in, int64_t gi_stride, int64_t inter, int64_t begin, int64_t end) {
  constexpr int W = kVecWidth;
  for (int64_t row = begin; row < end; ++row) {
    const T* gr = grad + row * grad_stride;
    const T* gate = in + row * in_stride;
    const T* up = gate + inter;
    T* dgate = grad_in + row * gi_stride;
    T* dup = dgate + inter;
    int64_t i = 0;
    vfloat gu;
    for (; i + W <= inter; i += W) {
      prefetch_ahead<T, W>(gr + i);
      prefetch_ahead<T, W>(gate + i);
      prefetch_ahead<T, W>(up + i);
      store_out<kInsn>(dgate + i, silu_mul_grads(vload(gr + i), vload(gate + i), vload(up + i), &gu));
      store_out<kInsn>(dup + i, gu);
    }
    if (i < inter) {
      const int n = static_cast<int>(inter - i);
      vfloat gg = silu_mul_grads(vload_partial(gr + i, n), vload_partial(gate + i, n), vload_partial(up + i, n), &gu);
      vstore_partial(dgate + i, gg, n);
      vstore_partial(dup + i, gu, n);
    }
  }
}

void silu_and_mul(ScalarKind kind, const void* in, int64_t in_stride, void* out, int64_t out_stride, int64_t inter,
                  int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16 && bf16_insn())
    silu_and_mul_rows<bf16_t, true>(static_cast<const bf16_t*>(in), in_stride, static_cast<bf16_t*>(out), out_stride,
                                    inter, begin, end);
  else if (kind == ScalarKind::BF16)
    silu_and_mul_rows<bf16_t, false>(static_cast<const bf16_t*>(in), in_stride, static_cast<bf16_t*>(out),
                                     out_stride, inter, begin, end);
  else
    silu_and_mul_rows<float, false>(static_cast<const float*>(in), in_stride, static_cast<float*>(out), out_stride,
                                    inter, begin, end);
}

void silu_and_mul_backward(ScalarKind kind, const void* grad, int64_t grad_stride, const void* in, int64_t in_stride,
                           void* grad_in, int64_t gi_stride, int64_t inter, int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16 && bf16_insn())
    silu_and_mul_backward_rows<bf16_t, true>(static_cast<const bf16_t*>(grad), grad_stride,
                                             static_cast<const bf16_t*>(in), in_stride, static_cast<bf16_t*>(grad_in),
                                             gi_stride, inter, begin, end);
  else if (kind == ScalarKind::BF16)
    silu_and_mul_backward_rows<bf16_t, false>(static_cast<const bf16_t*>(grad), grad_stride,
                                              static_cast<const bf16_t*>(in), in_stride,
                                              static_cast<bf16_t*>(grad_in), gi_stride, inter, begin, end);
  else
    silu_and_mul_backward_rows<float, false>(static_cast<const float*>(grad), grad_stride,
                                             static_cast<const float*>(in), in_stride, static_cast<float*>(grad_in),
                                             gi_stride, inter, begin, end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

// Rotary embedding (rotate-half) on query and key, with key/value appended to the KV cache.
// CPU kernel (one capability; see csrc/cpu/capability.h).
#pragma once
#include "attention_args.h"
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

// In place on x (may alias out) or from x into out: for i < half, with c = cos[i], s = sin[i]
//   out[i]        = x[i] * c - x[i + half] * s
//   out[i + half] = x[i + half] * c + x[i] * s
// Float32 math, one rounding to T. Each vector step loads both halves before storing either,
// so x == out is safe.
template <typename T>
inline void rope_rotate_row(const T* x, T* out, const float* cos, const float* sin, int64_t half) {
  constexpr int W = kVecWidth;
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    const vfloat x1 = vload(x + i), x2 = vload(x + half + i);
    const vfloat c = vload(cos + i), s = vload(sin + i);
    vstore(out + i, x1 * c - x2 * s);
    vstore(out + half + i, x2 * c + x1 * s);
  }
  if (i < half) {
    const int n = static_cast<int>(half - i);
    const vfloat x1 = vload_partial(x + i, n), x2 = vload_partial(x + half + i, n);
    const vfloat c = vload_partial(cos + i, n), s = vload_partial(sin + i, n);
    vstore_partial(out + i, x1 * c - x2 * s, n);
    vstore_partial(out + half + i, x2 * c + x1 * s, n);
  }
}

// Tokens [begin, end): query rotated in place over its first R = 2 * rot_half dimensions (the rest
// unchanged); key rotated likewise into the key cache, its dimensions R..D-1 copied; value copied.
template <typename T>
inline void rope_append_tokens(const RopeAppendArgs& a, int64_t begin, int64_t end) {
  const int64_t half = a.rot_half, rest = a.D - 2 * half;
  for (int64_t token = begin; token < end; ++token) {
    const int64_t pos = a.positions[token];
    if (pos < 0) continue;
    const int64_t b = token / a.T, t = token % a.T;
    const float* c = a.cos + pos * half;
    const float* s = a.sin + pos * half;
    T* q = static_cast<T*>(a.query) + b * a.q_sb + t * a.q_st;
    for (int64_t h = 0; h < a.Hq; ++h) rope_rotate_row(q + h * a.q_sh, q + h * a.q_sh, c, s, half);
    const T* k = static_cast<const T*>(a.key) + b * a.k_sb + t * a.k_st;
    const T* v = static_cast<const T*>(a.value) + b * a.v_sb + t * a.v_st;
    for (int64_t h = 0; h < a.Hkv; ++h) {
      const int64_t slot = ((b * a.Hkv + h) * a.S + pos) * a.D;
      rope_rotate_row(k + h * a.k_sh, static_cast<T*>(a.key_cache) + slot, c, s, half);
      if (rest > 0)
        std::memcpy(static_cast<T*>(a.key_cache) + slot + 2 * half, k + h * a.k_sh + 2 * half, sizeof(T) * rest);
      std::memcpy(static_cast<T*>(a.value_cache) + slot, v + h * a.v_sh, sizeof(T) * a.D);
    }
  }
}

// Tokens [begin, end) of the flattened (B, T).
void rope_append(ScalarKind kind, const RopeAppendArgs& args, int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16)
    rope_append_tokens<bf16_t>(args, begin, end);
  else
    rope_append_tokens<float>(args, begin, end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

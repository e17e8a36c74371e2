// Torch-free scalar helpers shared by the CPU kernels and the C++ tests.
#pragma once
#include <cstdint>
#include <cstring>

namespace balcony {

// Element type of a tensor handed to a CPU kernel entry point.
enum class ScalarKind : int { F32 = 0, BF16 = 1 };

// bfloat16 as raw bits; layout-compatible with c10::BFloat16 and __nv_bfloat16.
struct bf16_t {
  uint16_t bits;
};

inline float bf16_to_float(bf16_t h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN kept quiet (same rule as c10::BFloat16).
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <typename T> inline float to_float(T x);
template <> inline float to_float<float>(float x) { return x; }
template <> inline float to_float<bf16_t>(bf16_t x) { return bf16_to_float(x); }

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16_t from_float<bf16_t>(float x) { return float_to_bf16(x); }

}  // namespace balcony

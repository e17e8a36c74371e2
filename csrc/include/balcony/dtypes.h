// Torch-free scalar helpers shared by the CPU kernels and the C++ tests.
#pragma once
#include <cstdint>
#include <cstring>

namespace balcony {

// Element type of a tensor handed to a CPU kernel entry point. Q8 (linear_rows weights only): each
// weight row of K columns is K int8 values then K / 32 float16 scales (uint8 [N, K + K / 16]), one
// scale per block of 32 consecutive columns: w[n, k] = int8[n, k] * scale[n, k / 32]. 8.5 bits per
// weight, the bytes of llama.cpp's Q8_0.
//
// Q4 (linear_rows weights only, int8 storage): each row is K / 2 bytes of 4-bit values then K / 32
// float16 scales (int8 [N, K / 2 + K / 16]); in block j of 32 columns, byte i (0 <= i < 16) holds
// column 32j + i in its low nibble and column 32j + 16 + i in its high nibble, each value
// v in 0..15 standing for (v - 8) * scale. 4.5 bits per weight, the bytes of llama.cpp's Q4_0.
//
// Q4_1 (linear_rows weights only, int16 storage): each row is K / 2 bytes of 4-bit values (laid out as
// Q4's), then K / 32 float16 scales, then K / 32 float16 minimums (int16 [N, (K / 2 + K / 8) / 2]);
// v in 0..15 stands for v * scale + min. 5 bits per weight, the bytes of llama.cpp's Q4_1.
enum class ScalarKind : int { F32 = 0, BF16 = 1, Q8 = 2, Q4 = 3, Q4_1 = 4 };
constexpr int64_t kQ8Block = 32;
inline int64_t q8_row_bytes(int64_t K) { return K + K / kQ8Block * 2; }
inline int64_t q4_row_bytes(int64_t K) { return K / 2 + K / kQ8Block * 2; }
inline int64_t q4_1_row_bytes(int64_t K) { return K / 2 + K / kQ8Block * 4; }

// IEEE float16 bits -> float (every value: normals, subnormals, infinities, NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) man <<= 1, --exp;
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

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

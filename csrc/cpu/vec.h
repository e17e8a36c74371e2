// Portable SIMD for the CPU kernels, on GCC/Clang vector extensions.
//
// Include this only from kernel headers that are compiled inside a capability translation unit
// (csrc/cpu/capability/*.cpp). That unit sets the instruction set with `#pragma GCC target`,
// and defines BALCONY_CPU_CAPABILITY (the namespace, one per instruction set, so no inline
// function compiled for AVX-512 can be picked by the linker for a CPU without it) and
// BALCONY_VEC_WIDTH (floats per vector: 16 for AVX-512, 8 for AVX2, 4 for the baseline).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "balcony/dtypes.h"

#ifndef BALCONY_CPU_CAPABILITY
#error "csrc/cpu/vec.h is included from a capability translation unit only"
#endif

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

constexpr int kVecWidth = BALCONY_VEC_WIDTH;

typedef float vfloat __attribute__((vector_size(kVecWidth * 4)));
typedef int32_t vint __attribute__((vector_size(kVecWidth * 4)));
typedef uint32_t vuint __attribute__((vector_size(kVecWidth * 4)));
typedef uint16_t vhalfbits __attribute__((vector_size(kVecWidth * 2)));

inline vfloat vsplat(float x) { return vfloat{} + x; }

inline vfloat vload(const float* p) {
  vfloat r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline vfloat vload(const bf16_t* p) {
  vhalfbits h;
  std::memcpy(&h, p, sizeof h);
  vuint u = __builtin_convertvector(h, vuint) << 16;
  return (vfloat)u;  // same-size vector cast: reinterprets the bits
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(bf16_t* p, vfloat v) {
  vuint u = (vuint)v;
  vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vuint nan = (u >> 16) | 0x40u;
  vint is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  vuint bits = is_nan ? nan : rounded;
  vhalfbits h = __builtin_convertvector(bits, vhalfbits);
  std::memcpy(p, &h, sizeof h);
}

// Partial loads/stores for tails: n < kVecWidth elements, the rest filled with `fill`.
template <typename T>
inline vfloat vload_partial(const T* p, int n, float fill = 0.f) {
  alignas(64) float tmp[kVecWidth];
  for (int i = 0; i < kVecWidth; ++i) tmp[i] = i < n ? to_float(p[i]) : fill;
  return vload(tmp);
}
template <typename T>
inline void vstore_partial(T* p, vfloat v, int n) {
  alignas(64) float tmp[kVecWidth];
  vstore(tmp, v);
  for (int i = 0; i < n; ++i) p[i] = from_float<T>(tmp[i]);
}

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }

inline float vsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kVecWidth; ++i) s += v[i];
  return s;
}
inline float vmaxall(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kVecWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for float vectors: range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial,
// relative error ~2 ulp over the normal range; underflows to 0 below -87.34, saturates at +88.37.
inline vfloat vexp(vfloat x) {
  const vfloat hi = vsplat(88.3762626647949f), lo = vsplat(-87.3365448101577f);
  vint underflow = x < lo;
  x = vmin(vmax(x, lo), hi);
  vfloat n = x * 1.44269504088896341f;
  // round to nearest
  n = __builtin_convertvector(__builtin_convertvector(n + (n >= 0 ? vsplat(0.5f) : vsplat(-0.5f)), vint), vfloat);
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale = (vfloat)e;
  vfloat out = p * scale;
  return underflow ? vsplat(0.f) : out;
}

// x * sigmoid(x)
inline vfloat vsilu(vfloat x) { return x / (1.0f + vexp(-x)); }

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

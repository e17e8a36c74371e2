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
#include "capability.h"

#ifndef BALCONY_CPU_CAPABILITY
#error "csrc/cpu/vec.h is included from a capability translation unit only"
#endif

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

constexpr int kVecWidth = BALCONY_VEC_WIDTH;

typedef float vfloat __attribute__((vector_size(kVecWidth * 4)));
typedef int32_t vint __attribute__((vector_size(kVecWidth * 4)));
typedef uint32_t vuint __attribute__((vector_size(kVecWidth * 4)));
typedef uint16_t vhalfbits __attribute__((vector_size(kVecWidth * 2)));

// Broadcast. NOTE: written `vfloat{} + x`, GCC kept the scalar 0 + x (it differs from x for x = -0)
// and emitted vmovd + vaddss + vbroadcastss, a 3-instruction chain where a broadcast operand of the
// consuming FMA will do; x - 0 equals x for every x, so it folds away.
inline vfloat vsplat(float x) { return x - vfloat{}; }

inline vfloat vload(const float* p) {
  vfloat r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
// bfloat16 -> float: each 16-bit value moved to the top half of a 32-bit lane.
// NOTE: __builtin_convertvector compiled the zero-extension into two half-width extends plus an
// insert (AVX-512 and AVX2); the one-instruction forms below cut the bfloat16 load cost by ~25%.
inline vfloat vload(const bf16_t* p) {
  vhalfbits h;
  std::memcpy(&h, p, sizeof h);
#if BALCONY_VEC_WIDTH == 16
  typedef short v16hi __attribute__((vector_size(32)));
  typedef int v16si __attribute__((vector_size(64)));
  const vuint u = (vuint)__builtin_ia32_pmovzxwd512_mask((v16hi)h, v16si{}, (unsigned short)0xffff) << 16;
#elif BALCONY_VEC_WIDTH == 8
  typedef short v8hi __attribute__((vector_size(16)));
  const vuint u = (vuint)__builtin_ia32_pmovzxwd256((v8hi)h) << 16;
#else
  // Interleaved with zeros (one unpack): lane i holds h[i] << 16.
  const vuint u = (vuint)__builtin_shufflevector(vhalfbits{}, h, 0, 4, 1, 5, 2, 6, 3, 7);
#endif
  return (vfloat)u;  // same-size vector cast: reinterprets the bits
}
// int8 -> float: sign-extended to int32 (vpmovsxbd), then converted (vcvtdq2ps).
// NOTE: __builtin_convertvector from int8 (to float, or to int32) compiled to a scalar insert or
// conversion per lane; the sign extension is spelled out per width.
inline vfloat vload(const int8_t* p) {
#if BALCONY_VEC_WIDTH == 16
  typedef char v16qi __attribute__((vector_size(16)));
  v16qi b;
  std::memcpy(&b, p, 16);
  typedef int v16si __attribute__((vector_size(64)));
  const vint i = (vint)__builtin_ia32_pmovsxbd512_mask(b, v16si{}, (unsigned short)0xffff);
#elif BALCONY_VEC_WIDTH == 8
  typedef char v16qi __attribute__((vector_size(16)));
  v16qi b{};
  std::memcpy(&b, p, 8);
  const vint i = (vint)__builtin_ia32_pmovsxbd256(b);
#else
  vint i;
  for (int l = 0; l < kVecWidth; ++l) i[l] = p[l];
#endif
  return __builtin_convertvector(i, vfloat);
}
// n float16 values (raw bits, unaligned) -> float: 8 at a time with F16C in the AVX2 / AVX-512 builds.
inline void halves_to_floats(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if BALCONY_VEC_WIDTH >= 8
  typedef short v8hi __attribute__((vector_size(16)));
  typedef float v8sf __attribute__((vector_size(32)));
  for (; i + 8 <= n; i += 8) {
    v8hi h;
    std::memcpy(&h, src + 2 * i, sizeof h);
    const v8sf f = __builtin_ia32_vcvtph2ps256(h);
    std::memcpy(dst + i, &f, sizeof f);
  }
#endif
  for (; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, src + 2 * i, sizeof bits);
    dst[i] = half_to_float(bits);
  }
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
// float -> bfloat16, round to nearest even, NaN kept quiet (the scalar float_to_bf16 rule).
inline void vstore(bf16_t* p, vfloat v) {
  vuint u = (vuint)v;
  vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vuint nan = (u >> 16) | 0x40u;
  vint is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  vuint bits = is_nan ? nan : rounded;
#if BALCONY_VEC_WIDTH == 16
  typedef int v16si __attribute__((vector_size(64)));
  typedef short v16hi __attribute__((vector_size(32)));
  vhalfbits h = (vhalfbits)__builtin_ia32_pmovdw512_mask((v16si)bits, v16hi{}, (unsigned short)0xffff);
#else
  vhalfbits h = __builtin_convertvector(bits, vhalfbits);
#endif
  std::memcpy(p, &h, sizeof h);
}

// AVX512-BF16 (compiled into the AVX-512 build only; see csrc/cpu/capability.h). bf16_insn() says
// whether the capability in force lets a kernel use the instructions; kernels keep a plain path.
#ifdef BALCONY_CPU_BF16_INSN
inline bool bf16_insn() { return capability() == Capability::AVX512_BF16; }
// 32 bfloat16 values as the kernels hold them (16-bit integer lanes: loads, shuffles), and
// acc += a . b pairwise with vdpbf16ps. The builtin's operands are vectors of __bf16 from GCC 13 on
// (of short before), hence the bit cast.
typedef short v32bh __attribute__((vector_size(64)));
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
typedef short bf16_operand_t;
#else
typedef __bf16 bf16_operand_t;
#endif
typedef bf16_operand_t v32bf_operand __attribute__((vector_size(64)));
inline vfloat dpbf16(vfloat acc, v32bh a, v32bh b) {
  return __builtin_ia32_dpbf16ps_v16sf(acc, __builtin_bit_cast(v32bf_operand, a), __builtin_bit_cast(v32bf_operand, b));
}
// float -> bfloat16 in one instruction (vcvtneps2bf16): round to nearest even and NaN kept quiet
// like vstore, except that inputs below the smallest normal float (|x| < 2^-126) become +-0.
inline void vstore_bf16_insn(bf16_t* p, vfloat v) {
  const auto h = __builtin_ia32_cvtneps2bf16_v16sf(v);
  std::memcpy(p, &h, sizeof h);
}
#else
inline bool bf16_insn() { return false; }
#endif

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

// Horizontal sum and max by halving in registers (log2(W) shuffle + op steps).
// NOTE: written as a loop over the lanes, GCC kept a serial chain of W - 1 scalar adds.
template <typename Op>
inline float vreduce(vfloat v, Op op) {
#if BALCONY_VEC_WIDTH == 16
  typedef float v8 __attribute__((vector_size(32)));
  const v8 a = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  typedef float v4 __attribute__((vector_size(16)));
  const v4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
#elif BALCONY_VEC_WIDTH == 8
  typedef float v4 __attribute__((vector_size(16)));
  const v4 b = op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  const vfloat b = v;
#endif
  typedef float v2 __attribute__((vector_size(8)));
  const v2 c = op(__builtin_shufflevector(b, b, 0, 1), __builtin_shufflevector(b, b, 2, 3));
  return op(c, __builtin_shufflevector(c, c, 1, 0))[0];
}
inline float vsum(vfloat v) {
  return vreduce(v, [](auto a, auto b) { return a + b; });
}
inline float vmaxall(vfloat v) {
  return vreduce(v, [](auto a, auto b) { return a > b ? a : b; });
}

// exp(x) for x already clamped to [-87.34, 88.37] (the normal range of the result): range
// reduction to r in [-ln2/2, ln2/2] and a degree-5 polynomial (relative error 1.1e-7 on that
// interval, fitted with c0 = c1 = 1), ~2 ulp overall.
// n = round(x / ln2) comes from adding 1.5 * 2^23 (+ the exponent bias): the float's low mantissa
// bits then hold n + 127, which shifted into the exponent field gives 2^n with no conversions.
constexpr float kExpLo = -87.3365448101577f, kExpHi = 88.3762626647949f;
inline vfloat vexp_clamped(vfloat x) {
  const vfloat shifter = vsplat(12582912.0f + 127.0f);
  const vfloat t = x * 1.44269504088896341f + shifter;
  const vfloat n = t - shifter;  // round(x / ln2), exact
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = vsplat(8.31252709e-3f);
  p = p * r + 4.18901183e-2f;
  p = p * r + 1.66671142e-1f;
  p = p * r + 4.99992311e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * (vfloat)((vint)t << 23);  // times 2^n: n + 127 in the exponent field
}

// exp(x): underflows to 0 below -87.34 (so exp(-inf) = 0), saturates at +88.37.
inline vfloat vexp(vfloat x) {
  const vfloat lo = vsplat(kExpLo);
  const vint underflow = x < lo;
  const vfloat out = vexp_clamped(vmin(vmax(x, lo), vsplat(kExpHi)));
  return underflow ? vsplat(0.f) : out;
}

// x * sigmoid(x) = x / (1 + exp(-x)). Clamping -x is enough at both ends: exp(-x) stays finite or
// tiny, and x / (1 + e) goes to x or to 0 as it should.
inline vfloat vsilu(vfloat x) {
  const vfloat e = vexp_clamped(vmin(vmax(-x, vsplat(kExpLo)), vsplat(kExpHi)));
  return x / (1.0f + e);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

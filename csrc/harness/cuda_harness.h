// CPU execution harness for the CUDA kernels: what nvcc and the CUDA headers supply, modelled on the
// host so the unchanged kernel headers (csrc/include/balcony/*.cuh) compile with g++/clang++ and run.
//
// Included by balcony/device.h when BALCONY_CUDA_HARNESS is defined; this directory is on the include
// path of harness builds only. A launch runs the grid one block at a time; every thread of the block is
// a fiber, so __syncthreads and the warp primitives block and resume as on a GPU. Between two
// synchronisation points the threads run in an order drawn from the launch seed, shared memory starts
// as NaN/0xFF garbage in its own allocation, and barriers, warp masks and launch limits are checked.
// See docs/cuda_harness.md for what is checked and what cannot be.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------
// Qualifiers and attributes. __restrict__ is a GNU keyword already.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
#define __constant__
#define __CUDA_HARNESS__ 1

// ---------------------------------------------------------------------------------------------------
// Vector types.
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---------------------------------------------------------------------------------------------------
// Runtime API subset.
typedef struct CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMaxSharedMemoryPerBlock = 8,
                      cudaDevAttrWarpSize = 10, cudaDevAttrMultiProcessorCount = 16,
                      cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

namespace balcony_harness {

// Modelled device: an H100-like part (132 SMs, 48 KiB static shared, 227 KiB opt-in per block).
constexpr int kSmCount = 132;
constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;
constexpr size_t kSharedOptinLimit = 227 * 1024;

struct Coords {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
extern Coords g_coords;  // set by the scheduler before it resumes a thread

enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

// Kernel-side entry points (cuda_harness.cpp).
[[noreturn]] void kernel_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
unsigned long long warp_exchange(WarpOp op, unsigned mask, unsigned long long bits, int arg, int width);
int barrier(int kind, int pred);  // kind 0: plain, 1: count, 2: and, 3: or
unsigned active_mask();
void* static_shared(const void* key, size_t bytes, size_t align, const char* name);
void* dynamic_shared();

// Host-side entry points.
struct KernelBody {
  void* obj;
  void (*call)(void*);
};
cudaError_t launch_impl(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, KernelBody body);
cudaError_t get_last_error(bool reset);
bool failed();                  // sticky: a launch in this process found a bug
const char* failure_message();  // the first one
void set_seed(unsigned long long seed);
void set_max_dynamic_shared(const void* kernel, size_t bytes);

template <typename... P, typename... A>
cudaError_t launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...),
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // Arguments are converted to the parameter types once, as a launch copies them once; each thread's
  // call then gets its own by-value copy.
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  auto run = [&]() { std::apply(kernel, params); };
  KernelBody body{&run, [](void* f) { (*static_cast<decltype(run)*>(f))(); }};
  return launch_impl(name, reinterpret_cast<const void*>(kernel), grid, block, smem, body);
}

template <typename T>
T exchange_as(WarpOp op, unsigned mask, T var, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a type wider than 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline uint3 thread_idx() { return g_coords.thread; }
inline uint3 block_idx() { return g_coords.block; }
inline dim3 block_dim() { return g_coords.block_dim; }
inline dim3 grid_dim() { return g_coords.grid_dim; }

}  // namespace balcony_harness

// Built-in variables: read-only values of the running thread.
#define threadIdx (::balcony_harness::thread_idx())
#define blockIdx (::balcony_harness::block_idx())
#define blockDim (::balcony_harness::block_dim())
#define gridDim (::balcony_harness::grid_dim())
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------
// The contract of balcony/device.h.
#define BALCONY_SHARED(type, name, count)                                                               \
  static char name##_harness_site;                                                                      \
  type(&name)[count] = *reinterpret_cast<type(*)[count]>(::balcony_harness::static_shared(              \
      &name##_harness_site, sizeof(type) * (count), alignof(type), #name))
#define BALCONY_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::balcony_harness::dynamic_shared())
#define BALCONY_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::balcony_harness::launch(#kernel, (grid), (block), (smem), (stream), kernel, __VA_ARGS__)
#define BALCONY_LAST_ERROR() ::balcony_harness::get_last_error(true)

inline cudaError_t cudaGetLastError() { return ::balcony_harness::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::balcony_harness::get_last_error(false); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure (harness: see the message above)";
    default: return "harness error";
  }
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(::balcony_harness::kStaticSharedLimit); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(::balcony_harness::kSharedOptinLimit); break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = ::balcony_harness::kSmCount; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > ::balcony_harness::kSharedOptinLimit)
    return cudaErrorInvalidValue;
  ::balcony_harness::set_max_dynamic_shared(reinterpret_cast<const void*>(func), size_t(value));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(d, s, n);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Synchronisation and warp primitives.
inline void __syncthreads() { ::balcony_harness::barrier(0, 1); }
inline int __syncthreads_count(int p) { return ::balcony_harness::barrier(1, p); }
inline int __syncthreads_and(int p) { return ::balcony_harness::barrier(2, p); }
inline int __syncthreads_or(int p) { return ::balcony_harness::barrier(3, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::balcony_harness::warp_exchange(::balcony_harness::WarpOp::Sync, mask, 0, 0, 32);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline unsigned __activemask() { return ::balcony_harness::active_mask(); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::balcony_harness::exchange_as(::balcony_harness::WarpOp::ShflIdx, mask, var, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::balcony_harness::exchange_as(::balcony_harness::WarpOp::ShflUp, mask, var, int(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::balcony_harness::exchange_as(::balcony_harness::WarpOp::ShflDown, mask, var, int(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::balcony_harness::exchange_as(::balcony_harness::WarpOp::ShflXor, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(::balcony_harness::warp_exchange(::balcony_harness::WarpOp::Ballot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(::balcony_harness::warp_exchange(::balcony_harness::WarpOp::Any, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(::balcony_harness::warp_exchange(::balcony_harness::WarpOp::All, mask, pred != 0, 0, 32));
}

// ---------------------------------------------------------------------------------------------------
// Atomics. One host thread runs at a time and switches only at synchronisation points, so a plain
// read-modify-write is atomic; the order between threads is the seeded schedule's.
namespace balcony_harness {
template <typename T, typename F>
T atomic_rmw(T* p, F f) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) kernel_error("misaligned atomic at %p", (void*)p);
  T old = *p;
  *p = f(old);
  return old;
}
}  // namespace balcony_harness
#define BALCONY_HARNESS_ATOMIC(name, T, expr) \
  inline T name(T* p, T v) { return ::balcony_harness::atomic_rmw(p, [&](T a) -> T { return expr; }); }
BALCONY_HARNESS_ATOMIC(atomicAdd, int, a + v)
BALCONY_HARNESS_ATOMIC(atomicAdd, unsigned, a + v)
BALCONY_HARNESS_ATOMIC(atomicAdd, unsigned long long, a + v)
BALCONY_HARNESS_ATOMIC(atomicAdd, float, a + v)
BALCONY_HARNESS_ATOMIC(atomicAdd, double, a + v)
BALCONY_HARNESS_ATOMIC(atomicSub, int, a - v)
BALCONY_HARNESS_ATOMIC(atomicSub, unsigned, a - v)
BALCONY_HARNESS_ATOMIC(atomicMax, int, a > v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMax, unsigned, a > v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMax, long long, a > v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMax, unsigned long long, a > v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMin, int, a < v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMin, unsigned, a < v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMin, long long, a < v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicMin, unsigned long long, a < v ? a : v)
BALCONY_HARNESS_ATOMIC(atomicExch, int, v)
BALCONY_HARNESS_ATOMIC(atomicExch, unsigned, v)
BALCONY_HARNESS_ATOMIC(atomicExch, unsigned long long, v)
BALCONY_HARNESS_ATOMIC(atomicExch, float, v)
BALCONY_HARNESS_ATOMIC(atomicAnd, int, a & v)
BALCONY_HARNESS_ATOMIC(atomicAnd, unsigned, a & v)
BALCONY_HARNESS_ATOMIC(atomicOr, int, a | v)
BALCONY_HARNESS_ATOMIC(atomicOr, unsigned, a | v)
BALCONY_HARNESS_ATOMIC(atomicXor, int, a ^ v)
BALCONY_HARNESS_ATOMIC(atomicXor, unsigned, a ^ v)
BALCONY_HARNESS_ATOMIC(atomicInc, unsigned, a >= v ? 0u : a + 1)
#undef BALCONY_HARNESS_ATOMIC
#define BALCONY_HARNESS_CAS(T)                                                                        \
  inline T atomicCAS(T* p, T compare, T v) {                                                          \
    return ::balcony_harness::atomic_rmw(p, [&](T a) -> T { return a == compare ? v : a; });          \
  }
BALCONY_HARNESS_CAS(int)
BALCONY_HARNESS_CAS(unsigned)
BALCONY_HARNESS_CAS(unsigned long long)
BALCONY_HARNESS_CAS(unsigned short)
#undef BALCONY_HARNESS_CAS

// ---------------------------------------------------------------------------------------------------
// Math. <math.h> supplies expf, logf, fmaxf, fminf, sqrtf, erff, tanhf, exp2f, INFINITY, NAN, ...
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x != x ? 0.f : (x < 0.f ? 0.f : (x > 1.f ? 1.f : x)); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
// Device-code min/max overloads (CUDA has them in the global namespace).
#define BALCONY_HARNESS_MINMAX(T)                   \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
BALCONY_HARNESS_MINMAX(int)
BALCONY_HARNESS_MINMAX(unsigned)
BALCONY_HARNESS_MINMAX(long)
BALCONY_HARNESS_MINMAX(unsigned long)
BALCONY_HARNESS_MINMAX(long long)
BALCONY_HARNESS_MINMAX(unsigned long long)
#undef BALCONY_HARNESS_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---------------------------------------------------------------------------------------------------
// float16 / bfloat16: storage types with the explicit conversion intrinsics only. Like the torch
// extension build (which passes -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__ to nvcc), there are no implicit conversions and no operators:
// kernel code that compiles here compiles there.
struct __half_raw {
  unsigned short x;
};
struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
};
struct __nv_bfloat16_raw {
  unsigned short x;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

namespace balcony_harness {
// float -> binary16, round to nearest even (subnormals, overflow to infinity, NaN kept a NaN).
inline unsigned short float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                         // below 2^-14: subnormal half (or zero)
    float a;
    std::memcpy(&a, &ax, 4);
    return sign | uint32_t(std::nearbyint(a * 16777216.0f));  // exact scaling; default mode is RNE
  }
  uint32_t h = ((((ax >> 23) - 127u + 15u) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return sign | h;
}
inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp(float(m), -24);
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 31 ? (0x7f800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13)));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline unsigned short float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return ((x >> 16) & 0x8000u) | 0x7fc0u;
  return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}
inline float bf16_bits_to_float(unsigned short b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
}  // namespace balcony_harness

inline float __half2float(__half h) { return ::balcony_harness::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half_raw{::balcony_harness::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::balcony_harness::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{::balcony_harness::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half_raw{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16_raw{x}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return {__float2half_rn(a), __float2half_rn(a)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }
// Arithmetic intrinsics: exact in float, then one rounding (as the hardware's for add/sub/mul).
inline __half __hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __float2half_rn(__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half_rn(__half2float(a) * __half2float(b)); }
inline __half __hfma(__half a, __half b, __half c) {
  return __float2half_rn(fmaf(__half2float(a), __half2float(b), __half2float(c)));
}
inline __half __hmax(__half a, __half b) { return __float2half_rn(fmaxf(__half2float(a), __half2float(b))); }
inline __half __hmin(__half a, __half b) { return __float2half_rn(fminf(__half2float(a), __half2float(b))); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(__bfloat162float(a) + __bfloat162float(b));
}
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(__bfloat162float(a) * __bfloat162float(b));
}
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(fmaxf(__bfloat162float(a), __bfloat162float(b)));
}
inline __half atomicAdd(__half* p, __half v) {
  return ::balcony_harness::atomic_rmw(p, [&](__half a) { return __hadd(a, v); });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return ::balcony_harness::atomic_rmw(p, [&](__nv_bfloat16 a) { return __hadd(a, v); });
}

// Runtime choice of the CPU instruction set for the kernels (torch-free).
//
// Every CPU kernel is compiled three times (csrc/cpu/capability/*.cpp): for the x86-64 baseline,
// for AVX2+FMA and for AVX-512 (F, BW, VL, DQ). At run time the widest set the CPU supports is used;
// the environment variable BALCONY_CPU_CAPABILITY (default | avx2 | avx512 | avx512bf16) or
// set_capability() lowers it, e.g. to test every variant on one machine. Asking for more than the
// CPU has is an error.
// AVX512_BF16 runs the AVX-512 build too; there its kernels also use the AVX512-BF16 instructions
// (vcvtneps2bf16, vdpbf16ps) on the paths that have them, and plain AVX-512 code under AVX512.
#pragma once

namespace balcony::cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

Capability max_supported_capability();
Capability capability();
// Returns false (and changes nothing) when the CPU lacks the instruction set.
bool set_capability(Capability c);
const char* capability_name(Capability c);
// Parses "default", "avx2", "avx512" or "avx512bf16"; returns false on anything else.
bool parse_capability(const char* name, Capability* out);

}  // namespace balcony::cpu

// Declares a kernel entry point in every capability namespace. The definition lives in the
// op's kernel header (csrc/cpu/<op>_kernel.h), compiled once per capability.
#if defined(__x86_64__) || defined(_M_X64)
#define BALCONY_CPU_KERNEL(ret, name, args)          \
  namespace balcony::cpu::DEFAULT { ret name args; } \
  namespace balcony::cpu::AVX2 { ret name args; }    \
  namespace balcony::cpu::AVX512 { ret name args; }
// The entry point of the capability in force, as a function pointer.
#define BALCONY_CPU_DISPATCH(name)                                                          \
  (::balcony::cpu::capability() >= ::balcony::cpu::Capability::AVX512 ? &::balcony::cpu::AVX512::name \
   : ::balcony::cpu::capability() == ::balcony::cpu::Capability::AVX2 ? &::balcony::cpu::AVX2::name   \
                                                                      : &::balcony::cpu::DEFAULT::name)
#else
#define BALCONY_CPU_KERNEL(ret, name, args) \
  namespace balcony::cpu::DEFAULT { ret name args; }
#define BALCONY_CPU_DISPATCH(name) (&::balcony::cpu::DEFAULT::name)
#endif

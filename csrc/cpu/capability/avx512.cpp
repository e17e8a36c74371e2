// The CPU kernels compiled for the AVX512 instruction set (see csrc/cpu/capability.h).
// System and shared headers come first so that their inline functions keep the baseline target;
// everything after the pragma lives in namespace balcony::cpu::AVX512.
#if defined(__x86_64__) || defined(_M_X64)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "balcony/dtypes.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")
#define BALCONY_CPU_CAPABILITY AVX512
#define BALCONY_VEC_WIDTH 16
// The AVX512-BF16 instructions may be compiled in; they run only under Capability::AVX512_BF16
// (see bf16_insn() in csrc/cpu/vec.h), which the CPU check grants only where the CPU has them.
#define BALCONY_CPU_BF16_INSN 1
#include "../kernels_all.h"
#endif

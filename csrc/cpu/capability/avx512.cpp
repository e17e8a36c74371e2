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

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#define BALCONY_CPU_CAPABILITY AVX512
#define BALCONY_VEC_WIDTH 16
#include "../kernels_all.h"
#endif

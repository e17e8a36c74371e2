// The CPU kernels compiled for the AVX2 instruction set (see csrc/cpu/capability.h).
// System and shared headers come first so that their inline functions keep the baseline target;
// everything after the pragma lives in namespace balcony::cpu::AVX2.
#if defined(__x86_64__) || defined(_M_X64)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "balcony/dtypes.h"

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define BALCONY_CPU_CAPABILITY AVX2
#define BALCONY_VEC_WIDTH 8
#include "../kernels_all.h"
#endif

// vec.h probes for the AVX2 instruction set (same pattern as csrc/cpu/capability/avx2.cpp).
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
#include "vec_probe.inc"
#endif

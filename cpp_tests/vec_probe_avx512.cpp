// vec.h probes for the AVX512 instruction set (same pattern as csrc/cpu/capability/avx512.cpp).
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
#include "vec_probe.inc"
#endif

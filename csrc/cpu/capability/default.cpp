// The CPU kernels compiled for the DEFAULT instruction set (see csrc/cpu/capability.h).
// System and shared headers come first so that their inline functions keep the baseline target;
// everything after the pragma lives in namespace balcony::cpu::DEFAULT.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "balcony/dtypes.h"


#define BALCONY_CPU_CAPABILITY DEFAULT
#define BALCONY_VEC_WIDTH 4
#include "../kernels_all.h"


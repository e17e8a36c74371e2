// vec.h probes for the DEFAULT instruction set (same pattern as csrc/cpu/capability/default.cpp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "balcony/dtypes.h"


#define BALCONY_CPU_CAPABILITY DEFAULT
#define BALCONY_VEC_WIDTH 4
#include "vec_probe.inc"


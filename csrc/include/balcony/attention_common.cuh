// Register packs shared by the attention-side CUDA kernels (rope_append, decode_attention).
#pragma once
#include "balcony/device.h"

namespace balcony::cuda {

// N elements of T in one register pack, aligned to its size up to 16 bytes (a 32-byte float pack
// is loaded as two 16-byte halves).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace balcony::cuda

// The register pack of the CUDA kernels and the one check of when a kernel may use it.
// Torch-free and CUDA-free (plain C++): included by the kernel headers (balcony/*.cuh), by the
// host-side launch choices (balcony/*_launch.h) and, through them, by the CPU execution harness.
#pragma once
#include <cstdint>
#include <initializer_list>

namespace balcony::cuda {

// The widest load/store a thread issues: 16 bytes.
constexpr int kPackBytes = 16;

// Elements of `elem_bytes` bytes in one 16-byte pack.
constexpr int64_t pack_elems(int64_t elem_bytes) { return kPackBytes / elem_bytes; }

// N elements of T in registers, aligned to their size up to 16 bytes. The default N fills one
// 16-byte pack (one vector access); N = 1 is the element-wise fallback of a vectorised kernel; a
// wider pack (e.g. 8 floats beside a 16-bit pack) is accessed as several 16-byte halves.
template <typename T, int N = kPackBytes / static_cast<int>(sizeof(T))>
struct alignas(sizeof(T) * N > kPackBytes ? kPackBytes : sizeof(T) * N) Pack {
  static constexpr int kElems = N;
  T v[N];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0; }

// Whether pack accesses are valid: every base pointer 16-byte aligned and every count (row
// strides, row lengths, in elements) a multiple of `pack` elements.
inline bool pack_aligned(int64_t pack, std::initializer_list<const void*> bases,
                         std::initializer_list<int64_t> counts) {
  for (const void* p : bases)
    if (!aligned16(p)) return false;
  for (const int64_t c : counts)
    if (c % pack != 0) return false;
  return true;
}

// The same for one tensor given by its base and `n` strides (elements).
inline bool pack_aligned(int64_t pack, const void* base, const int64_t* strides, int n) {
  if (!aligned16(base)) return false;
  for (int d = 0; d < n; ++d)
    if (strides[d] % pack != 0) return false;
  return true;
}

}  // namespace balcony::cuda

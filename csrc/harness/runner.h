// The harness runner's interface for kernel entries: one entry per kernel (or family), registered by
// name, reading its scalar parameters and buffers from a Case and calling the kernel's launcher.
//
//   BALCONY_HARNESS_ENTRY(rms_norm) {
//     return dispatch_float(c.str("dtype"), [&](auto tag) {
//       using T = decltype(tag);
//       return launch_rms_norm<T>(c.ptr<T>("x"), ...);
//     });
//   }
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "balcony/device.h"

namespace balcony_harness {

struct Buffer {
  std::vector<unsigned char> initial;  // contents given by the caller
  char* data = nullptr;                // its own heap block for each run, exactly `initial.size()` bytes
  bool output = false;
};

struct Case {
  std::map<std::string, std::string> params;
  std::map<std::string, Buffer> buffers;
  std::map<std::string, long long> reports;  // what the entry chose (report()), printed after the first seed
  std::vector<void*> scratch_blocks;         // scratch() allocations of the current run, freed after it

  bool has(const std::string& key) const { return params.count(key) != 0; }
  long long i(const std::string& key) const;
  long long i(const std::string& key, long long fallback) const { return has(key) ? i(key) : fallback; }
  double f(const std::string& key) const;
  const std::string& str(const std::string& key) const;
  // Pointer `offset` elements of T into buffer `name`; nullptr when the buffer was not given and `optional`.
  template <typename T>
  T* ptr(const std::string& name, long long offset = 0, bool optional = false) {
    char* base = raw(name, optional);
    return base ? reinterpret_cast<T*>(base) + offset : nullptr;
  }
  char* raw(const std::string& name, bool optional) const;
  // A launch choice the test can read back (Result.reports in python_tests/cuda_harness.py): the entry
  // reports what the op's shared host logic chose (split count, block shape, path, fallback).
  void report(const std::string& key, long long value) { reports[key] = value; }
  // Scratch the op allocates itself (sized by its host logic, not by the test): `count` elements of T,
  // their own heap block of exactly that size (so AddressSanitizer catches overruns), filled with 0xFF
  // bytes (NaN as float), freed after the run.
  template <typename T>
  T* scratch(size_t count) {
    return reinterpret_cast<T*>(scratch_raw(count * sizeof(T)));
  }
  char* scratch_raw(size_t bytes);
};

using Entry = cudaError_t (*)(Case&);
struct Registrar {
  Registrar(const char* name, Entry fn);
};

// Calls f(T{}) for the storage type named by `dtype` (float32, float16, bfloat16).
template <typename F>
cudaError_t dispatch_float(const std::string& dtype, F&& f) {
  if (dtype == "float32") return f(float{});
  if (dtype == "float16") return f(__half{});
  if (dtype == "bfloat16") return f(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

}  // namespace balcony_harness

#define BALCONY_HARNESS_ENTRY(name)                                                          \
  static cudaError_t balcony_harness_entry_##name(::balcony_harness::Case& c);              \
  static ::balcony_harness::Registrar balcony_harness_registrar_##name(#name,               \
                                                                       balcony_harness_entry_##name); \
  static cudaError_t balcony_harness_entry_##name(::balcony_harness::Case& c)

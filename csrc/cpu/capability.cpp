#include "capability.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace balcony::cpu {
namespace {

Capability detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? Capability::AVX512_BF16 : Capability::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Capability::AVX2;
#endif
  return Capability::DEFAULT;
}

Capability initial() {
  Capability best = detect();
  const char* env = std::getenv("BALCONY_CPU_CAPABILITY");
  if (env == nullptr || env[0] == '\0') return best;
  Capability wanted;
  if (!parse_capability(env, &wanted)) {
    std::fprintf(stderr, "balcony: ignoring BALCONY_CPU_CAPABILITY=%s (expected default, avx2, avx512 or avx512bf16)\n", env);
    return best;
  }
  if (static_cast<int>(wanted) > static_cast<int>(best)) {
    std::fprintf(stderr, "balcony: BALCONY_CPU_CAPABILITY=%s is not supported by this CPU; using %s\n", env,
                 capability_name(best));
    return best;
  }
  return wanted;
}

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(initial())};
  return value;
}

}  // namespace

Capability max_supported_capability() {
  static const Capability best = detect();
  return best;
}

Capability capability() { return static_cast<Capability>(current().load(std::memory_order_relaxed)); }

bool set_capability(Capability c) {
  if (static_cast<int>(c) > static_cast<int>(max_supported_capability())) return false;
  current().store(static_cast<int>(c), std::memory_order_relaxed);
  return true;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512_BF16: return "avx512bf16";
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

bool parse_capability(const char* name, Capability* out) {
  if (std::strcmp(name, "default") == 0) { *out = Capability::DEFAULT; return true; }
  if (std::strcmp(name, "avx2") == 0) { *out = Capability::AVX2; return true; }
  if (std::strcmp(name, "avx512") == 0) { *out = Capability::AVX512; return true; }
  if (std::strcmp(name, "avx512bf16") == 0) { *out = Capability::AVX512_BF16; return true; }
  return false;
}

}  // namespace balcony::cpu

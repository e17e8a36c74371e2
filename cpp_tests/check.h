// A minimal check macro for the C++ tests: counts failures, prints where, exits non-zero at the end.
#pragma once
#include <cstdio>

namespace balcony_test {
inline int& failures() {
  static int n = 0;
  return n;
}
inline int& checks() {
  static int n = 0;
  return n;
}
inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failed\n", name, checks(), failures());
  return failures() == 0 ? 0 : 1;
}
}  // namespace balcony_test

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++balcony_test::checks();                                              \
    if (!(cond)) {                                                         \
      ++balcony_test::failures();                                          \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
      std::printf(__VA_ARGS__);                                            \
      std::printf("\n");                                                   \
    }                                                                      \
  } while (0)

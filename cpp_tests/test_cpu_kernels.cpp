// C++ tests of the torch-free CPU code, for every instruction set this CPU supports:
// capability selection, vec.h math (exp, silu, bfloat16 rounding) and the RMSNorm kernel
// against double-precision scalar loops on odd sizes.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "balcony/dtypes.h"
#include "check.h"
#include "cpu/capability.h"

using balcony::bf16_t;
using balcony::ScalarKind;
using balcony::cpu::Capability;

BALCONY_CPU_KERNEL(void, probe_exp, (const float* x, float* y, int64_t n))
BALCONY_CPU_KERNEL(void, probe_silu, (const float* x, float* y, int64_t n))
BALCONY_CPU_KERNEL(void, probe_to_bf16, (const float* x, bf16_t* y, int64_t n))
BALCONY_CPU_KERNEL(int, probe_width, ())
BALCONY_CPU_KERNEL(void, rms_norm,
                   (ScalarKind kind, const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride,
                    void* residual, int64_t res_stride, int64_t hidden, float eps, int64_t begin, int64_t end))

namespace {

std::vector<Capability> supported() {
  std::vector<Capability> caps;
  for (int c = 0; c <= static_cast<int>(balcony::cpu::max_supported_capability()); ++c)
    caps.push_back(static_cast<Capability>(c));
  return caps;
}

void test_capability_selection() {
  Capability c;
  CHECK(balcony::cpu::parse_capability("avx2", &c) && c == Capability::AVX2, "parse avx2");
  CHECK(!balcony::cpu::parse_capability("sse9", &c), "unknown names are rejected");
  const Capability before = balcony::cpu::capability();
  CHECK(balcony::cpu::set_capability(Capability::DEFAULT), "the baseline is always available");
  CHECK(balcony::cpu::capability() == Capability::DEFAULT, "set_capability takes effect");
  if (balcony::cpu::max_supported_capability() < Capability::AVX512)
    CHECK(!balcony::cpu::set_capability(Capability::AVX512), "cannot select an instruction set the CPU lacks");
  if (balcony::cpu::max_supported_capability() < Capability::AVX512_BF16)
    CHECK(!balcony::cpu::set_capability(Capability::AVX512_BF16), "cannot select an instruction set the CPU lacks");
  balcony::cpu::set_capability(before);
}

void test_vec_math(Capability cap) {
  const char* name = balcony::cpu::capability_name(cap);
  const int expected_width[] = {4, 8, 16, 16};
  CHECK(BALCONY_CPU_DISPATCH(probe_width)() == expected_width[static_cast<int>(cap)], "%s vector width", name);
  for (int64_t n : {1, 3, 17, 31, 1001}) {
    std::vector<float> x(n), y(n), s(n);
    for (int64_t i = 0; i < n; ++i) x[i] = -87.0f + 175.0f * static_cast<float>(i) / static_cast<float>(n);
    BALCONY_CPU_DISPATCH(probe_exp)(x.data(), y.data(), n);
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      double want = std::exp(static_cast<double>(x[i]));
      worst = std::max(worst, std::fabs(y[i] - want) / want);
    }
    CHECK(worst < 5e-7, "%s exp relative error %.3g (n=%lld)", name, worst, static_cast<long long>(n));
    BALCONY_CPU_DISPATCH(probe_silu)(x.data(), s.data(), n);
    worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      double xd = x[i], want = xd / (1.0 + std::exp(-xd));
      worst = std::max(worst, std::fabs(s[i] - want) / std::max(1e-30, std::fabs(want)));
    }
    CHECK(worst < 2e-6, "%s silu relative error %.3g", name, worst);
  }
  // Limits: huge negative underflows to 0, -inf gives 0, large positive stays finite.
  std::vector<float> x = {-1000.f, -INFINITY, -87.5f, 0.f, 88.0f}, y(5);
  BALCONY_CPU_DISPATCH(probe_exp)(x.data(), y.data(), 5);
  CHECK(y[0] == 0.f && y[1] == 0.f && y[2] >= 0.f && y[3] == 1.f && std::isfinite(y[4]) && y[4] > 1e38f,
        "%s exp limits: %g %g %g %g %g", name, y[0], y[1], y[2], y[3], y[4]);
}

void test_bf16_rounding(Capability cap) {
  const char* name = balcony::cpu::capability_name(cap);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 100.f);
  const int64_t n = 777;
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  x[0] = NAN;
  x[1] = INFINITY;
  x[2] = 1.00390625f;  // exactly halfway between two bfloat16 values: rounds to even
  std::vector<bf16_t> y(n);
  BALCONY_CPU_DISPATCH(probe_to_bf16)(x.data(), y.data(), n);
  int mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    bf16_t want = balcony::float_to_bf16(x[i]);
    if (i == 0) {
      if (!std::isnan(balcony::bf16_to_float(y[i]))) ++mismatches;
    } else if (want.bits != y[i].bits) {
      ++mismatches;
    }
  }
  CHECK(mismatches == 0, "%s: %d bfloat16 conversions differ from the scalar rule", name, mismatches);
}

template <typename T>
void test_rms_norm_type(Capability cap, ScalarKind kind, double tol) {
  const char* name = balcony::cpu::capability_name(cap);
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.f, 2.f);
  for (int64_t hidden : {1, 3, 17, 127, 576, 769}) {
    const int64_t rows = 5, stride = hidden + 3;
    std::vector<T> x(rows * stride), w(hidden), out(rows * hidden), res(rows * hidden);
    for (auto& v : x) v = balcony::from_float<T>(dist(rng));
    for (auto& v : w) v = balcony::from_float<T>(dist(rng));
    for (auto& v : res) v = balcony::from_float<T>(dist(rng));
    std::vector<T> res_before = res;
    const float eps = 1e-5f;
    BALCONY_CPU_DISPATCH(rms_norm)(kind, x.data(), stride, w.data(), out.data(), hidden, nullptr, 0, hidden, eps, 0, rows);
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < hidden; ++i) ss += std::pow(balcony::to_float(x[r * stride + i]), 2.0);
      const double rstd = 1.0 / std::sqrt(ss / hidden + eps);
      for (int64_t i = 0; i < hidden; ++i) {
        double want = balcony::to_float(x[r * stride + i]) * rstd * balcony::to_float(w[i]);
        double got = balcony::to_float(out[r * hidden + i]);
        worst = std::max(worst, std::fabs(got - want) / (1.0 + std::fabs(want)));
      }
    }
    CHECK(worst < tol, "%s rms_norm hidden=%lld error %.3g", name, static_cast<long long>(hidden), worst);

    // Fused residual add: residual = x + residual; out = rmsnorm(residual).
    BALCONY_CPU_DISPATCH(rms_norm)(kind, x.data(), stride, w.data(), out.data(), hidden, res.data(), hidden, hidden, eps,
                                   0, rows);
    worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> sum(hidden);
      double ss = 0;
      for (int64_t i = 0; i < hidden; ++i) {
        T rounded = balcony::from_float<T>(balcony::to_float(x[r * stride + i]) + balcony::to_float(res_before[r * hidden + i]));
        sum[i] = balcony::to_float(rounded);
        worst = std::max(worst, std::fabs(sum[i] - balcony::to_float(res[r * hidden + i])));
        ss += sum[i] * sum[i];
      }
      const double rstd = 1.0 / std::sqrt(ss / hidden + eps);
      for (int64_t i = 0; i < hidden; ++i) {
        double want = sum[i] * rstd * balcony::to_float(w[i]);
        worst = std::max(worst, std::fabs(balcony::to_float(out[r * hidden + i]) - want) / (1.0 + std::fabs(want)));
      }
    }
    CHECK(worst < tol, "%s fused add rms_norm hidden=%lld error %.3g", name, static_cast<long long>(hidden), worst);
  }
}

}  // namespace

int main() {
  test_capability_selection();
  const Capability before = balcony::cpu::capability();
  for (Capability cap : supported()) {
    balcony::cpu::set_capability(cap);
    test_vec_math(cap);
    test_bf16_rounding(cap);
    test_rms_norm_type<float>(cap, ScalarKind::F32, 2e-5);
    test_rms_norm_type<bf16_t>(cap, ScalarKind::BF16, 1.6e-2);
  }
  balcony::cpu::set_capability(before);
  return balcony_test::finish("test_cpu_kernels");
}

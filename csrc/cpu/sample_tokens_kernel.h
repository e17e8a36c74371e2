// Next-token sampling (greedy / temperature / top-k / top-p), CPU (one capability; see
// csrc/cpu/capability.h). No sort: the top-k and top-p thresholds are found by bisection on the
// float bit pattern (monotone for non-negative floats) with count and mass reductions over the
// row, the same algorithm as the CUDA kernel (balcony/sample_tokens.cuh).
#pragma once
#include "vec.h"

namespace balcony::cpu::BALCONY_CPU_CAPABILITY {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Number of e[i] >= tau and their sum (e >= 0; the tail of a row loads -1 and never counts).
// NOTE: the mass is summed in float vectors over 32-vector blocks and the blocks in double: with
// plain float lanes a 49152-entry row drifted by ~1e-6 of its mass, more than one token's share,
// and the tokens picked differed from the float64 reference.
inline void count_mass_at_least(const float* e, int64_t vocab, float tau, int64_t* count, double* mass) {
  constexpr int W = kVecWidth;
  constexpr int64_t kBlock = 32 * W;
  const vfloat vt = vsplat(tau), zero = vsplat(0.f);
  vint cnt = vint{} + 0;
  double total = 0.0;
  int64_t i = 0;
  while (i + W <= vocab) {
    vfloat acc = zero;
    const int64_t stop = i + kBlock < vocab ? i + kBlock : vocab;
    for (; i + W <= stop; i += W) {
      const vfloat v = vload(e + i);
      const vint keep = v >= vt;  // all ones (-1) where kept
      cnt -= keep;
      acc += keep ? v : zero;
    }
    total += vsum(acc);
  }
  if (i < vocab) {
    const vfloat v = vload_partial(e + i, static_cast<int>(vocab - i), -1.f);
    const vint keep = v >= vt;
    cnt -= keep;
    total += vsum(keep ? v : zero);
  }
  int64_t c = 0;
  for (int l = 0; l < W; ++l) c += cnt[l];
  *count = c;
  *mass = total;
}

template <typename T>
inline int64_t greedy_row(const T* x, int64_t vocab) {
  constexpr int W = kVecWidth;
  vfloat mv = vsplat(-INFINITY);
  int64_t i = 0;
  for (; i + W <= vocab; i += W) mv = vmax(mv, vload(x + i));
  if (i < vocab) mv = vmax(mv, vload_partial(x + i, static_cast<int>(vocab - i), -INFINITY));
  const float m = vmaxall(mv);
  for (int64_t j = 0; j < vocab; ++j)
    if (to_float(x[j]) == m) return j;  // the lowest index among ties
  return 0;                             // a row of NaN
}

// Rows [begin, end) of logits (row stride `stride`). Parameters per row: temperature (<= 0:
// greedy), top_k (<= 0 or >= vocab: all), top_p (>= 1: all), uniform (clamped to [0, 1)).
// scratch: vocab floats owned by the calling thread.
template <typename T>
inline void sample_rows_t(const T* logits, int64_t stride, int64_t vocab, const float* temperature,
                          const int64_t* top_k, const float* top_p, const float* uniform, int64_t* out,
                          float* e, int64_t begin, int64_t end) {
  constexpr int W = kVecWidth;
  const uint32_t kInfBits = 0x7f800000u;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = logits + row * stride;
    const float temp = temperature[row];
    if (!(temp > 0.f)) {
      out[row] = greedy_row(x, vocab);
      continue;
    }
    // e = exp((x - max) / temperature): unnormalised probabilities in [0, 1], the maximum exactly 1.
    vfloat mv = vsplat(-INFINITY);
    int64_t i = 0;
    for (; i + W <= vocab; i += W) mv = vmax(mv, vload(x + i));
    if (i < vocab) mv = vmax(mv, vload_partial(x + i, static_cast<int>(vocab - i), -INFINITY));
    const vfloat vm = vsplat(vmaxall(mv)), vinv = vsplat(1.0f / temp);
    for (i = 0; i + W <= vocab; i += W) vstore(e + i, vexp((vload(x + i) - vm) * vinv));
    if (i < vocab) {
      const int n = static_cast<int>(vocab - i);
      vstore_partial(e + i, vexp((vload_partial(x + i, n, -INFINITY) - vm) * vinv), n);
    }
    uint32_t lo = 0;  // threshold bits; count(e >= 0) = vocab: always valid
    int64_t count;
    double kept_mass;
    count_mass_at_least(e, vocab, 0.f, &count, &kept_mass);
    // top-k: the largest tau with count(e >= tau) >= k (ties at the threshold are all kept).
    const int64_t k = top_k[row];
    if (k > 0 && k < vocab) {
      uint32_t hi = kInfBits;  // count(e >= inf) = 0: never valid
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        int64_t c;
        double m;
        count_mass_at_least(e, vocab, bits_to_float(mid), &c, &m);
        if (c >= k) lo = mid; else hi = mid;
      }
      count_mass_at_least(e, vocab, bits_to_float(lo), &count, &kept_mass);
    }
    // top-p: the largest tau with mass(e >= tau) >= top_p * (mass kept by top-k).
    const float p = top_p[row];
    if (p < 1.f) {
      const double target = static_cast<double>(p) * kept_mass;
      uint32_t hi = kInfBits;
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        int64_t c;
        double m;
        count_mass_at_least(e, vocab, bits_to_float(mid), &c, &m);
        if (c > 0 && m >= target) lo = mid; else hi = mid;
      }
      count_mass_at_least(e, vocab, bits_to_float(lo), &count, &kept_mass);
    }
    // Inverse CDF in vocabulary order over the kept entries (e >= tau).
    const float tau = bits_to_float(lo);
    float u = uniform[row];
    u = u >= 0.f ? (u < 1.f ? u : 0x1.fffffep-1f) : 0.f;  // clamp to [0, 1); NaN -> 0
    const double target = static_cast<double>(u) * kept_mass;
    const vfloat vt = vsplat(tau), zero = vsplat(0.f);
    double cum = 0.0;
    int64_t pick = -1, last = 0;
    for (i = 0; i < vocab && pick < 0; i += W) {
      const int n = static_cast<int>(vocab - i < W ? vocab - i : W);
      const vfloat v = n == W ? vload(e + i) : vload_partial(e + i, n, -1.f);
      const vint keep = v >= vt;
      const double block = vsum(keep ? v : zero);
      if (cum + block <= target) {
        cum += block;
        for (int l = 0; l < n; ++l)
          if (keep[l]) last = i + l;
        continue;
      }
      for (int l = 0; l < n; ++l) {  // the crossing is in this vector
        if (!keep[l]) continue;
        last = i + l;
        cum += v[l];
        if (cum > target) {
          pick = i + l;
          break;
        }
      }
    }
    out[row] = pick >= 0 ? pick : last;  // rounding left the target unreached: the last kept entry
  }
}

void sample_rows(ScalarKind kind, const void* logits, int64_t stride, int64_t vocab, const float* temperature,
                 const int64_t* top_k, const float* top_p, const float* uniform, int64_t* out, float* scratch,
                 int64_t begin, int64_t end) {
  if (kind == ScalarKind::BF16)
    sample_rows_t(static_cast<const bf16_t*>(logits), stride, vocab, temperature, top_k, top_p, uniform, out,
                  scratch, begin, end);
  else
    sample_rows_t(static_cast<const float*>(logits), stride, vocab, temperature, top_k, top_p, uniform, out,
                  scratch, begin, end);
}

}  // namespace balcony::cpu::BALCONY_CPU_CAPABILITY

// The harness's own tests: correct kernels, and deliberately broken ones the harness must catch
// (python_tests/test_cuda_harness_selfcheck.py). Each broken kernel is its correct twin with one
// typical GPU bug: a missing barrier, an off-by-one tail, a wrong shuffle mask, a shuffle reading
// outside its mask, lanes of one mask meeting in different primitives / masks / widths, a
// shared-memory overflow, a barrier in divergent code, a missing __syncwarp, a misaligned vector load.
#include <string>

#include "balcony/device.h"
#include "runner.h"

namespace {

using namespace balcony::cuda;

// ----- block reductions: two in a row through the same scratch, as kernels do -----
template <bool kFirstBarrier, bool kTrailingBarrier>
BALCONY_DEVICE float reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_reduce_sum(v);
  if (lane == 0) scratch[warp] = v;
  if constexpr (kFirstBarrier) __syncthreads();
  float total = lane < int(blockDim.x / kWarpSize) ? scratch[lane] : 0.f;
  total = warp_reduce_sum(total);
  if constexpr (kTrailingBarrier) __syncthreads();
  return total;
}

// Every warp w of block `row` writes the block totals it sees: out[2 * (row * warps + w)] = sum(in[row]),
// out[2 * (row * warps + w) + 1] = sum(in[row]^2). (Checking every warp's copy, not only warp 0's,
// makes the broken twins fail under every warp-greedy schedule: see the test.)
template <bool kFirstBarrier, bool kTrailingBarrier>
__global__ void row_sums_kernel(const float* __restrict__ in, float* __restrict__ out, int n) {
  BALCONY_SHARED(float, scratch, 32);
  const float* row = in + int64_t(blockIdx.x) * n;
  float s = 0.f, q = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s += row[i];
    q += row[i] * row[i];
  }
  s = reduce_sum<kFirstBarrier, kTrailingBarrier>(s, scratch);
  q = reduce_sum<kFirstBarrier, kTrailingBarrier>(q, scratch);
  if (threadIdx.x % kWarpSize == 0) {
    const int64_t at = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
    out[2 * at] = s;
    out[2 * at + 1] = q;
  }
}

// ----- vectorised loop with a scalar tail: out = 2 * in -----
enum Tail { kTailOk, kTailOneTooFar, kTailOneShort };
template <Tail kTail>
__global__ void scale_kernel(const float* __restrict__ in, float* __restrict__ out, int n) {
  const int packs = n / 4;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += gridDim.x * blockDim.x) {
    float4 v = reinterpret_cast<const float4*>(in)[i];
    reinterpret_cast<float4*>(out)[i] = make_float4(2 * v.x, 2 * v.y, 2 * v.z, 2 * v.w);
  }
  const int end = kTail == kTailOneTooFar ? n + 1 : (kTail == kTailOneShort ? n - 1 : n);
  for (int i = packs * 4 + blockIdx.x * blockDim.x + threadIdx.x; i < end; i += gridDim.x * blockDim.x)
    out[i] = 2 * in[i];
}

// ----- warp sums: out[warp] = sum of the warp's 32 values -----
enum Shfl { kShflOk, kShflMaskTooNarrow, kShflLanesAbsent };
template <Shfl kShfl>
__global__ void warp_sums_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  float v = in[t];
  if constexpr (kShfl == kShflOk) {
    v = warp_reduce_sum(v);
  } else if constexpr (kShfl == kShflMaskTooNarrow) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);  // names half the warp
  } else {
    v += __shfl_xor_sync(kFullMask, v, 16);
    if (lane < 16)  // the upper half has its answer already, but the full mask still names it
      for (int o = 8; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  }
  if (lane == 0) out[t / 32] = v;
}

// ----- half-warp sums: out[t / 16] = sum of the 16 values of the half-warp (masks 0x0000ffff, 0xffff0000) -----
template <bool kReadsOutsideMask>
__global__ void half_sums_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  float v = in[t];
  // The broken twin keeps the full-warp loop's first step: offset 16 reads a lane of the other half,
  // outside the mask (undefined on a GPU).
  for (int o = kReadsOutsideMask ? 16 : 8; o > 0; o >>= 1) v += __shfl_xor_sync(half, v, o);
  if (lane % 16 == 0) out[t / 16] = v;
}

// ----- lane-pair swap through a shuffle: out[t] = in[t ^ 1] -----
// The broken twins give the same values if run in lock-step, but break the rule that every lane a
// mask names calls the same primitive with the same mask and width (undefined on a GPU).
enum Pair { kPairOk, kPairMixedPrimitives, kPairMixedMasks, kPairMixedWidths };
template <Pair kPair>
__global__ void pair_shfl_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  const float v = in[t];
  float r;
  if constexpr (kPair == kPairOk) {
    r = __shfl_xor_sync(kFullMask, v, 1);
  } else if constexpr (kPair == kPairMixedPrimitives) {
    // even lanes take from above, odd lanes from below: two different primitives under one mask
    r = lane % 2 == 0 ? __shfl_down_sync(kFullMask, v, 1) : __shfl_up_sync(kFullMask, v, 1);
  } else if constexpr (kPair == kPairMixedMasks) {
    // half-warp masks built off by one: each half's mask names one lane of the other half
    r = __shfl_xor_sync(lane < 16 ? 0x0001ffffu : 0xffff8000u, v, 1);
  } else {
    // a width chosen per lane: the lower half says 16, the upper half 32
    r = __shfl_xor_sync(kFullMask, v, 1, lane < 16 ? 16 : 32);
  }
  out[t] = r;
}

// ----- block reverse through shared memory: out[b*n + i] = in[b*n + n-1-i] (n == blockDim.x) -----
enum Smem { kSmemOk, kSmemStaticOverflow, kSmemDynamicOverflow, kSmemDivergentBarrier };
template <Smem kSmem>
__global__ void reverse_kernel(const float* __restrict__ in, float* __restrict__ out) {
  BALCONY_SHARED(float, fixed, 64);
  BALCONY_DYNAMIC_SHARED(float, dyn);
  const int n = blockDim.x, i = threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * n;
  if constexpr (kSmem == kSmemStaticOverflow) {
    fixed[i + 1] = in[base + i];  // blockDim 64: the last thread writes fixed[64]
    __syncthreads();
    out[base + i] = fixed[n - i];
  } else {
    // dyn holds n floats; the overflow variant keeps one-based indices, so its last thread writes dyn[n].
    const int at = kSmem == kSmemDynamicOverflow ? i + 1 : i;
    dyn[at] = in[base + i];
    if constexpr (kSmem == kSmemDivergentBarrier) {
      if (i < n / 2) __syncthreads();  // only half the block gets here
    } else {
      __syncthreads();
    }
    out[base + i] = dyn[(kSmem == kSmemDynamicOverflow ? 1 : 0) + n - 1 - i];
  }
}

// ----- exchange between lane pairs through shared memory: out[t] = in[t ^ 1] -----
template <bool kSyncWarp>
__global__ void pair_swap_kernel(const float* __restrict__ in, float* __restrict__ out) {
  BALCONY_SHARED(float, s, 1024);
  const int i = threadIdx.x, t = blockIdx.x * blockDim.x + i;
  s[i] = in[t];
  if constexpr (kSyncWarp) __syncwarp();  // lanes of a warp are not in lock-step (Volta and later)
  out[t] = s[i ^ 1];
}

// ----- 16-byte loads: the misaligned variant starts one float in -----
template <int kOffset>
__global__ void pack_copy_kernel(const float* __restrict__ in, float* __restrict__ out, int packs) {
  for (int i = threadIdx.x; i < packs; i += blockDim.x)
    reinterpret_cast<float4*>(out)[i] = reinterpret_cast<const float4*>(in + kOffset)[i];
}

// ----- primitive semantics, compared with Python's model of CUDA -----
constexpr int kPrimOut = 12;
__global__ void primitives_kernel(int* __restrict__ out, int* __restrict__ counters) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + (int64_t(blockIdx.x) * blockDim.x + t) * kPrimOut;
  const int v = 1000 * int(blockIdx.x) + t;
  o[0] = __shfl_sync(kFullMask, v, 7);
  o[1] = __shfl_sync(kFullMask, v, lane + 3, 8);
  o[2] = __shfl_up_sync(kFullMask, v, 3, 16);
  o[3] = __shfl_down_sync(kFullMask, v, 5);
  o[4] = __shfl_xor_sync(kFullMask, v, 6, 8);
  o[5] = int(__ballot_sync(kFullMask, lane % 3 == 0));
  o[6] = __any_sync(kFullMask, t == 40);
  o[7] = __all_sync(kFullMask, lane < 31);
  o[8] = __syncthreads_count(t % 5 == 0);
  o[9] = __syncthreads_or(t == 3) + 2 * __syncthreads_and(t >= 0);
  atomicAdd(&counters[0], 1);
  atomicMax(&counters[1], v);
  // a spin-free CAS increment, as lock-free kernels write it
  int old = counters[2], seen;
  while ((seen = atomicCAS(&counters[2], old, old + 2)) != old) old = seen;
  o[10] = lane < 16 ? __shfl_down_sync(0x0000ffffu, v, 2, 16) : -1;
  o[11] = __half_as_ushort(__shfl_xor_sync(kFullMask, __float2half_rn(float(v)), 1));
}

// ----- conversions: float -> half / bf16 bits and back -----
__global__ void convert_kernel(const float* __restrict__ f, unsigned short* __restrict__ h,
                               unsigned short* __restrict__ b, const unsigned short* __restrict__ bits,
                               float* __restrict__ hf, float* __restrict__ bf, int n, int nbits) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    h[i] = __half_as_ushort(__float2half_rn(f[i]));
    b[i] = __bfloat16_as_ushort(__float2bfloat16_rn(f[i]));
  }
  if (i < nbits) {
    hf[i] = __half2float(__ushort_as_half(bits[i]));
    bf[i] = __bfloat162float(__ushort_as_bfloat16(bits[i]));
  }
}

}  // namespace

BALCONY_HARNESS_ENTRY(selfcheck) {
  const std::string k = c.str("case");
  const float* in = c.ptr<float>("in", 0, true);
  float* out = c.ptr<float>("out", 0, true);
  const int n = int(c.i("n", 0)), rows = int(c.i("rows", 1)), threads = int(c.i("threads", 64));
  const size_t dyn = size_t(threads) * sizeof(float);
#define LAUNCH(kernel, grid, block, smem, ...)                                  \
  do {                                                                         \
    BALCONY_LAUNCH(kernel, grid, block, smem, nullptr, __VA_ARGS__);           \
    return BALCONY_LAST_ERROR();                                               \
  } while (0)
  if (k == "row_sums") LAUNCH((row_sums_kernel<true, true>), rows, threads, 0, in, out, n);
  if (k == "row_sums_missing_barrier") LAUNCH((row_sums_kernel<false, true>), rows, threads, 0, in, out, n);
  if (k == "row_sums_missing_trailing_barrier") LAUNCH((row_sums_kernel<true, false>), rows, threads, 0, in, out, n);
  const int grid = ceil_div(n / 4 > 0 ? n / 4 : 1, threads);
  if (k == "scale") LAUNCH(scale_kernel<kTailOk>, grid, threads, 0, in, out, n);
  if (k == "scale_tail_one_too_far") LAUNCH(scale_kernel<kTailOneTooFar>, grid, threads, 0, in, out, n);
  if (k == "scale_tail_one_short") LAUNCH(scale_kernel<kTailOneShort>, grid, threads, 0, in, out, n);
  if (k == "warp_sums") LAUNCH(warp_sums_kernel<kShflOk>, rows, threads, 0, in, out);
  if (k == "warp_sums_mask_too_narrow") LAUNCH(warp_sums_kernel<kShflMaskTooNarrow>, rows, threads, 0, in, out);
  if (k == "warp_sums_lanes_absent") LAUNCH(warp_sums_kernel<kShflLanesAbsent>, rows, threads, 0, in, out);
  if (k == "half_sums") LAUNCH(half_sums_kernel<false>, rows, threads, 0, in, out);
  if (k == "half_sums_reads_outside_mask") LAUNCH(half_sums_kernel<true>, rows, threads, 0, in, out);
  if (k == "pair_shfl") LAUNCH(pair_shfl_kernel<kPairOk>, rows, threads, 0, in, out);
  if (k == "pair_shfl_mixed_primitives") LAUNCH(pair_shfl_kernel<kPairMixedPrimitives>, rows, threads, 0, in, out);
  if (k == "pair_shfl_mixed_masks") LAUNCH(pair_shfl_kernel<kPairMixedMasks>, rows, threads, 0, in, out);
  if (k == "pair_shfl_mixed_widths") LAUNCH(pair_shfl_kernel<kPairMixedWidths>, rows, threads, 0, in, out);
  if (k == "reverse") LAUNCH(reverse_kernel<kSmemOk>, rows, threads, dyn, in, out);
  if (k == "reverse_static_overflow") LAUNCH(reverse_kernel<kSmemStaticOverflow>, rows, threads, dyn, in, out);
  if (k == "reverse_dynamic_overflow") LAUNCH(reverse_kernel<kSmemDynamicOverflow>, rows, threads, dyn, in, out);
  if (k == "reverse_divergent_barrier") LAUNCH(reverse_kernel<kSmemDivergentBarrier>, rows, threads, dyn, in, out);
  if (k == "pair_swap") LAUNCH(pair_swap_kernel<true>, rows, threads, 0, in, out);
  if (k == "pair_swap_missing_syncwarp") LAUNCH(pair_swap_kernel<false>, rows, threads, 0, in, out);
  if (k == "pack_copy") LAUNCH(pack_copy_kernel<0>, 1, threads, 0, in, out, n / 4 - 1);
  if (k == "pack_copy_misaligned") LAUNCH(pack_copy_kernel<1>, 1, threads, 0, in, out, n / 4 - 1);
  if (k == "primitives") LAUNCH(primitives_kernel, rows, threads, 0, c.ptr<int>("iout"), c.ptr<int>("counters"));
  if (k == "convert")
    LAUNCH(convert_kernel, ceil_div(n > int(c.i("nbits")) ? n : c.i("nbits"), 256), 256, 0, in,
           c.ptr<unsigned short>("h"), c.ptr<unsigned short>("b"), c.ptr<unsigned short>("bits"), c.ptr<float>("hf"),
           c.ptr<float>("bf"), n, int(c.i("nbits")));
  if (k == "row_sums_launch_too_big") LAUNCH((row_sums_kernel<true, true>), 1, 2048, 0, in, out, n);
  if (k == "reverse_smem_over_limit") LAUNCH(reverse_kernel<kSmemOk>, rows, threads, size_t(64) * 1024, in, out);
#undef LAUNCH
  fprintf(stderr, "selfcheck: unknown case '%s'\n", k.c_str());
  return cudaErrorInvalidValue;
}

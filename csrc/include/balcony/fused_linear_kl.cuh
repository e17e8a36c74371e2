// Row kernel of the fused linear + KL(p_teacher || p_student) loss, CUDA (torch-free).
// One block per row. Pass 1 reads both rows once with an online (running-max) log-sum-exp per
// thread, merged across the block; pass 2 overwrites the student logits with the gradient.
// 16-byte vector loads when the rows allow; float32 math.
#pragma once
#include "balcony/device.h"
#include "balcony/pack.h"

namespace balcony::cuda {

// Running statistics of one thread: max and sum of exp(x - max) for the student and the
// teacher, and a = sum exp(t - max_t) * (t - s).
struct KlStats {
  float ms, zs, mt, zt, a;
};

BALCONY_DEVICE void kl_update(KlStats& st, float sv, float tv) {
  if (sv > st.ms) {
    st.zs = st.zs * expf(st.ms - sv) + 1.f;
    st.ms = sv;
  } else {
    st.zs += expf(sv - st.ms);
  }
  if (tv > st.mt) {
    const float scale = expf(st.mt - tv);
    st.zt = st.zt * scale + 1.f;
    st.a = st.a * scale + (tv - sv);
    st.mt = tv;
  } else if (tv > -INFINITY) {  // a -inf teacher logit has probability 0 and adds nothing
    const float e = expf(tv - st.mt);
    st.zt += e;
    st.a += e > 0.f ? e * (tv - sv) : 0.f;
  }
}

// loss[row] = KL(softmax(t) || softmax(s)); when compute_grad, s[row] = grad_scale * (softmax(s) - softmax(t)).
// VEC: both rows 16-byte aligned, strides and vocab multiples of Pack<T>::kElems.
template <typename T, bool VEC>
__global__ void fused_kl_kernel(T* s, int64_t s_stride, const T* __restrict__ t, int64_t t_stride, int vocab,
                                float* __restrict__ loss, float grad_scale, bool compute_grad) {
  BALCONY_SHARED(float, scratch, 32);
  const int64_t row = blockIdx.x;
  T* sr = s + row * s_stride;
  const T* tr = t + row * t_stride;
  using P = Pack<T>;
  KlStats st{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
  if constexpr (VEC) {
    const int n = vocab / P::kElems;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const P a = reinterpret_cast<const P*>(sr)[i];
      const P b = reinterpret_cast<const P*>(tr)[i];
#pragma unroll
      for (int j = 0; j < P::kElems; ++j) kl_update(st, to_float(a.v[j]), to_float(b.v[j]));
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) kl_update(st, to_float(sr[i]), to_float(tr[i]));
  }
  // Merge across the block: rescale each thread's sums to the block maxima.
  const float ms = block_reduce_max(st.ms, scratch);
  const float mt = block_reduce_max(st.mt, scratch);
  const float fs = st.ms > -INFINITY ? expf(st.ms - ms) : 0.f;
  const float ft = st.mt > -INFINITY ? expf(st.mt - mt) : 0.f;
  const float zs = block_reduce_sum(st.zs * fs, scratch);
  const float zt = block_reduce_sum(st.zt * ft, scratch);
  const float a = block_reduce_sum(st.a * ft, scratch);
  if (threadIdx.x == 0) loss[row] = a / zt + (ms - mt) + logf(zs) - logf(zt);
  if (!compute_grad) return;
  const float cs = grad_scale / zs, ct = grad_scale / zt;
  if constexpr (VEC) {
    const int n = vocab / P::kElems;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      P a = reinterpret_cast<const P*>(sr)[i];
      const P b = reinterpret_cast<const P*>(tr)[i];
#pragma unroll
      for (int j = 0; j < P::kElems; ++j)
        a.v[j] = from_float<T>(expf(to_float(a.v[j]) - ms) * cs - expf(to_float(b.v[j]) - mt) * ct);
      reinterpret_cast<P*>(sr)[i] = a;
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
      sr[i] = from_float<T>(expf(to_float(sr[i]) - ms) * cs - expf(to_float(tr[i]) - mt) * ct);
  }
}

template <typename T>
cudaError_t launch_fused_kl(T* s, int64_t s_stride, const T* t, int64_t t_stride, int64_t rows, int vocab,
                            float* loss, float grad_scale, bool compute_grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int N = Pack<T>::kElems;
  const bool vec = pack_aligned(N, {s, t}, {vocab, s_stride, t_stride});
  // NOTE: at most 512 threads so that several rows share an SM; a 49152-wide bf16 row is then
  // 12 packs of 8 per thread.
  const int items = vec ? vocab / N : ceil_div(vocab, 4);
  int threads = ((items + kWarpSize - 1) / kWarpSize) * kWarpSize;
  threads = threads < 64 ? 64 : (threads > 512 ? 512 : threads);
  const dim3 grid(static_cast<unsigned>(rows)), block(threads);
  if (vec)
    BALCONY_LAUNCH((fused_kl_kernel<T, true>), grid, block, 0, stream, s, s_stride, t, t_stride, vocab, loss,
                   grad_scale, compute_grad);
  else
    BALCONY_LAUNCH((fused_kl_kernel<T, false>), grid, block, 0, stream, s, s_stride, t, t_stride, vocab, loss,
                   grad_scale, compute_grad);
  return BALCONY_LAST_ERROR();
}

}  // namespace balcony::cuda

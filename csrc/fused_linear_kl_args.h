// Argument checks of fused_linear_kl, shared by the CPU and CUDA entry points: shapes, devices,
// dtypes, the reduction, and the token chunk the chunked loop (fused_linear_kl_chunked.h) runs.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "torch_utils.h"

namespace balcony {

struct KlArgs {
  int64_t n, h, v, chunk;
  bool mean;
};

inline KlArgs check_fused_linear_kl_args(const at::Tensor& student, const at::Tensor& weight,
                                         const at::Tensor& teacher, bool teacher_is_logits,
                                         const std::string& reduction, int64_t chunk_size) {
  BALCONY_CHECK_SAME_DEVICE(student, weight);
  BALCONY_CHECK_SAME_DEVICE(student, teacher);
  BALCONY_CHECK_DIM(student, 2);
  BALCONY_CHECK_DIM(weight, 2);
  BALCONY_CHECK_DIM(teacher, 2);
  BALCONY_CHECK_SAME_DTYPE(student, weight);
  BALCONY_CHECK_SAME_DTYPE(student, teacher);
  const int64_t n = student.size(0), h = student.size(1), v = weight.size(0);
  TORCH_CHECK(weight.size(1) == h, "fused_linear_kl: weight must be [V, H] with H = student's hidden size ", h,
              ", got weight of shape ", weight.sizes());
  if (teacher_is_logits) {
    TORCH_CHECK(teacher.size(0) == n && teacher.size(1) == v, "fused_linear_kl: teacher logits must be [N, V] = [",
                n, ", ", v, "], got ", teacher.sizes());
  } else {
    TORCH_CHECK(teacher.size(0) == n && teacher.size(1) == h,
                "fused_linear_kl: teacher hidden states must be [N, H] = [", n, ", ", h, "], got ", teacher.sizes());
  }
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "fused_linear_kl: reduction must be \"mean\" or \"sum\", got \"",
              reduction, "\"");
  TORCH_CHECK(chunk_size >= 0, "fused_linear_kl: chunk_size must be >= 0 (0 = choose), got ", chunk_size);
  int64_t chunk = chunk_size;
  if (chunk == 0) {
    // A chunk's logits (student, plus teacher when computed here) about 256 MB in float32, in
    // multiples of 64 rows.
    // NOTE: measured on 2 Zen 5 cores, N=4096 V=49152 H=576 float32, forward + gradient: 85-row
    // chunks (32 MB) 6.5 s, 256 rows 4.8 s, 512 rows 4.5 s, 1024 rows 4.0 s; the naive
    // full-logits loss 7.7 s. Narrow GEMMs run at ~110 GFLOP/s against ~165 for wide ones, so
    // the chunk trades memory (still several times below the naive loss) for GEMM efficiency.
    const int64_t per_row = v * 4 * (teacher_is_logits ? 1 : 2);
    chunk = std::max<int64_t>(1, (int64_t{256} << 20) / std::max<int64_t>(1, per_row));
    if (chunk > 64) chunk -= chunk % 64;
  }
  chunk = std::min<int64_t>(chunk, std::max<int64_t>(1, n));
  return KlArgs{n, h, v, chunk, reduction == "mean"};
}

}  // namespace balcony

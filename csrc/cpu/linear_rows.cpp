// torch.ops.balcony.linear_rows on the CPU: x [M, K] float32 times a weight [N, K] read once (float32,
// bfloat16, Q8 / Q4 / Q4_1 blocks), for the few rows of a decode step; the kernel is
// linear_rows_kernel.h (one per CPU capability). linear_into is what the native decode step calls.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../torch_utils.h"
#include "capability.h"
#include "kernels.h"
#include "cpu_ops.h"
#include "linear_rows.h"


namespace balcony {

// A linear weight: float32 [N, K], bfloat16 [N, K], Q8 blocks as uint8 [N, K + K/16], Q4 blocks as int8
// [N, K/2 + K/16] or Q4_1 blocks as int16 [N, (K/2 + K/8) / 2] (balcony/dtypes.h).
ScalarKind weight_kind(const at::Tensor& w, const char* what) {
  if (w.scalar_type() == at::kByte) return ScalarKind::Q8;
  if (w.scalar_type() == at::kChar) return ScalarKind::Q4;
  if (w.scalar_type() == at::kShort) return ScalarKind::Q4_1;
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, what,
              ": weight must be float32, bfloat16, Q8 blocks (uint8), Q4 blocks (int8) or Q4_1 blocks (int16), got ",
              w.scalar_type());
  return w.scalar_type() == at::kFloat ? ScalarKind::F32 : ScalarKind::BF16;
}

namespace {

// Bytes of one block of 32 columns in a Q8, Q4 or Q4_1 row (0 for float weights).
int64_t block_bytes(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::Q8: return q8_row_bytes(kQ8Block);
    case ScalarKind::Q4: return q4_row_bytes(kQ8Block);
    case ScalarKind::Q4_1: return q4_1_row_bytes(kQ8Block);
    default: return 0;
  }
}

const char* block_name(ScalarKind kind) {
  return kind == ScalarKind::Q8 ? "Q8" : kind == ScalarKind::Q4 ? "Q4" : "Q4_1";
}

}  // namespace

// The weight's K (columns of x it multiplies); a row of K columns takes K + K/16 bytes in Q8, K/2 + K/16 in
// Q4, K/2 + K/8 in Q4_1.
int64_t weight_cols(const at::Tensor& w, const char* what) {
  const auto kind = weight_kind(w, what);
  const int64_t per_block = block_bytes(kind);
  if (per_block == 0) return w.size(1);
  const int64_t bytes = w.size(1) * static_cast<int64_t>(w.element_size());
  TORCH_CHECK(bytes % per_block == 0, what, ": a ", block_name(kind), " weight row holds whole blocks of ", kQ8Block,
              " columns (", per_block, " bytes each), got ", bytes, " bytes");
  return bytes / per_block * kQ8Block;
}

namespace {

void check_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                  const char* what) {
  BALCONY_CHECK_DEVICE(x, at::kCPU);
  BALCONY_CHECK_DEVICE(w, at::kCPU);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, what, ": x [M,K], weight [N,K] and out [M,N] must be "
              "2-D, got ", x.sizes(), ", ", w.sizes(), ", ", out.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, what,
              ": x and out must be float32, got ", x.scalar_type(), " and ", out.scalar_type());
  const int64_t K = weight_cols(w, what);
  TORCH_CHECK(w.is_contiguous(), what, ": weight must be contiguous");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, what, ": x and out need unit stride in the last dimension");
  TORCH_CHECK(x.size(1) == K, what, ": x has K = ", x.size(1), " columns but weight has ", K);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == w.size(0), what, ": out must be [", x.size(0), ", ",
              w.size(0), "], got ", out.sizes());
  if (bias.numel()) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == w.size(0) &&
                    bias.is_contiguous(),
                what, ": bias must be a contiguous float32 [", w.size(0), "], got ", bias.scalar_type(), " ",
                bias.sizes());
  }
}

}  // namespace

void linear_into(const float* x, int64_t x_stride, int64_t M, const at::Tensor& w, const float* bias, float* out,
                 int64_t out_stride, bool accumulate) {
  const int64_t N = w.size(0), K = weight_cols(w, "weight");
  const auto kind = weight_kind(w, "weight");
  auto kernel = BALCONY_CPU_DISPATCH(linear_rows);
  const void* wp = w.data_ptr();
  // blocks of 16 rows; enough blocks per task to amortise the hand-off
  const int64_t blocks = (N + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, blocks / (4 * at::get_num_threads())));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    kernel(kind, x, x_stride, M, wp, K, bias, out, out_stride, accumulate, b0 * 16, std::min(N, b1 * 16));
  });
}

namespace {

void linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     at::Tensor& out, bool accumulate) {
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  check_linear(x, weight, b.defined() ? b : at::empty({0}, x.options()), out, "linear_rows");
  if (x.size(0) == 0 || weight.size(0) == 0) return;
  linear_into(x.data_ptr<float>(), x.stride(0), x.size(0), weight, b.defined() && b.numel() ? b.data_ptr<float>() : nullptr,
              out.data_ptr<float>(), out.stride(0), accumulate);
}

}  // namespace

TORCH_LIBRARY_IMPL(balcony, CPU, m) { m.impl("linear_rows", &linear_rows_cpu); }

}  // namespace balcony

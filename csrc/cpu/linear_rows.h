// The small-batch linear map of decode steps (torch.ops.balcony.linear_rows) as the other CPU ops call it:
// a weight tensor in any of its formats (float32, bfloat16, Q8 / Q4 / Q4_1 blocks, balcony/dtypes.h) and
// float32 rows of x.
#pragma once

#include <ATen/ATen.h>

#include "balcony/dtypes.h"

namespace balcony {

// The format of a linear weight tensor (raises for another dtype).
ScalarKind weight_kind(const at::Tensor& w, const char* what);

// The weight's K (columns of x it multiplies), whatever its format.
int64_t weight_cols(const at::Tensor& w, const char* what);

// out[:, :] (+)= x @ w^T (+ bias) for M rows of x, split over the weight's rows across threads.
void linear_into(const float* x, int64_t x_stride, int64_t M, const at::Tensor& w, const float* bias, float* out,
                 int64_t out_stride, bool accumulate);

}  // namespace balcony

// Every CPU kernel header, included once per capability translation unit. One line per op.
#pragma once
#include "vec.h"
#include "rms_norm_kernel.h"
#include "silu_and_mul_kernel.h"
#include "fused_linear_kl_kernel.h"
#include "sample_tokens_kernel.h"
#include "rope_append_kernel.h"
#include "decode_attention_kernel.h"
#include "linear_rows_kernel.h"

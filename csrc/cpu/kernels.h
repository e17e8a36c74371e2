// Every CPU kernel entry point, declared once in each capability namespace (capability.h): the
// definitions are the op kernel headers (<op>_kernel.h), compiled once per capability by
// capability/<isa>.cpp; the op files call them through BALCONY_CPU_DISPATCH.
#pragma once

#include <cstdint>

#include "attention_args.h"
#include "balcony/dtypes.h"
#include "capability.h"

BALCONY_CPU_KERNEL(void, linear_rows,
                   (balcony::ScalarKind wkind, const float* x, int64_t x_stride, int64_t M, const void* w, int64_t K,
                    const float* bias, float* out, int64_t out_stride, bool accumulate, int64_t n_begin,
                    int64_t n_end))
BALCONY_CPU_KERNEL(void, rms_norm,
                   (balcony::ScalarKind kind, const void* x, int64_t x_stride, const void* w, void* out,
                    int64_t out_stride, void* residual, int64_t res_stride, int64_t hidden, float eps, int64_t begin,
                    int64_t end))
BALCONY_CPU_KERNEL(void, rms_norm_backward,
                   (balcony::ScalarKind kind, const void* g, int64_t g_stride, const void* x, int64_t x_stride,
                    const void* w, void* grad_x, int64_t gx_stride, float* grad_w_acc, int64_t hidden, float eps,
                    int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, sum_partials,
                   (balcony::ScalarKind kind, const float* acc, int64_t parts, int64_t hidden, void* out))
BALCONY_CPU_KERNEL(void, silu_and_mul,
                   (balcony::ScalarKind kind, const void* in, int64_t in_stride, void* out, int64_t out_stride,
                    int64_t inter, int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, silu_and_mul_backward,
                   (balcony::ScalarKind kind, const void* grad, int64_t grad_stride, const void* in,
                    int64_t in_stride, void* grad_in, int64_t gi_stride, int64_t inter, int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, rope_append,
                   (balcony::ScalarKind kind, const balcony::cpu::RopeAppendArgs& args, int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, decode_attention_split,
                   (balcony::ScalarKind kind, const balcony::cpu::DecodeAttentionArgs& args, float* scratch,
                    int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, decode_attention_merge,
                   (balcony::ScalarKind kind, const balcony::cpu::DecodeAttentionArgs& args, int64_t begin,
                    int64_t end))
BALCONY_CPU_KERNEL(void, sample_rows,
                   (balcony::ScalarKind kind, const void* logits, int64_t stride, int64_t vocab,
                    const float* temperature, const int64_t* top_k, const float* top_p, const float* uniform,
                    int64_t* out, float* scratch, int64_t begin, int64_t end))
BALCONY_CPU_KERNEL(void, fused_kl_rows,
                   (balcony::ScalarKind kind, void* s, int64_t s_stride, const void* t, int64_t t_stride,
                    int64_t vocab, float* loss, float grad_scale, bool compute_grad, float* scratch, int64_t begin,
                    int64_t end))

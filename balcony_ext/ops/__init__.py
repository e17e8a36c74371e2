"""Python entry points of the native ops (torch.ops.balcony.*), with fake kernels for
torch.compile and autograd for the ops used in training. Each op lives in its own module,
beside its plain-PyTorch reference (`reference_<op>`), which is the op's specification.

Who calls what: the engine (engine.py) runs rms_norm, fused_add_rms_norm, rope_append,
decode_attention, silu_and_mul, linear_rows and sample_tokens (composed on devices without the
native step; inside decode_step on the CPU); training runs fused_linear_kl (forward and backward).
Library-only ops: rms_norm_backward and silu_and_mul_backward (torch.ops.balcony.*, CPU and CUDA)
are the backward kernels of the autograd registered for rms_norm and silu_and_mul, for users who
build their own modules from these ops and train through them; each is tested against its
reference (reference_rms_norm_backward, and autograd of reference_silu_and_mul). Nothing in the
package runs them: the engine calls rms_norm and silu_and_mul only at inference, without autograd,
and the package's own training (bx.train) differentiates the loss through fused_linear_kl's
backward (its fused gradient of the student hidden state) and, below that, through PyTorch's
autograd of the balcony layer's own modules (the base's decoder-layer class and its RMSNorm)."""

from .decode_step import decode_step, decode_step_workspace
from .decode_attention import decode_attention, reference_decode_attention
from .linear_rows import (dequantize_q4, dequantize_q4_1, dequantize_q8, is_blocks, linear_rows, quantize_q4,
                          quantize_q4_1, quantize_q8, reference_linear_rows, weight_matrix)
from .fused_linear_kl import fused_linear_kl, reference_fused_linear_kl
from .rms_norm import fused_add_rms_norm, reference_fused_add_rms_norm, reference_rms_norm, rms_norm
from .rope_append import reference_rope_append, rope_append, rope_tables
from .sample_tokens import reference_sample_tokens, sample_tokens
from .silu_and_mul import reference_silu_and_mul, silu_and_mul

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "reference_rms_norm",
    "reference_fused_add_rms_norm",
    "rope_append",
    "rope_tables",
    "reference_rope_append",
    "decode_attention",
    "reference_decode_attention",
    "decode_step",
    "decode_step_workspace",
    "silu_and_mul",
    "reference_silu_and_mul",
    "fused_linear_kl",
    "reference_fused_linear_kl",
    "sample_tokens",
    "linear_rows",
    "quantize_q8",
    "dequantize_q8",
    "quantize_q4",
    "dequantize_q4",
    "quantize_q4_1",
    "dequantize_q4_1",
    "is_blocks",
    "weight_matrix",
    "reference_linear_rows",
    "reference_sample_tokens",
]

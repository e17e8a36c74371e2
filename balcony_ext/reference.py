"""Plain-PyTorch references of every native op: the specification and the test oracle."""

from .ops.decode_attention import reference_decode_attention
from .ops.fused_linear_kl import reference_fused_linear_kl
from .ops.rms_norm import reference_fused_add_rms_norm, reference_rms_norm, reference_rms_norm_backward
from .ops.rope_append import reference_rope_append
from .ops.sample_tokens import reference_sample_tokens
from .ops.silu_and_mul import reference_silu_and_mul

__all__ = [
    "reference_rms_norm",
    "reference_rms_norm_backward",
    "reference_fused_add_rms_norm",
    "reference_rope_append",
    "reference_decode_attention",
    "reference_silu_and_mul",
    "reference_fused_linear_kl",
    "reference_sample_tokens",
]

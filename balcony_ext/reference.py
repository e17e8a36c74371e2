"""Plain-PyTorch references of every native op: the specification and the test oracle."""

from .ops.fused_linear_kl import reference_fused_linear_kl
from .ops.sample_tokens import reference_sample_tokens
from .ops.rms_norm import reference_fused_add_rms_norm, reference_rms_norm, reference_rms_norm_backward
from .ops.silu_and_mul import reference_silu_and_mul

__all__ = [
    "reference_sample_tokens",
    "reference_fused_linear_kl",
    "reference_rms_norm",
    "reference_rms_norm_backward",
    "reference_fused_add_rms_norm",
    "reference_silu_and_mul",
]

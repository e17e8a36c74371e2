"""Plain-PyTorch references of every native op: the specification and the test oracle."""

from .ops.decode_attention import reference_decode_attention
from .ops.rms_norm import reference_fused_add_rms_norm, reference_rms_norm, reference_rms_norm_backward
from .ops.rope_append import reference_rope_append

__all__ = [
    "reference_rms_norm",
    "reference_rms_norm_backward",
    "reference_fused_add_rms_norm",
    "reference_rope_append",
    "reference_decode_attention",
]

"""Python entry points of the native ops (torch.ops.balcony.*), with fake kernels for
torch.compile and autograd for the ops used in training. Each op lives in its own module,
beside its plain-PyTorch reference (`reference_<op>`), which is the op's specification."""

from .fused_linear_kl import fused_linear_kl, reference_fused_linear_kl
from .sample_tokens import reference_sample_tokens, sample_tokens
from .rms_norm import fused_add_rms_norm, reference_fused_add_rms_norm, reference_rms_norm, rms_norm
from .silu_and_mul import reference_silu_and_mul, silu_and_mul

__all__ = [
    "sample_tokens",
    "reference_sample_tokens",
    "fused_linear_kl",
    "reference_fused_linear_kl",
    "rms_norm",
    "fused_add_rms_norm",
    "reference_rms_norm",
    "reference_fused_add_rms_norm",
    "silu_and_mul",
    "reference_silu_and_mul",
]

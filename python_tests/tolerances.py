"""How op outputs are compared with their references, in one place.

Every kernel computes in float32 like the plain-PyTorch references, which round their result once to
the output dtype. So the error budget is (a) the order of float32 sums and the last bits of exp, rsqrt
and the like, and (b) for a 16-bit output, its rounding.

float32: atol = rtol = 1e-5, times `scale` (unchanged). Float32 arithmetic differs by ~1e-7 relative
per operation; 1e-5 (about 80 float32 ulps) leaves room for reordering: the tests need at most 0.17 of
it. `scale` widens it for a float32 reduction whose reordering error grows with its length (the call
says why). It does not apply to the 16-bit dtypes below.

bfloat16 / float16: in units of u, the dtype's unit roundoff: 2^-8 for bfloat16 (8 significant bits
with the implicit one) and 2^-11 for float16 (11 bits). Rounding to nearest errs by at most u|x|, and
the spacing of the dtype next to x (one ulp) lies between u|x| and 2u|x|.
  rtol = K_REL * u with K_REL = 2: the kernel and the reference round float32 values that differ only
      by float32 noise (~1e-6 relative, far below u), so the results are equal or one ulp apart, and
      one ulp is at most 2u|expected|.
  atol = K_ABS * u * magnitude with K_ABS = 1, magnitude = max|expected| by default: half an ulp of
      the tensor's largest element. An element far below the largest one may be a sum of larger
      terms (attention's weighted average of V rows, RMSNorm's backward, a softmax difference), whose
      float32 and intermediate roundings are of the size of the terms, not of the element; the
      tensor's scale bounds them. Pass `magnitude` (the terms' scale) where the whole output is such
      a cancellation, e.g. RMSNorm's grad_x at hidden size 1, which is exactly 0 up to eps.
  Measured, the K_ABS each op needs with K_REL = 2 (CPU kernels under every CPU capability, the tests'
  shapes with 20 seeds; the CUDA kernels' source under the execution harness, every seed, bf16 and
  fp16): 0 for rms_norm (forward, fused add, backward), silu_and_mul (both ways), rope_append and the
  fused KL row kernel's gradient, which are all within one ulp of the reference; 0.39 for decode
  attention in bf16 on the CPU (up to ~2 ulps on elements above 1/16 of the maximum), 0 under the
  harness. K_ABS = 1 leaves that a margin of 2.5.
  What this rejects (test_tolerances.py, on the real ops' bf16 outputs): a relative error of 2^-5 (8u)
  on the tensor or on its largest element alone; +0.01 and +0.02 on decode attention's outputs (median
  0.19), which the old bf16 bound (atol = rtol = 1.6e-2) let through at 0.01; a zeroed row; and bugs
  such as a dropped cache entry, a rotary position off by one or a softmax scale off by 2^-5.
  `scale` does not apply: float32 reordering is orders of magnitude below u. A 16-bit output that is
  wholly a cancellation passes its terms' scale as `magnitude` instead.

A result that is not a one-rounding function of float32 values (the fused KL loss, whose logits are
rounded to the dtype by design) is compared in norm with `assert_norm_close` and an explicit budget.
"""

import torch

FLOAT32_TOL = 1e-5
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
K_REL = 2.0
K_ABS = 1.0


def unit_roundoff(dtype):
    """u of a 16-bit dtype: half the spacing of its values in [1, 2)."""
    return UNIT_ROUNDOFF[dtype]


def tol(dtype, scale=1.0, magnitude=None):
    """torch.testing.assert_close's atol/rtol for a comparison in float32 (see the module docstring).
    `magnitude` (a float or tensor, required for the 16-bit dtypes) is the output's scale."""
    if dtype not in UNIT_ROUNDOFF:
        return dict(atol=FLOAT32_TOL * scale, rtol=FLOAT32_TOL * scale)
    u = UNIT_ROUNDOFF[dtype]
    return dict(atol=K_ABS * u * float(magnitude), rtol=K_REL * u)


def assert_close(actual, expected, dtype=None, scale=1.0, magnitude=None, msg=None):
    """Compares in float32 with the tolerance of `dtype` (default: actual's dtype).

    float32: atol = rtol = 1e-5 * scale. bfloat16/float16: rtol = 2u (one ulp), atol = u * magnitude,
    with magnitude = max|expected| unless given; `scale` is ignored there (module docstring)."""
    dtype = dtype or actual.dtype
    actual, expected = actual.float(), expected.float()
    if magnitude is None and dtype in UNIT_ROUNDOFF:
        finite = expected[torch.isfinite(expected)]
        magnitude = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, **tol(dtype, scale, magnitude), msg=msg)


def assert_norm_close(actual, expected, dtype, k, budget=0.0, msg=""):
    """||actual - expected|| <= budget + k * u * ||expected|| (2-norms over the whole tensor, in float32):
    for a result whose elements are not each a rounding of a float32 value, where an error shows as
    a relative error of the tensor. `budget` is an absolute allowance the caller derives (and justifies)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{msg} non-finite values"
    err = torch.linalg.vector_norm(actual - expected).item()
    ref = torch.linalg.vector_norm(expected).item()
    bound = float(budget) + k * unit_roundoff(dtype) * ref
    assert err <= bound, (f"{msg} ||actual - expected|| = {err:.4g} > {bound:.4g} = budget {float(budget):.4g} + "
                          f"{k} u * ||expected|| (u = {unit_roundoff(dtype):.3g}, ||expected|| = {ref:.4g}); "
                          f"relative error {err / max(ref, 1e-30):.3g}")


def rms_norm_grad_x_magnitude(grad_out, x, weight, eps):
    """`magnitude` for RMSNorm's grad_x = rstd * (g w - x_hat mean(g w x_hat)): the largest element of its
    first term. grad_x is a difference of such terms (exactly 0 up to eps at hidden size 1), so their
    rounding, not the result's own size, sets its absolute error. For random data it is within a
    small factor of max|grad_x| itself."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (grad_out.float() * weight.float() * rstd).abs().max().item()

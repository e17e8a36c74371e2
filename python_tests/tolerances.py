"""The per-dtype tolerance table, in one place. Kernels accumulate in float32; the error budget is
the rounding of the output to its dtype plus the reordering of float32 sums."""

import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tol(dtype, scale=1.0):
    t = TOLERANCES[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def assert_close(actual, expected, dtype=None, scale=1.0, msg=None):
    """Compares in float32 with the tolerance of `dtype` (default: actual's dtype) times `scale`."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **tol(dtype, scale), msg=msg)

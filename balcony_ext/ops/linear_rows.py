"""Small-batch linear map for decode steps (torch.ops.balcony.linear_rows)."""

import torch

from .. import _native


def reference_linear_rows(x, weight, bias=None):
    """The specification: x [M,K] float32 @ weight[N,K]^T (widened to float32) + bias, float32 [M,N]."""
    out = x.float() @ weight.float().T
    return out + bias.float() if bias is not None else out


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                accumulate: bool = False) -> torch.Tensor:
    """x [M,K] float32 times weight [N,K] (float32 or bfloat16, read once) transposed, plus bias
    [N] float32: float32 [M,N]. With `out`, writes (accumulate=False) or adds (True) into it.
    Meant for the few rows of a decode step, where the weight read is the whole cost."""
    if out is None:
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
        accumulate = False
    torch.ops.balcony.linear_rows(x, weight, bias, out, accumulate)
    return out


if _native.available():

    @torch.library.register_fake("balcony::linear_rows")
    def _(x, weight, bias, out, accumulate):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "linear_rows: x and weight must be 2-D")
        torch._check(x.shape[1] == weight.shape[1], lambda: "linear_rows: x and weight disagree on K")
        return None

"""SiLU-and-multiply, the SwiGLU activation (torch.ops.balcony.silu_and_mul, silu_and_mul_backward)."""

import torch
import torch.nn.functional as F

from .. import _native


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dimension -> silu(gate) * up, in float32, rounded once to x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x of last dimension 2I; differentiable. With `out` (contiguous,
    x's dtype, shape [..., I]) the result is written there instead (not differentiable)."""
    if out is not None:
        torch.ops.balcony.silu_and_mul_out(x, out)
        return out
    return torch.ops.balcony.silu_and_mul(x)


if _native.available():

    def _half_last(x):
        torch._check(x.dim() >= 1, lambda: "silu_and_mul: input must have at least 1 dimension")
        torch._check(x.shape[-1] % 2 == 0, lambda: "silu_and_mul: input's last dimension must be even")
        return (*x.shape[:-1], x.shape[-1] // 2)

    @torch.library.register_fake("balcony::silu_and_mul")
    def _(x):
        return x.new_empty(_half_last(x))

    @torch.library.register_fake("balcony::silu_and_mul_out")
    def _(x, out):
        torch._check(tuple(out.shape) == _half_last(x), lambda: "silu_and_mul_out: out shape")
        return None

    @torch.library.register_fake("balcony::silu_and_mul_backward")
    def _(grad_out, x):
        torch._check(tuple(grad_out.shape) == _half_last(x), lambda: "silu_and_mul_backward: grad_out shape")
        return x.new_empty(x.shape)

    def _setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)

    def _backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.balcony.silu_and_mul_backward(grad, x)

    torch.library.register_autograd("balcony::silu_and_mul", _backward, setup_context=_setup_context)

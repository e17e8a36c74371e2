"""RMSNorm and fused residual-add + RMSNorm (torch.ops.balcony.rms_norm, fused_add_rms_norm)."""

import torch

from .. import _native




def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x * rsqrt(mean(x^2) + eps), computed in float32 and rounded once to x's dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


def reference_rms_norm_backward(grad_out, x, weight, eps):
    xf, wf, gf = x.float(), weight.float(), grad_out.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    gw = gf * wf
    grad_x = rstd * gw - xf * rstd.pow(3) * (gw * xf).mean(-1, keepdim=True)
    grad_w = (gf * xf * rstd).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


def reference_fused_add_rms_norm(x, residual, weight, eps):
    """Returns (normed, new_residual): new_residual = x + residual (in x's dtype)."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return reference_rms_norm(new_residual, weight, eps), new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension; differentiable in x and weight."""
    return torch.ops.balcony.rms_norm(x, weight, float(eps))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> None:
    """In place: residual += x; x = rms_norm(residual). Both contiguous, same shape and dtype."""
    torch.ops.balcony.fused_add_rms_norm(x, residual, weight, float(eps))


if _native.available():

    @torch.library.register_fake("balcony::rms_norm")
    def _(x, weight, eps):
        torch._check(x.shape[-1] == weight.shape[0], lambda: "rms_norm: hidden size mismatch")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("balcony::rms_norm_backward")
    def _(grad_out, x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)

    @torch.library.register_fake("balcony::fused_add_rms_norm")
    def _(x, residual, weight, eps):
        return None

    def _setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def _backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = torch.ops.balcony.rms_norm_backward(grad.contiguous(), x, weight, ctx.eps)
        return grad_x, grad_w, None

    torch.library.register_autograd("balcony::rms_norm", _backward, setup_context=_setup_context)

"""Fused linear + KL(p_teacher || p_student) self-distillation loss (torch.ops.balcony.fused_linear_kl).

The student logits (student @ weight^T) are never materialised in full: the op walks the tokens in
chunks, and the gradient with respect to the student hidden states is computed inside the forward.
The LM head (weight) must be frozen and the teacher is a constant (detached), as in Balcony.
"""

import torch
import torch.nn.functional as F

from .. import _native


def reference_fused_linear_kl(student, weight, teacher, teacher_is_logits=False, reduction="mean"):
    """The naive full-logits loss in float32: KL(softmax(t) || softmax(s)) per token, summed or
    averaged over tokens ("mean" = F.kl_div's "batchmean")."""
    s = student.float() @ weight.float().t()
    t = teacher.float() if teacher_is_logits else teacher.float() @ weight.float().t()
    red = {"mean": "batchmean", "sum": "sum"}[reduction]
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction=red)


def fused_linear_kl(student: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor, teacher_is_logits: bool = False,
                    reduction: str = "mean", chunk_size: int = 0) -> torch.Tensor:
    """KL(p_teacher || p_student) with p = softmax(. @ weight^T) (teacher logits given directly when
    teacher_is_logits), reduced over the N tokens. student [N, H], weight [V, H], teacher [N, H] or
    [N, V], same dtype. Returns a float32 scalar, differentiable with respect to student only.

    weight gets no gradient: if it requires grad (and grad mode is on) this raises, since silently
    dropping the LM head's gradient would be wrong; pass `weight.detach()` for a frozen head. The
    teacher is treated as a constant (no gradient flows to it).
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "fused_linear_kl: weight (the LM head) requires grad, but this loss computes no gradient for it: "
            "the LM head must be frozen (weight.requires_grad_(False) or pass weight.detach())")
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.balcony.fused_linear_kl(student, weight, teacher, bool(teacher_is_logits), str(reduction),
                                                int(chunk_size), compute_grad)
    return loss


if _native.available():

    @torch.library.register_fake("balcony::fused_linear_kl")
    def _(student, weight, teacher, teacher_is_logits, reduction, chunk_size, compute_grad):
        torch._check(student.dim() == 2 and weight.dim() == 2, lambda: "fused_linear_kl: student and weight are 2-D")
        loss = student.new_empty((), dtype=torch.float32)
        grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
        return loss, grad

    def _setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.n = inputs[0].shape[0]

    def _backward(ctx, grad_loss, _grad_grad):
        (grad,) = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            if grad.dim() != 2:
                raise RuntimeError("fused_linear_kl: backward needs the op called with compute_grad=True "
                                   "(ops.fused_linear_kl does this when student requires grad)")
            return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None
        return None, None, None, None, None, None, None

    torch.library.register_autograd("balcony::fused_linear_kl", _backward, setup_context=_setup_context)

"""torch.ops.balcony.fused_linear_kl against the naive full-logits reference (values and gradients)."""

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_fused_linear_kl
from conftest import device_dtype_params
from tolerances import assert_close

SIZES = [(1, 17, 1), (7, 17, 3), (33, 17, 127), (7, 64, 1000), (33, 64, 127), (1, 64, 1000)]


def make(n, h, v, device, dtype, teacher_is_logits, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5 * 2
    teacher = torch.randn(n, v, generator=g) * 2 if teacher_is_logits else student + 0.5 * torch.randn(n, h, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (student, weight, teacher)]


def run_both(student, weight, teacher, teacher_is_logits, reduction, chunk_size=0):
    s = student.detach().clone().requires_grad_()
    loss = ops.fused_linear_kl(s, weight, teacher, teacher_is_logits, reduction, chunk_size)
    (grad,) = torch.autograd.grad(loss, s)
    r = student.detach().clone().requires_grad_()
    ref = reference_fused_linear_kl(r, weight, teacher, teacher_is_logits, reduction)
    (ref_grad,) = torch.autograd.grad(ref, r)
    return loss, grad, ref, ref_grad


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("n,h,v", SIZES)
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_kl_vs_reference(cpu_capability, device, dtype, n, h, v, teacher_is_logits, reduction):
    student, weight, teacher = make(n, h, v, device, dtype, teacher_is_logits)
    loss, grad, ref, ref_grad = run_both(student, weight, teacher, teacher_is_logits, reduction, chunk_size=5)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # bf16/fp16: the logits GEMM runs in the input dtype while the reference runs in float32.
    scale = 1.0 if dtype == torch.float32 else 4.0
    loss_scale = n if reduction == "sum" else 1
    assert_close(loss, ref, dtype=dtype, scale=scale * loss_scale)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, dtype=dtype, scale=scale)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_fused_linear_kl_chunk_sizes_agree(device, dtype, teacher_is_logits):
    """Every chunk size gives the same loss and gradient (up to the GEMM's summation order)."""
    student, weight, teacher = make(33, 64, 1000, device, dtype, teacher_is_logits, seed=3)
    results = []
    for chunk in (0, 1, 4, 7, 33, 100):
        loss, grad = torch.ops.balcony.fused_linear_kl(student, weight, teacher, teacher_is_logits, "sum", chunk, True)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        # the GEMM of a chunk may block differently by row count; allow float32 reordering only
        assert_close(loss, results[0][0], dtype=torch.float32, scale=10)
        assert_close(grad, results[0][1], dtype=dtype)


def test_fused_linear_kl_bigger_vocab(cpu_capability):
    """A vocabulary past several vector widths with a large logit range."""
    student, weight, teacher = make(9, 64, 4099, "cpu", torch.float32, True, seed=5)
    loss, grad, ref, ref_grad = run_both(student * 4, weight, teacher * 3, True, "mean", chunk_size=4)
    assert_close(loss, ref, scale=4)
    assert_close(grad, ref_grad)


def test_fused_linear_kl_no_grad_path():
    student, weight, teacher = make(7, 17, 127, "cpu", torch.float32, False)
    loss, grad = torch.ops.balcony.fused_linear_kl(student, weight, teacher, False, "mean", 0, False)
    assert grad.numel() == 0
    assert_close(loss, reference_fused_linear_kl(student, weight, teacher, False, "mean"))
    with torch.no_grad():
        assert_close(ops.fused_linear_kl(student.requires_grad_(), weight, teacher), loss)


def test_fused_linear_kl_identical_distributions_is_zero():
    student, weight, _ = make(7, 64, 1000, "cpu", torch.float32, False)
    s = student.clone().requires_grad_()
    loss = ops.fused_linear_kl(s, weight, student, reduction="sum")
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(loss.item()) < 1e-4
    assert grad.abs().max().item() < 1e-6


def test_fused_linear_kl_grad_output_scaling():
    student, weight, teacher = make(7, 17, 127, "cpu", torch.float32, True)
    s = student.clone().requires_grad_()
    (grad,) = torch.autograd.grad(3.0 * ops.fused_linear_kl(s, weight, teacher, True), s)
    r = student.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(3.0 * reference_fused_linear_kl(r, weight, teacher, True), r)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_fused_linear_kl_opcheck(dtype, teacher_is_logits):
    student, weight, teacher = make(7, 17, 33, "cpu", dtype, teacher_is_logits)
    torch.library.opcheck(torch.ops.balcony.fused_linear_kl,
                          (student.requires_grad_(), weight, teacher, teacher_is_logits, "mean", 3, True))
    torch.library.opcheck(torch.ops.balcony.fused_linear_kl,
                          (student.detach(), weight, teacher, teacher_is_logits, "sum", 0, False))


def test_fused_linear_kl_errors():
    student, weight, teacher = make(7, 17, 33, "cpu", torch.float32, False)
    op = torch.ops.balcony.fused_linear_kl
    with pytest.raises(RuntimeError, match="weight must be \\[V, H\\]"):
        op(student, weight[:, :16], teacher, False, "mean", 0, False)
    with pytest.raises(RuntimeError, match="teacher hidden states must be"):
        op(student, weight, teacher[:5], False, "mean", 0, False)
    with pytest.raises(RuntimeError, match="teacher logits must be"):
        op(student, weight, teacher, True, "mean", 0, False)
    with pytest.raises(RuntimeError, match="reduction must be"):
        op(student, weight, teacher, False, "batchmean", 0, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(student, weight.double(), teacher, False, "mean", 0, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(student, weight, teacher.bfloat16(), False, "mean", 0, False)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        op(student.half(), weight.half(), teacher.half(), False, "mean", 0, False)
    with pytest.raises(RuntimeError, match="chunk_size must be"):
        op(student, weight, teacher, False, "mean", -1, False)
    with pytest.raises(RuntimeError, match="student must have 2 dimensions"):
        op(student[None], weight, teacher, False, "mean", 0, False)
    with pytest.raises(RuntimeError, match="LM head must be frozen"):
        ops.fused_linear_kl(student.requires_grad_(), weight.clone().requires_grad_(), teacher)

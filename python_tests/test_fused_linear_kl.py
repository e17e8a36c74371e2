"""torch.ops.balcony.fused_linear_kl against the naive full-logits reference (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from balcony_ext import ops
from balcony_ext.reference import reference_fused_linear_kl
from conftest import device_dtype_params
from tolerances import FLOAT32_TOL, assert_close, assert_norm_close

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


def rounded_logits_reference(student, weight, teacher, teacher_is_logits, reduction):
    """The float32 reference's loss and gradient (with respect to student) evaluated at logits rounded
    to the inputs' dtype, as the op's logits GEMM returns them: what the op computes before its own
    roundings. For float32 it is the reference."""
    dtype = student.dtype
    s = student.detach().float().requires_grad_()
    zs = s @ weight.float().t()
    zs = zs + (zs.to(dtype).float() - zs).detach()  # rounded values, the identity's gradient
    zt = teacher.float() if teacher_is_logits else (teacher.float() @ weight.float().t()).to(dtype).float()
    red = {"mean": "batchmean", "sum": "sum"}[reduction]
    loss = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction=red)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


# bfloat16 / float16 (tolerances.py: u = 2^-8 / 2^-11). The op rounds the student's logits (and the
# teacher's, given hidden states) to the dtype by design: an error of up to u|z| per logit (|z| ~ 2-6). The loss and gradient
# depend on the logits through softmax(s) - softmax(t), which for a teacher close to the student is
# much smaller than either, so that rounding is amplified and data-dependent: measured over 30 seeds
# of SIZES it moves the reference by up to 5u (relative) in the loss and 11u in the gradient's norm,
# with a long tail for a single row (25u in 300 seeds). No fixed multiple of u is both tight and safe, so the budget is
# that movement itself, computed per case: sensitivity = |reference at rounded logits - reference|.
# On top of it:
#   loss: float32 (the op sums the rows in double), so float32's tolerance, 1e-5 relative. Measured:
#     the op's loss is within 4e-6 (relative) of the rounded-logits reference.
#   gradient: KL_GRAD_K = 2 u of its norm, for its own two roundings: d(logits) stored in the dtype and
#     the output of the gradient GEMM, each at most u relative. Measured: at most 0.66 u beyond the
#     sensitivity (30 seeds, every size, both reductions and teacher kinds, every CPU capability).
# Rejected (test_fused_linear_kl_check_rejects_planted_errors): a zero loss, a zero or halved gradient,
# and a shifted softmax (the student's or the teacher's logits plus a bias over the vocabulary), each in
# the loss alone and the gradient alone.
KL_GRAD_K = 2.0


def assert_kl_close(loss, grad, ref, ref_grad, rounded, dtype):
    """The bf16/fp16 comparison of the op's loss and gradient with the reference (see above);
    rounded = rounded_logits_reference(...) of the same inputs."""
    r_loss, r_grad = rounded
    loss_budget = (r_loss - ref).abs().item() + FLOAT32_TOL * ref.abs().item()
    assert_norm_close(loss, ref, dtype, k=0.0, budget=loss_budget, msg="loss:")
    grad_budget = torch.linalg.vector_norm(r_grad - ref_grad).item()
    assert_norm_close(grad, ref_grad, dtype, k=KL_GRAD_K, budget=grad_budget, msg="gradient:")


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("n,h,v", SIZES)
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_kl_vs_reference(cpu_capability, device, dtype, n, h, v, teacher_is_logits, reduction):
    student, weight, teacher = make(n, h, v, device, dtype, teacher_is_logits)
    loss, grad, ref, ref_grad = run_both(student, weight, teacher, teacher_is_logits, reduction, chunk_size=5)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype
    if dtype == torch.float32:
        # the op sums the rows' losses in double: no reordering error growing with n
        assert_close(loss, ref, dtype=dtype)
        assert_close(grad, ref_grad, dtype=dtype)
    else:  # the logits GEMM runs in the input dtype while the reference runs in float32
        rounded = rounded_logits_reference(student, weight, teacher, teacher_is_logits, reduction)
        assert_kl_close(loss, grad, ref, ref_grad, rounded, dtype)


def biased_logits_op(student, weight, teacher, teacher_is_logits, reduction, student_bias=None, teacher_bias=None):
    """The op run with a bias [V] added to the student's or the teacher's logits (a planted error). Teacher
    logits given directly get it added; otherwise it enters as an extra hidden unit, 1 on the biased side
    and 0 on the other, whose weight column is the bias. Returns the loss and the gradient with respect
    to the student's original columns."""
    n, h = student.shape
    if teacher_is_logits:
        w, col = weight, None
        if student_bias is not None:
            w = torch.cat([weight, student_bias.to(weight.dtype)[:, None]], 1)
            col = torch.ones(n, 1, dtype=student.dtype, device=student.device)
        s = student if col is None else torch.cat([student, col], 1)
        t = teacher if teacher_bias is None else (teacher.float() + teacher_bias.float()).to(teacher.dtype)
    else:
        bias = student_bias if student_bias is not None else teacher_bias
        w = torch.cat([weight, bias.to(weight.dtype)[:, None]], 1)
        one = torch.ones(n, 1, dtype=student.dtype, device=student.device)
        s = torch.cat([student, one if student_bias is not None else 0 * one], 1)
        t = torch.cat([teacher, one if teacher_bias is not None else 0 * one], 1)
    s = s.detach().clone().requires_grad_()
    loss = ops.fused_linear_kl(s, w, t, teacher_is_logits, reduction)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad[:, :h]


def low_precision_params():
    """device_dtype_params() without float32: bfloat16 on CPU; float16 and bfloat16 on CUDA."""
    params = [("cpu", torch.bfloat16)]
    for dt in (torch.float16, torch.bfloat16):
        params.append(pytest.param("cuda", dt, marks=pytest.mark.cuda))
    return params


# planted error -> the check that must catch it. Shifted softmax: the student's or the teacher's logits
# plus a bias over the vocabulary (the same for every token), normal with this standard deviation. The
# teacher's is 0.3: with 0.1 the loss of a peaked teacher (logits given, 3.5 nats per token, V = 127)
# moves by only 1e-4 relative, below what its bf16 logits resolve (the gradient check still sees 0.1).
PLANTS = {
    "zero_loss": "loss", "zero_grad": "gradient", "halved_grad": "gradient",
    "student_bias_loss": "loss", "student_bias_grad": "gradient",
    "teacher_bias_loss": "loss", "teacher_bias_grad": "gradient",
}
BIAS_STD = {"student": 0.1, "teacher": 0.3}


@pytest.mark.parametrize("device,dtype", low_precision_params())
@pytest.mark.parametrize("n,h,v", [(7, 64, 1000), (33, 17, 127)])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("plant", list(PLANTS))
def test_fused_linear_kl_check_rejects_planted_errors(device, dtype, n, h, v, teacher_is_logits, reduction, plant):
    """The bf16/fp16 comparison of test_fused_linear_kl_vs_reference passes the op's output and
    rejects each planted error put on top of that output, in the loss or the gradient alone."""
    student, weight, teacher = make(n, h, v, device, dtype, teacher_is_logits)
    loss, grad, ref, ref_grad = run_both(student, weight, teacher, teacher_is_logits, reduction)
    rounded = rounded_logits_reference(student, weight, teacher, teacher_is_logits, reduction)
    assert_kl_close(loss, grad, ref, ref_grad, rounded, dtype)
    if plant == "zero_loss":
        loss = torch.zeros_like(loss)
    elif plant == "zero_grad":
        grad = torch.zeros_like(grad)
    elif plant == "halved_grad":
        grad = grad / 2
    else:
        side = plant.split("_")[0]
        bias = BIAS_STD[side] * torch.randn(v, generator=torch.Generator().manual_seed(1))
        b_loss, b_grad = biased_logits_op(student, weight, teacher, teacher_is_logits, reduction,
                                          **{f"{side}_bias": bias.to(device)})
        if plant.endswith("loss"):
            loss = b_loss
        else:
            grad = b_grad
    with pytest.raises(AssertionError, match=PLANTS[plant]):
        assert_kl_close(loss, grad, ref, ref_grad, rounded, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_fused_linear_kl_chunk_sizes_agree(cpu_capability, device, dtype, teacher_is_logits):
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
    assert_close(loss, ref)
    assert_close(grad, ref_grad)


def test_fused_linear_kl_no_grad_path():
    student, weight, teacher = make(7, 17, 127, "cpu", torch.float32, False)
    loss, grad = torch.ops.balcony.fused_linear_kl(student, weight, teacher, False, "mean", 0, False)
    assert grad.numel() == 0
    assert_close(loss, reference_fused_linear_kl(student, weight, teacher, False, "mean"))
    with torch.no_grad():
        assert_close(ops.fused_linear_kl(student.requires_grad_(), weight, teacher), loss)


def test_fused_linear_kl_identical_distributions_is_zero(cpu_capability):
    student, weight, _ = make(7, 64, 1000, "cpu", torch.float32, False)
    s = student.clone().requires_grad_()
    loss = ops.fused_linear_kl(s, weight, student, reduction="sum")
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(loss.item()) < 1e-4
    assert grad.abs().max().item() < 1e-6


def test_fused_linear_kl_grad_output_scaling(cpu_capability):
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

"""torch.ops.balcony.rms_norm (forward and autograd), rms_norm_backward and fused_add_rms_norm against
the plain-PyTorch reference."""

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_fused_add_rms_norm, reference_rms_norm, reference_rms_norm_backward
from conftest import device_dtype_params
from tolerances import assert_close, rms_norm_grad_x_magnitude

SHAPES = [(1, 1), (3, 17), (5, 127), (7, 576), (19, 769), (2, 3, 1024), (4, 4096)]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward(cpu_capability, device, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    assert_close(ops.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rms_norm_non_contiguous(cpu_capability, device, dtype):
    torch.manual_seed(1)
    base = torch.randn(33, 2 * 129, device=device, dtype=dtype)
    x = base[:, ::2]  # stride 2 in the last dimension
    w = torch.randn(129, device=device, dtype=dtype)
    assert_close(ops.rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))
    rows = base[::3, :129]  # row stride larger than the row
    assert_close(ops.rms_norm(rows, w, 1e-6), reference_rms_norm(rows, w, 1e-6))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm(cpu_capability, device, dtype, shape):
    torch.manual_seed(2)
    x = torch.randn(shape, device=device, dtype=dtype)
    r = torch.randn(shape, device=device, dtype=dtype)
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    want_out, want_res = reference_fused_add_rms_norm(x, r, w, 1e-5)
    x2, r2 = x.clone(), r.clone()
    ops.fused_add_rms_norm(x2, r2, w, 1e-5)
    assert_close(r2, want_res)
    assert_close(x2, want_out)


def _grads_of(fn, x, w, grad):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    return torch.autograd.grad(fn(x, w, 1e-5), (x, w), grad)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES + [(64, 33)])
def test_rms_norm_autograd(cpu_capability, device, dtype, shape):
    torch.manual_seed(3)
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    got_x, got_w = _grads_of(ops.rms_norm, x, w, grad)
    want_x, want_w = _grads_of(reference_rms_norm, x, w, grad)
    assert got_x.dtype == dtype and got_w.dtype == dtype
    assert_close(got_x, want_x, magnitude=rms_norm_grad_x_magnitude(grad, x, w, 1e-5))
    # grad_weight is a float32 sum over rows: its reordering error grows with their number (float32 only;
    # a 16-bit grad_weight is still that sum rounded once).
    assert_close(got_w, want_w, scale=2 + x.numel() // shape[-1] / 16)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rms_norm_backward_non_contiguous(cpu_capability, device, dtype):
    torch.manual_seed(4)
    x = torch.randn(21, 2 * 130, device=device, dtype=dtype)[:, ::2]  # stride 2 in the last dimension
    g = torch.randn(63, 130, device=device, dtype=dtype)[::3]  # row stride larger than the row
    w = torch.randn(130, device=device, dtype=dtype)
    got = torch.ops.balcony.rms_norm_backward(g, x, w, 1e-6)
    want = reference_rms_norm_backward(g, x, w, 1e-6)
    assert_close(got[0], want[0], magnitude=rms_norm_grad_x_magnitude(g, x, w, 1e-6))
    assert_close(got[1], want[1], scale=4)  # float32: a sum over 21 rows (as in test_rms_norm_autograd)


def test_rms_norm_backward_deterministic(cpu_capability):
    torch.manual_seed(5)
    x, g = torch.randn(2, 999, 576), torch.randn(2, 999, 576)
    w = torch.randn(576)
    first = torch.ops.balcony.rms_norm_backward(g, x, w, 1e-6)
    for _ in range(3):
        again = torch.ops.balcony.rms_norm_backward(g, x, w, 1e-6)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rms_norm_opcheck(device, dtype):
    torch.manual_seed(6)
    x = torch.randn(5, 67, device=device, dtype=dtype)
    w = torch.randn(67, device=device, dtype=dtype)
    g = torch.randn(5, 67, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.balcony.rms_norm.default, (x, w, 1e-5))
    # with grad-requiring inputs opcheck also checks the registered autograd
    torch.library.opcheck(torch.ops.balcony.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-5))
    torch.library.opcheck(torch.ops.balcony.rms_norm_backward.default, (g, x.detach(), w.detach(), 1e-5))
    r = torch.randn(5, 67, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.balcony.fused_add_rms_norm.default, (x.detach().clone(), r, w.detach(), 1e-5))


def test_rms_norm_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="must equal weight's size"):
        torch.ops.balcony.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="must equal weight's size"):
        torch.ops.balcony.rms_norm_backward(x, x, torch.randn(9), 1e-6)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.balcony.rms_norm(x, torch.randn(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.balcony.rms_norm_backward(x.bfloat16(), x, torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        torch.ops.balcony.rms_norm(x.double(), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        torch.ops.balcony.rms_norm_backward(x.double(), x.double(), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.balcony.rms_norm_backward(torch.randn(3, 8), x, torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="weight must have 1 dimensions"):
        torch.ops.balcony.rms_norm(x, torch.randn(1, 8), 1e-6)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.balcony.fused_add_rms_norm(x, torch.randn(3, 8), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.balcony.fused_add_rms_norm(x.t(), torch.randn(4, 8).t(), torch.randn(4), 1e-6)


@pytest.mark.cuda
def test_rms_norm_device_mismatch():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="same device|must be on"):
        torch.ops.balcony.rms_norm(x.cuda(), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="same device|must be on"):
        torch.ops.balcony.rms_norm_backward(x, x.cuda(), torch.randn(8).cuda(), 1e-6)

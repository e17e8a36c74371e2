"""torch.ops.balcony.silu_and_mul (forward and autograd) and silu_and_mul_backward against the
plain-PyTorch reference."""

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_silu_and_mul
from conftest import device_dtype_params
from tolerances import assert_close

# (leading dims..., I): the input is [..., 2I]
SHAPES = [(1, 1), (3, 3), (5, 17), (2, 127), (7, 769), (2, 3, 1536), (4, 5, 6, 17)]


def _input(shape, device, dtype, scale=3.0):
    return torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype) * scale


def _grad_of(fn, x, grad):
    x = x.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(fn(x), (x,), grad)
    return gx


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul_forward(cpu_capability, device, dtype, shape):
    torch.manual_seed(0)
    x = _input(shape, device, dtype)
    out = ops.silu_and_mul(x)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, reference_silu_and_mul(x))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul_autograd(cpu_capability, device, dtype, shape):
    torch.manual_seed(1)
    x = _input(shape, device, dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    got = _grad_of(ops.silu_and_mul, x, grad)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, _grad_of(reference_silu_and_mul, x, grad))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_silu_and_mul_extreme_values(cpu_capability, device, dtype):
    # exp overflow/underflow inside the sigmoid: large gates of both signs, zeros, tiny values
    gate = torch.tensor([-1e4, -100.0, -88.5, -87.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 87.0, 88.5, 100.0, 1e4])
    x = torch.cat([gate, torch.linspace(-2, 2, gate.numel())]).to(device=device, dtype=dtype)[None]
    # magnitude 1: outputs reach 2e4 here, and their u * max|out| would cover every other element; an
    # elementwise output only carries its own rounding (rtol), the absolute part is for values near 0.
    assert_close(ops.silu_and_mul(x), reference_silu_and_mul(x), magnitude=1.0)
    grad = torch.ones(1, gate.numel(), device=device, dtype=dtype)
    assert_close(_grad_of(ops.silu_and_mul, x, grad), _grad_of(reference_silu_and_mul, x, grad), magnitude=1.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_silu_and_mul_non_contiguous(cpu_capability, device, dtype):
    torch.manual_seed(2)
    inter = 129
    base = torch.randn(40, 2 * inter + 6, device=device, dtype=dtype)
    cases = [
        base[:, 3 : 3 + 2 * inter],  # row-strided slice, unaligned start
        base[::3, : 2 * inter],  # every third row
        torch.randn(2 * inter, 13, device=device, dtype=dtype).t(),  # last dimension strided
    ]
    for x in cases:
        assert_close(ops.silu_and_mul(x), reference_silu_and_mul(x))
        grad = torch.randn(x.shape[0], 2 * inter + 4, device=device, dtype=dtype)[:, 1 : 1 + inter]
        got = torch.ops.balcony.silu_and_mul_backward(grad, x)
        assert_close(got, _grad_of(reference_silu_and_mul, x, grad))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul_out(cpu_capability, device, dtype, shape):
    torch.manual_seed(1)
    x = _input(shape, device, dtype)
    out = torch.full(shape, float("nan"), device=device, dtype=dtype)
    assert ops.silu_and_mul(x, out=out) is out
    assert_close(out, reference_silu_and_mul(x))
    # a strided input, the same result
    wide = _input((*shape[:-1], 3 * shape[-1]), device, dtype)
    ops.silu_and_mul(wide[..., : 2 * shape[-1]], out=out)
    assert_close(out, reference_silu_and_mul(wide[..., : 2 * shape[-1]]))


def test_silu_and_mul_out_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="last dimension halved"):
        torch.ops.balcony.silu_and_mul_out(x, torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.balcony.silu_and_mul_out(x, torch.empty(4, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.balcony.silu_and_mul_out(x, torch.empty(4, 8)[:, :4])
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.balcony.silu_and_mul_out(torch.randn(4, 7), torch.empty(4, 3))


def test_silu_and_mul_empty():
    x = torch.randn(0, 34)
    assert ops.silu_and_mul(x).shape == (0, 17)
    assert torch.ops.balcony.silu_and_mul_backward(torch.randn(0, 17), x).shape == (0, 34)
    assert ops.silu_and_mul(torch.randn(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_silu_and_mul_opcheck(device, dtype):
    torch.manual_seed(3)
    x = torch.randn(3, 5, 2 * 37, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.balcony.silu_and_mul.default, (x,))
    torch.library.opcheck(torch.ops.balcony.silu_and_mul.default, (x.clone().requires_grad_(),))
    grad = torch.randn(3, 5, 37, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.balcony.silu_and_mul_backward.default, (grad, x))
    torch.library.opcheck(torch.ops.balcony.silu_and_mul_out.default, (x, torch.empty_like(grad)))


def test_silu_and_mul_errors():
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.balcony.silu_and_mul(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        torch.ops.balcony.silu_and_mul(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        torch.ops.balcony.silu_and_mul(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        torch.ops.balcony.silu_and_mul(torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.balcony.silu_and_mul_backward(torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="last dimension halved"):
        torch.ops.balcony.silu_and_mul_backward(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.balcony.silu_and_mul_backward(torch.randn(4, 3), torch.randn(4, 7))


@pytest.mark.cuda
def test_silu_and_mul_device_mismatch():
    with pytest.raises(RuntimeError, match="same device|must be on"):
        torch.ops.balcony.silu_and_mul_backward(torch.randn(4, 4), torch.randn(4, 8).cuda())

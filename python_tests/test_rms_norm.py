"""torch.ops.balcony.rms_norm / fused_add_rms_norm against the plain-PyTorch reference."""

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_fused_add_rms_norm, reference_rms_norm, reference_rms_norm_backward
from conftest import device_dtype_params
from tolerances import assert_close

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

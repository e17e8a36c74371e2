"""balcony/silu_and_mul.cuh (SiLU-and-multiply forward and backward) run on the CPU under the CUDA
execution harness, against the plain-PyTorch reference, for every scheduling seed.

    pytest -m cuda_harness python_tests/test_cuda_harness_silu_and_mul.py
"""

import zlib

import pytest
import torch

import cuda_harness as ch
from balcony_ext.reference import reference_silu_and_mul
from tolerances import assert_close

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACK = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte pack

# (rows, inter, row padding, element offset of every pointer). Blocks are 256 threads; blocks along x
# cover ceil(chunks / 256) of a row (chunks = inter / pack on the vector path, inter on the scalar one).
CASES = {
    "vec_small": (3, 40, 0, 0),  # vector path, one block per row, most threads idle
    "vec_multiblock": (2, 2400, 0, 0),  # vector path, 2 (16-bit) or 3 (float32) blocks along x, last one partial
    "vec_strided": (3, 64, 24, 0),  # vector path, row strides > row (padding must stay untouched)
    "scalar_odd": (4, 77, 0, 0),  # scalar path: inter not a multiple of the pack
    "scalar_misaligned": (3, 64, 0, 1),  # scalar path: pointers not 16-byte aligned
    "scalar_stride": (3, 64, 1, 0),  # scalar path: aligned pointers, strides not a multiple of the pack
    "scalar_multiblock": (2, 301, 5, 0),  # scalar path, 2 blocks along x, odd inter, padding
    "scalar_one": (2, 1, 3, 0),  # inter 1
}


def _view(storage, rows, cols, stride, offset):
    return storage.as_strided((rows, cols), (stride, 1), offset)


def _alloc(rows, cols, stride, offset):
    return offset + (rows - 1) * stride + cols  # storage exactly as long as the last row's end


def _outside(storage, rows, cols, stride, offset):
    mask = torch.ones(storage.numel(), dtype=torch.bool)
    _view(mask, rows, cols, stride, offset).fill_(False)
    return storage[mask]


def _case(case, dtype):
    rows, inter, pad, offset = CASES[case]
    if case.startswith("vec") and (inter % PACK[dtype] or pad % PACK[dtype]):
        pytest.skip("not a vector-path size for this dtype")
    return rows, inter, pad, offset


def _input(rows, inter, stride, offset, dtype):
    x = torch.randn(_alloc(rows, 2 * inter, stride, offset)) * 3
    # A few large gates of both signs (exp overflow / underflow inside the sigmoid).
    x[offset] = -100.0
    if inter > 2:
        x[offset + 1] = 95.0
        x[offset + 2] = -20.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("case", list(CASES))
def test_silu_and_mul_under_harness(case, dtype):
    rows, inter, pad, offset = _case(case, dtype)
    torch.manual_seed(zlib.crc32(f"fwd-{case}".encode()))
    xs, os_ = 2 * inter + pad, inter + pad
    x = _input(rows, inter, xs, offset, dtype)
    out = torch.full((_alloc(rows, inter, os_, offset),), float("nan"), dtype=dtype)
    params = dict(dtype=ch.dtype_name(dtype), rows=rows, inter=inter, x_stride=xs, out_stride=os_, x_offset=offset,
                  out_offset=offset)
    want = reference_silu_and_mul(_view(x, rows, 2 * inter, xs, offset))
    result = ch.run("silu_and_mul", params, inputs=dict(x=x), outputs=dict(out=out))
    for seed in ch.SEEDS:
        got = result[seed]["out"]
        assert_close(_view(got, rows, inter, os_, offset), want, msg=lambda m: f"seed {seed}: {m}")
        assert torch.isnan(_outside(got, rows, inter, os_, offset).float()).all(), "wrote outside the rows"
    ch.assert_same_across_seeds(result)


def _reference_backward(x, grad):
    """d/dx of silu(gate) * up, in float32 from the same inputs, rounded once to x's dtype."""
    xf = x.float().requires_grad_(True)
    (gx,) = torch.autograd.grad(reference_silu_and_mul(xf), (xf,), grad.float())
    return gx.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("case", list(CASES))
def test_silu_and_mul_backward_under_harness(case, dtype):
    rows, inter, pad, offset = _case(case, dtype)
    torch.manual_seed(zlib.crc32(f"bwd-{case}".encode()))
    xs, gs = 2 * inter + pad, inter + pad
    x = _input(rows, inter, xs, offset, dtype)
    grad = torch.randn(_alloc(rows, inter, gs, offset)).to(dtype)
    grad_in = torch.full((_alloc(rows, 2 * inter, xs, offset),), float("nan"), dtype=dtype)
    params = dict(dtype=ch.dtype_name(dtype), rows=rows, inter=inter, grad_stride=gs, x_stride=xs, gi_stride=xs,
                  grad_offset=offset, x_offset=offset, gi_offset=offset)
    want = _reference_backward(_view(x, rows, 2 * inter, xs, offset), _view(grad, rows, inter, gs, offset))
    result = ch.run("silu_and_mul_backward", params, inputs=dict(grad=grad, x=x), outputs=dict(grad_in=grad_in))
    for seed in ch.SEEDS:
        got = result[seed]["grad_in"]
        assert_close(_view(got, rows, 2 * inter, xs, offset), want, msg=lambda m: f"seed {seed}: {m}")
        assert torch.isnan(_outside(got, rows, 2 * inter, xs, offset).float()).all(), "wrote outside the rows"
    ch.assert_same_across_seeds(result)

"""balcony/rms_norm.cuh (RMSNorm, fused residual-add + RMSNorm) run on the CPU under the CUDA execution
harness, against the plain-PyTorch reference, for every scheduling seed.

    pytest -m cuda_harness python_tests/test_cuda_harness_rms_norm.py
"""

import zlib

import pytest
import torch

import cuda_harness as ch
from balcony_ext.reference import reference_fused_add_rms_norm, reference_rms_norm
from tolerances import assert_close

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACK = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte pack

# (rows, hidden, row padding, element offset of x/out), in units that hit each path for every dtype:
CASES = {
    "vec_small": (3, 64, 0, 0),  # vector path, 64-thread minimum block, most threads idle
    "vec_multiwarp_tail": (2, 8 * 80 + 8 * 33, 0, 0),  # vector path, several warps, last warp partial
    "vec_strided": (3, 256, 8 * 3, 0),  # vector path, row stride > hidden (padding must stay untouched)
    "scalar_odd": (4, 77, 0, 0),  # scalar path: hidden not a multiple of the pack
    "scalar_misaligned": (3, 128, 0, 1),  # scalar path: pointers not 16-byte aligned
    "scalar_one": (2, 1, 3, 0),  # hidden 1
    "scalar_capped_block": (2, 4100, 0, 0),  # 1024-thread block, several elements per thread
    "vec_capped_block": (1, 8 * 1030, 0, 0),  # more packs than threads: the vector loop wraps
}


def _layout(rows, hidden, pad, offset):
    stride = hidden + pad
    return stride, offset + (rows - 1) * stride + hidden  # storage exactly as long as the last row's end


def _view(storage, rows, hidden, stride, offset):
    return storage.as_strided((rows, hidden), (stride, 1), offset)


def _outside(storage, rows, hidden, stride, offset):
    mask = torch.ones(storage.numel(), dtype=torch.bool)
    _view(mask, rows, hidden, stride, offset).fill_(False)
    return storage[mask]


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_add"])
@pytest.mark.parametrize("case", list(CASES))
def test_rms_norm_under_harness(case, fused, dtype):
    rows, hidden, pad, offset = CASES[case]
    if case.startswith("vec") and hidden % PACK[dtype]:
        pytest.skip("not a vector-path size for this dtype")
    if case == "vec_capped_block" and dtype != torch.float32:
        hidden = 4 * 1030  # keep the bigger block cheap; float32 packs of 4 still wrap here
    torch.manual_seed(zlib.crc32(f"{case}-{fused}".encode()))
    stride, n = _layout(rows, hidden, pad, offset)
    x = (torch.randn(n) * 3).to(dtype)
    w = torch.randn(hidden + offset).to(dtype)
    out = ch.poison_like(x)
    params = dict(dtype=ch.dtype_name(dtype), rows=rows, hidden=hidden, eps=1e-5, x_stride=stride, out_stride=stride,
                  x_offset=offset, out_offset=offset, w_offset=offset)
    inputs = dict(x=x, w=w)
    outputs = dict(out=out)
    xv = _view(x, rows, hidden, stride, offset)
    wv = w[offset:]
    if fused:
        residual = torch.randn(n).to(dtype)
        params.update(res_stride=stride, res_offset=offset)
        outputs["residual"] = residual
        want_out, want_res = reference_fused_add_rms_norm(xv, _view(residual, rows, hidden, stride, offset), wv, 1e-5)
    else:
        want_out, want_res = reference_rms_norm(xv, wv, 1e-5), None

    result = ch.run("rms_norm", params, inputs, outputs)
    for seed in ch.SEEDS:
        got = result[seed]
        assert_close(_view(got["out"], rows, hidden, stride, offset), want_out, msg=lambda m: f"seed {seed}: {m}")
        assert torch.isnan(_outside(got["out"], rows, hidden, stride, offset).float()).all(), "wrote outside the rows"
        if fused:
            # x + residual rounded once to the dtype: exact.
            assert torch.equal(_view(got["residual"], rows, hidden, stride, offset), want_res)
            assert torch.equal(_outside(got["residual"], rows, hidden, stride, offset),
                               _outside(residual, rows, hidden, stride, offset))
    ch.assert_same_across_seeds(result)

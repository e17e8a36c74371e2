"""balcony/rms_norm.cuh's backward (launch_rms_norm_backward: per-block grad_x and grad_w partials, then
the fixed-order reduction of the partials) run on the CPU under the CUDA execution harness, against
the plain-PyTorch reference, for every scheduling seed.

    pytest -m cuda_harness python_tests/test_cuda_harness_rms_norm_backward.py
"""

import zlib

import pytest
import torch

import cuda_harness as ch
from balcony_ext.reference import reference_rms_norm_backward
from tolerances import assert_close, rms_norm_grad_x_magnitude

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACK = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte pack


# (rows, hidden (float32, 16-bit), row padding in packs, element offset, blocks launched, extra entry
# parameters). The path (vectorised or element-wise: the name's prefix; 1 or 4 chunks per thread: "k4"
# in the name) and the shape are the op's own choice (rms_norm_backward_plan in
# balcony/rms_norm_launch.h, run by the harness entry, which reports it); the test states what it
# expects. max_blocks caps the blocks below the op's choice so that blocks take several rows at these
# small sizes (the op does that only past what the GPU holds: "vec_k1_sm1" on a 1-SM device).
CASES = {
    "vec_k1": (6, (256, 256), 0, 0, 4, dict(max_blocks=4)),  # blocks of 2 and 1 rows
    "vec_k1_one_block": (5, (64, 64), 0, 0, 1, dict(max_blocks=1)),  # one block, every row; one partial
    "vec_k1_strided": (3, (128, 256), 2, 0, 3, {}),  # padded rows (must stay untouched)
    "vec_k4": (3, (4160, 8320), 0, 0, 2, dict(max_blocks=2)),  # > 1024 packs: 4 per thread, last threads partial
    "scalar_odd": (5, (77, 77), 0, 0, 3, dict(max_blocks=3)),  # element-wise: hidden not a multiple of the pack
    "scalar_misaligned": (4, (128, 128), 0, 1, 2, dict(max_blocks=2)),  # element-wise: rows not 16-byte aligned
    "scalar_one": (3, (1, 1), 0, 0, 2, dict(max_blocks=2)),  # hidden 1
    "scalar_k1_wide": (2, (1030, 2061), 0, 0, 2, {}),  # element-wise, more than 256 threads (k = 1)
    "vec_k1_many_cols": (2, (1000, 4096), 0, 0, 2, {}),  # reduction over several 32-column blocks, last partial
    "vec_k1_sm1": (5, (2048, 4096), 0, 0, 4, dict(sm_count=1)),  # 512 threads, 4 per SM: block 0 takes 2 rows
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("case", list(CASES))
def test_rms_norm_backward_under_harness(case, dtype):
    rows, hiddens, pad, offset, blocks, extra = CASES[case]
    n = PACK[dtype]
    hidden = hiddens[0] if dtype == torch.float32 else hiddens[1]
    stride = hidden + pad * n
    vec = case.startswith("vec")
    k = 4 if "k4" in case else 1
    torch.manual_seed(zlib.crc32(case.encode()))
    length = offset + (rows - 1) * stride + hidden

    def rows_of(t):
        return t[offset:offset + rows * stride].as_strided((rows, hidden), (stride, 1)) if rows else t

    x = torch.full((length,), float("nan"), dtype=dtype)
    g = torch.full((length,), float("nan"), dtype=dtype)
    rows_of(x).copy_(torch.randn(rows, hidden) * 2)
    rows_of(g).copy_(torch.randn(rows, hidden))
    w = torch.full((offset + hidden,), float("nan"), dtype=dtype)
    w[offset:] = torch.randn(hidden)
    grad_x = torch.full((length,), float("nan"), dtype=dtype)
    eps = 1e-5
    params = dict(dtype=ch.dtype_name(dtype), rows=rows, hidden=hidden, stride=stride, offset=offset, eps=eps, **extra)
    outputs = dict(grad_x=grad_x, grad_w=torch.full((hidden,), float("nan"), dtype=dtype))
    want_gx, want_gw = reference_rms_norm_backward(rows_of(g), rows_of(x), w[offset:], eps)
    inside = torch.zeros(length, dtype=torch.bool)
    rows_of(inside).fill_(True)

    # grad_x is a difference of terms of this size (0 up to eps at hidden 1: "scalar_one")
    gx_magnitude = rms_norm_grad_x_magnitude(rows_of(g), rows_of(x), w[offset:], eps)
    result = ch.run("rms_norm_backward", params, inputs=dict(g=g, x=x, w=w), outputs=outputs)
    r = result.reports
    assert (r["vec"], r["k"], r["blocks"], r["aten_fallback"]) == (vec, k, blocks, 0), r
    for seed in ch.SEEDS:
        got = result[seed]
        assert_close(rows_of(got["grad_x"]), want_gx, magnitude=gx_magnitude, msg=lambda m: f"seed {seed}: grad_x: {m}")
        # grad_w sums `rows` float32 products (per-block partials, then their reduction) before its one
        # rounding: the float32 comparison allows for that order (scale applies to float32 only)
        assert_close(got["grad_w"], want_gw, scale=2, msg=lambda m: f"seed {seed}: grad_w: {m}")
        assert torch.isnan(got["grad_x"][~inside].float()).all(), "wrote outside the rows"
    ch.assert_same_across_seeds(result)


# Where the kernels end and the op falls back to ATen ops (csrc/cuda/rms_norm.cu: hidden > 16384 for
# 16-bit types, 8192 for float32 when vectorised; 8192 and 4096 element-wise), as the op's host logic
# decides it in the harness entry (plan_only: nothing is launched).
REACH = {(torch.float32, True): 8192, (torch.float16, True): 16384, (torch.bfloat16, True): 16384,
         (torch.float32, False): 4096, (torch.float16, False): 8192, (torch.bfloat16, False): 8192}


@pytest.mark.parametrize("vec", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
def test_rms_norm_backward_aten_fallback_past_reach(dtype, vec):
    n, reach = PACK[dtype], REACH[(dtype, vec)]
    offset = 0 if vec else 1  # a misaligned row start selects the element-wise kernel
    for hidden, fallback in ((reach, 0), (reach + n, 1)):
        bufs = {name: torch.zeros(offset + hidden, dtype=dtype) for name in ("g", "x", "w", "grad_x")}
        params = dict(dtype=ch.dtype_name(dtype), rows=1, hidden=hidden, stride=hidden, offset=offset, eps=1e-5,
                      plan_only=1)
        r = ch.run("rms_norm_backward", params, inputs=bufs, outputs=dict(grad_w=torch.zeros(hidden, dtype=dtype)),
                   seeds=(0,)).reports
        assert (r["vec"], r["aten_fallback"]) == (vec, fallback), (hidden, r)

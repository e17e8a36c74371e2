"""torch.ops.balcony.linear_rows (the decode step's small-batch linear map) against its reference."""

import pytest
import torch

from balcony_ext import ops

# (M, N, K): rows of x, rows of the weight, shared dimension; odd sizes and vector-width tails
SHAPES = [(1, 1, 1), (1, 17, 3), (3, 769, 127), (4, 5, 16), (5, 33, 64), (8, 576, 1536), (13, 127, 769)]


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_rows_matches_reference(cpu_capability, wdtype, shape, bias):
    M, N, K = shape
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(wdtype)
    b = torch.randn(N, generator=g) if bias else None
    ref = ops.reference_linear_rows(x, w, b)
    out = ops.linear_rows(x, w, b)
    torch.testing.assert_close(out, ref, atol=1e-4 * K ** 0.5, rtol=1e-5)
    # accumulate adds into out; strided x rows (a view of a wider buffer)
    wide = torch.randn(M, K + 7, generator=g)
    acc = torch.randn(M, N, generator=g)
    expected = acc + ops.reference_linear_rows(wide[:, :K], w, b)
    ops.linear_rows(wide[:, :K], w, b, out=acc, accumulate=True)
    torch.testing.assert_close(acc, expected, atol=1e-4 * K ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("K", [96, 100, 576])
def test_linear_rows_rows_are_independent(cpu_capability, wdtype, K):
    # a row's result does not depend on the other rows in the batch (bitwise), nor on how many there are
    # (groups of up to 8, weight blocks past 8 rows): the property that makes mixed-budget batches give
    # each sequence exactly its solo tokens
    g = torch.Generator().manual_seed(K)
    x = torch.randn(19, K, generator=g)
    w = torch.randn(50, K, generator=g).to(wdtype)
    full = ops.linear_rows(x, w)
    for i in range(19):
        assert torch.equal(ops.linear_rows(x[i:i + 1].contiguous(), w)[0], full[i])
    for m in (2, 5, 8, 9, 16):
        assert torch.equal(ops.linear_rows(x[:m].contiguous(), w), full[:m])


def test_linear_rows_bf16_weights_round_x():
    # bfloat16 weights take x rounded to bfloat16 (each product then exact): x and x's rounding give the
    # same result bit for bit, and a nonzero part below bfloat16's precision changes nothing
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 200, generator=g).bfloat16().float()
    w = torch.randn(33, 200, generator=g).bfloat16()
    nudged = x * (1 + 2.0 ** -12)  # rounds back to x
    assert not torch.equal(nudged, x) and torch.equal(nudged.bfloat16().float(), x)
    assert torch.equal(ops.linear_rows(nudged, w), ops.linear_rows(x, w))


def test_linear_rows_errors():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="K = 8 columns but weight has 9"):
        ops.linear_rows(x, torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="x and out must be float32"):
        ops.linear_rows(x.double(), w.double())
    with pytest.raises(RuntimeError, match="weight must be float32, bfloat16, Q8 blocks"):
        ops.linear_rows(x, w.half())
    with pytest.raises(RuntimeError, match="out must be"):
        ops.linear_rows(x, w, out=torch.empty(2, 4))
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear_rows(x, w, torch.randn(4))


def test_linear_rows_opcheck():
    x, w, b = torch.randn(3, 40), torch.randn(9, 40), torch.randn(9)
    torch.library.opcheck(torch.ops.balcony.linear_rows.default, (x, w, b, torch.empty(3, 9), False))
    torch.library.opcheck(torch.ops.balcony.linear_rows.default, (x, w.bfloat16(), None, torch.empty(3, 9), True))


# Q8, Q4 and Q4_1 weights: K a multiple of 32; odd row counts and N, every CPU instruction set
Q8_SHAPES = [(1, 1, 32), (1, 17, 64), (3, 769, 96), (8, 576, 1536), (9, 33, 576), (13, 127, 160)]
BLOCKS = {"q8": (ops.quantize_q8, ops.dequantize_q8), "q4": (ops.quantize_q4, ops.dequantize_q4),
          "q4_1": (ops.quantize_q4_1, ops.dequantize_q4_1)}


@pytest.mark.parametrize("fmt", ["q8", "q4", "q4_1"])
@pytest.mark.parametrize("shape", Q8_SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_rows_blocks_match_dequantised_reference(cpu_capability, fmt, shape, bias):
    M, N, K = shape
    quant, dequant = BLOCKS[fmt]
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = quant(torch.randn(N, K, generator=g) + (0.5 if fmt == "q4_1" else 0.0))  # (Q4_1: blocks off zero too)
    b = torch.randn(N, generator=g) if bias else None
    # x is rounded to int16 per row (the reference does the same): the float error left is the kernel's
    # float32 sum of per-block products, far below what the rounding of x moves (checked: float x is off)
    got = ops.linear_rows(x, w, b)
    tol = 1e-6 * K ** 0.5 * (4 if fmt == "q4_1" else 1)  # (Q4_1: the minimums' terms, a second float32 sum)
    torch.testing.assert_close(got, ops.reference_linear_rows(x, w, b), atol=tol, rtol=1e-5)
    unrounded = x @ dequant(w).T + (b if bias else 0)
    if K >= 576:
        assert not torch.allclose(got, unrounded, atol=tol, rtol=1e-5)
    acc = torch.randn(M, N, generator=g)
    expected = acc + ops.reference_linear_rows(x, w, b)
    ops.linear_rows(x, w, b, out=acc, accumulate=True)
    torch.testing.assert_close(acc, expected, atol=1e-4 * K ** 0.5, rtol=1e-5)
    for i in range(M):  # rows stay independent (bitwise)
        assert torch.equal(ops.linear_rows(x[i:i + 1].contiguous(), w, b)[0], ops.linear_rows(x, w, b)[i])


def test_quantize_q8_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 96, generator=g)
    w[1, :32] = 0  # an all-zero block: scale 0, values 0
    w[2, 40] = 1000.0  # one large weight sets its block's scale
    q = ops.quantize_q8(w)
    assert q.dtype == torch.uint8 and q.shape == (5, 96 + 6)
    back = ops.dequantize_q8(q)
    assert torch.equal(back[1, :32], torch.zeros(32))
    blocks = w.reshape(5, 3, 32)
    err = (back.reshape(5, 3, 32) - blocks).abs()
    assert (err <= blocks.abs().amax(-1, keepdim=True) / 127 * 0.5 * 1.01 + 1e-7).all()  # half a step
    # the layout: int8 values, then the float16 scales
    assert torch.equal(q[:, :96].view(torch.int8).float().reshape(5, 3, 32) * q[:, 96:].view(torch.float16).float()
                       .reshape(5, 3, 1), back.reshape(5, 3, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.quantize_q8(torch.randn(4, 33))


def test_quantize_q4_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 96, generator=g)
    w[1, :32] = 0  # an all-zero block: scale 0, values 0
    w[2, 40] = -1000.0  # one large weight sets its block's scale and is kept exactly (it maps to -8)
    q = ops.quantize_q4(w)
    assert q.dtype == torch.int8 and q.shape == (5, 48 + 6)
    back = ops.dequantize_q4(q)
    assert torch.equal(back[1, :32], torch.zeros(32)) and back[2, 40] == w[2, 40].half().float()
    blocks = w.reshape(5, 3, 32)
    err = (back.reshape(5, 3, 32) - blocks).abs()
    step = blocks.abs().amax(-1, keepdim=True) / 8
    # half a step, except past +7.5 steps on the side opposite the largest value (clamped to +7)
    edge = (blocks / -step.clamp(min=1e-12) * torch.sign(blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)))) > 7.5
    assert (err <= torch.where(edge, step, step * 0.5) * 1.01 + 1e-6).all()
    # the layout: byte i of a block holds column i (low nibble) and column 16 + i (high), then the scales
    raw = q.view(torch.uint8)
    v = raw[0, :16].int()
    scale = raw[0, 48:50].view(torch.float16).float()
    torch.testing.assert_close(back[0, :16], ((v & 15) - 8).float() * scale)
    torch.testing.assert_close(back[0, 16:32], ((v >> 4) - 8).float() * scale)
    assert torch.equal(ops.quantize_q4(back), q)  # rounding twice changes nothing
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.quantize_q4(torch.randn(4, 33))


def test_quantize_q4_1_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 96, generator=g) + 3.0  # blocks far from zero: the minimum carries them
    w[1, :32] = 0.25  # a constant block: scale 0, every value the minimum
    q = ops.quantize_q4_1(w)
    assert q.dtype == torch.int16 and q.shape == (5, (48 + 12) // 2)
    back = ops.dequantize_q4_1(q)
    assert torch.equal(back[1, :32], torch.full((32,), 0.25))
    blocks = w.reshape(5, 3, 32)
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    err = (back.reshape(5, 3, 32) - blocks).abs()
    assert (err <= step * 0.5 * 1.01 + 2e-3).all()  # half a step (+ the float16 rounding of the minimum)
    # the layout: nibbles as Q4's, then the float16 scales, then the float16 minimums
    raw = q.view(torch.uint8)
    v = raw[0, :16].int()
    scale, low = raw[0, 48:50].view(torch.float16).float(), raw[0, 54:56].view(torch.float16).float()
    torch.testing.assert_close(back[0, :16], (v & 15).float() * scale + low)
    torch.testing.assert_close(back[0, 16:32], (v >> 4).float() * scale + low)
    assert torch.equal(ops.quantize_q4_1(back), q)  # rounding twice changes nothing
    # a matrix already on Q4_1 grids (both ends of every block used) is held exactly
    grid = torch.randint(0, 16, (7, 64), generator=g).float()
    grid[:, ::32], grid[:, 1::32] = 0, 15
    d = (torch.rand(7, 2, 1, generator=g) + 0.01).half().float()
    m = torch.randn(7, 2, 1, generator=g).half().float()
    exact = (grid.reshape(7, 2, 32) * d + m).reshape(7, 64)
    assert torch.equal(ops.dequantize_q4_1(ops.quantize_q4_1(exact)), exact)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.quantize_q4_1(torch.randn(4, 33))


def test_linear_rows_blocks_errors():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="Q8 weight row holds whole blocks of 32"):
        ops.linear_rows(x, torch.zeros(3, 35, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="Q4 weight row holds whole blocks of 32"):
        ops.linear_rows(x, torch.zeros(3, 35, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="Q4_1 weight row holds whole blocks of 32"):
        ops.linear_rows(x, torch.zeros(3, 11, dtype=torch.int16))
    with pytest.raises(RuntimeError, match="K = 64 columns but weight has 32"):
        ops.linear_rows(x, ops.quantize_q4_1(torch.randn(3, 32)))
    with pytest.raises(RuntimeError, match="K = 64 columns but weight has 32"):
        ops.linear_rows(x, ops.quantize_q8(torch.randn(3, 32)))
    with pytest.raises(RuntimeError, match="K = 64 columns but weight has 32"):
        ops.linear_rows(x, ops.quantize_q4(torch.randn(3, 32)))


@pytest.mark.parametrize("fmt", ["q8", "q4", "q4_1"])
def test_linear_rows_blocks_opcheck(fmt):
    x, w = torch.randn(3, 64), BLOCKS[fmt][0](torch.randn(9, 64))
    torch.library.opcheck(torch.ops.balcony.linear_rows.default, (x, w, None, torch.empty(3, 9), False))

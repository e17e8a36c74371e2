"""torch.ops.balcony.decode_attention against the plain-PyTorch reference."""

import math

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_decode_attention
from conftest import device_dtype_params
from tolerances import assert_close

# (B, Hq, Hkv, D, S, seq_lens)
CASES = [
    (1, 9, 3, 64, 769, [769]),  # SmolLM2 heads, full cache
    (3, 9, 3, 64, 300, [1, 0, 257]),  # an empty sequence, a single entry
    (7, 4, 4, 96, 129, [129, 1, 64, 33, 100, 2, 77]),  # no GQA, D = 96
    (2, 32, 8, 128, 2049, [2049, 1500]),  # GQA 4, long
    (3, 8, 1, 80, 65, [17, 65, 40]),  # GQA 8, D = 80
    (1, 3, 1, 72, 31, [31]),  # D = 72: vector tails on every width
    # the CPU kernel's paths by head size and group (V rows in head passes, column chunks, tails)
    (2, 6, 1, 64, 47, [47, 33]),  # GQA 6, D = 64: passes of 4 + 2 heads
    (1, 12, 4, 128, 95, [95]),  # GQA 3, D = 128: passes of 2 + 1 heads
    (2, 16, 2, 128, 40, [40, 23]),  # GQA 8, D = 128
    (1, 4, 2, 256, 70, [70]),  # D = 256
    (1, 6, 2, 192, 37, [37]),  # D = 192: chunks of columns
    (1, 4, 1, 32, 50, [50]),  # D = 32
]


def make_inputs(B, Hq, Hkv, D, S, lens, device, dtype, seed=0, poison=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(device, dtype)
    kc = (torch.randn(B, Hkv, S, D, generator=g) * 2).to(device, dtype)
    vc = torch.randn(B, Hkv, S, D, generator=g).to(device, dtype)
    if poison:  # entries at and beyond each length must not matter
        for b, n in enumerate(lens):
            kc[b, :, n:] = float("nan")
            vc[b, :, n:] = float("inf") if b % 2 else 1e30
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}x{}_D{}_S{}".format(*c[:5]))
def test_decode_attention(cpu_capability, device, dtype, case):
    q, kc, vc, lens = make_inputs(*case, device, dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    want = reference_decode_attention(q, kc, vc, lens, scale)
    got = ops.decode_attention(q, kc, vc, lens, scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_close(got, want)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 0])
def test_decode_attention_splits_agree(cpu_capability, device, dtype, num_splits):
    """Any split count gives the reference's answer (more splits than positions included)."""
    q, kc, vc, lens = make_inputs(3, 12, 4, 64, 517, [517, 5, 300], device, dtype, seed=1)
    lens = lens.long()
    want = reference_decode_attention(q, kc, vc, lens, 0.2)
    assert_close(ops.decode_attention(q, kc, vc, lens, 0.2, num_splits=num_splits), want)


# (window, softcap): a sliding window shorter than some rows, longer than others; Gemma 2's caps
WINDOWED = [(1, 0.0), (7, 0.0), (64, 0.0), (1000, 0.0), (0, 20.0), (0, 0.5), (40, 50.0)]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("window,softcap", WINDOWED)
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_decode_attention_window_and_softcap(cpu_capability, device, dtype, window, softcap, num_splits):
    """The last `window` entries of each row only, soft-capped scores: the reference's answer at any
    split count (rows shorter than, equal to and longer than the window; an empty row gives zeros)."""
    q, kc, vc, lens = make_inputs(4, 8, 2, 64, 301, [301, 0, 7, 150], device, dtype, seed=3)
    kc[:, :, :300] *= 3  # large scores, where a cap bites
    if window:  # entries before each row's window must not matter either
        for b, n in enumerate(lens.tolist()):
            kc[b, :, :max(0, n - window)] = float("nan")
            vc[b, :, :max(0, n - window)] = 1e30
    want = reference_decode_attention(q, kc, vc, lens, 0.125, window=window, softcap=softcap)
    got = ops.decode_attention(q, kc, vc, lens, 0.125, num_splits=num_splits, window=window, softcap=softcap)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert_close(got, want)
    if softcap:  # the cap changes the answer (so the test would see it ignored)
        assert not torch.allclose(want.float(), reference_decode_attention(q, kc, vc, lens, 0.125, window=window).float(),
                                  atol=1e-2)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_decode_attention_zero_length_and_large_scores(cpu_capability, device, dtype):
    q, kc, vc, lens = make_inputs(2, 4, 2, 64, 40, [0, 40], device, dtype, seed=2)
    kc[1] *= 30  # scores in the thousands: the online softmax must stay finite
    got = ops.decode_attention(q, kc, vc, lens, 1.0, num_splits=3)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert_close(got, reference_decode_attention(q, kc, vc, lens, 1.0))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_decode_attention_strided_views(cpu_capability, device, dtype):
    """query a view of [B, Hq, 2D]; caches batch slices of a larger buffer."""
    B, Hq, Hkv, D, S = 3, 6, 2, 64, 90
    q_big, kc_big, vc_big, _ = make_inputs(B + 2, Hq, Hkv, 2 * D, S, [S] * (B + 2), device, dtype, poison=False)
    q = q_big[:B, :, :D]
    kc, vc = kc_big[1 : B + 1, :, :, D:], vc_big[1 : B + 1, :, :, :D]
    lens = torch.tensor([90, 13, 51], device=device)
    want = reference_decode_attention(q, kc, vc, lens, 0.125)
    assert_close(ops.decode_attention(q, kc, vc, lens, 0.125, num_splits=2), want)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_decode_attention_opcheck(device, dtype):
    q, kc, vc, lens = make_inputs(2, 6, 2, 64, 33, [33, 7], device, dtype, poison=False)
    torch.library.opcheck(torch.ops.balcony.decode_attention.default, (q, kc, vc, lens, 0.125, 0))
    torch.library.opcheck(torch.ops.balcony.decode_attention.default, (q, kc, vc, lens.long(), 0.125, 3))
    torch.library.opcheck(torch.ops.balcony.decode_attention.default, (q, kc, vc, lens, 0.125, 2, 5, 30.0))


def test_decode_attention_errors():
    q, kc, vc, lens = make_inputs(2, 6, 4, 64, 33, [33, 7], "cpu", torch.float32, poison=False)
    with pytest.raises(RuntimeError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        ops.decode_attention(q, kc, vc, lens)
    q = q[:, :4]
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 34 is out of range"):
        ops.decode_attention(q, kc, vc, torch.tensor([3, 34]))
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = -1 is out of range"):
        ops.decode_attention(q, kc, vc, torch.tensor([-1, 3]))
    with pytest.raises(RuntimeError, match="seq_lens must be int32 or int64"):
        ops.decode_attention(q, kc, vc, lens.float())
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.decode_attention(q, kc.bfloat16(), vc.bfloat16(), lens)
    with pytest.raises(RuntimeError, match="key_cache must be"):
        ops.decode_attention(q, kc[..., :32], vc[..., :32], lens)
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        ops.decode_attention(q, kc.transpose(2, 3).contiguous().transpose(2, 3), vc, lens)
    with pytest.raises(RuntimeError, match="num_splits must be >= 0"):
        ops.decode_attention(q, kc, vc, lens, 0.1, num_splits=-2)
    with pytest.raises(RuntimeError, match=r"seq_lens must be \[B\]"):
        ops.decode_attention(q, kc, vc, lens[:1])
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        ops.decode_attention(q, kc, vc, lens, 0.1, window=-1)
    for cap in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="softcap must be a finite number >= 0"):
            ops.decode_attention(q, kc, vc, lens, 0.1, softcap=cap)


@pytest.mark.cuda
def test_decode_attention_cuda_head_dim_limits():
    q, kc, vc, lens = make_inputs(1, 2, 1, 20, 8, [8], "cuda", torch.bfloat16, poison=False)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.decode_attention(q, kc, vc, lens)

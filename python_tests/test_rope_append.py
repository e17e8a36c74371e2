"""torch.ops.balcony.rope_append against the plain-PyTorch reference."""

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_rope_append
from conftest import device_dtype_params
from tolerances import assert_close

# (B, T, Hq, Hkv, D, S)
SHAPES = [
    (1, 1, 9, 3, 64, 37),  # SmolLM2 decode
    (3, 5, 4, 2, 18, 11),  # D/2 = 9: vector tails
    (2, 7, 32, 8, 128, 50),
    (3, 1, 6, 6, 80, 9),
    (1, 3, 2, 1, 2, 4),  # D = 2
]


def make_inputs(B, T, Hq, Hkv, D, S, device, dtype, seed=0, P=None, rot_half=None):
    g = torch.Generator().manual_seed(seed)
    P = P or S + 3
    q = torch.randn(B, T, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype)
    kc = torch.randn(B, Hkv, S, D, generator=g).to(device, dtype)
    vc = torch.randn(B, Hkv, S, D, generator=g).to(device, dtype)
    pos = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)]).to(device)
    theta = torch.rand(P, rot_half or D // 2, generator=g) * 6.3 + torch.arange(P).unsqueeze(1) * 0.01
    return q, k, v, kc, vc, pos, theta.cos().to(device), theta.sin().to(device)


def run_both(q, k, v, kc, vc, pos, cos, sin):
    want = [t.clone() for t in (q, kc, vc)]
    reference_rope_append(want[0], k, v, want[1], want[2], pos, cos, sin)
    got = [q.clone(), kc.clone(), vc.clone()]
    ops.rope_append(got[0], k, v, got[1], got[2], pos, cos, sin)
    return got, want


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_append(cpu_capability, device, dtype, shape):
    inputs = make_inputs(*shape, device, dtype)
    got, want = run_both(*inputs)
    for g, w in zip(got, want):
        assert_close(g, w)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)  # values are copied exactly


# (B, T, Hq, Hkv, D, S, R/2): the first R dimensions of a head rotated, the rest unchanged
PARTIAL = [
    (1, 1, 24, 8, 128, 37, 48),  # Phi-4-mini: 3/4 of 128
    (2, 3, 4, 2, 64, 11, 16),  # Pythia: 1/4 of 64
    (3, 2, 3, 1, 22, 9, 5),  # odd: vector tails in the rotation and the copy
    (1, 2, 2, 2, 40, 6, 1),  # one rotated pair
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", PARTIAL)
def test_rope_append_partial_rotary(cpu_capability, device, dtype, shape):
    B, T, Hq, Hkv, D, S, R2 = shape
    q, k, v, kc, vc, pos, cos, sin = make_inputs(B, T, Hq, Hkv, D, S, device, dtype, seed=7, rot_half=R2)
    got, want = run_both(q, k, v, kc, vc, pos, cos, sin)
    for g, w in zip(got, want):
        assert_close(g, w)
    # the unrotated dimensions pass bit-exactly: query in place, key into the cache
    assert torch.equal(got[0][..., 2 * R2:], q[..., 2 * R2:])
    for b in range(B):
        assert torch.equal(got[1][b, :, pos[b], 2 * R2:], k[b, :, :, 2 * R2:].transpose(0, 1))
    # as Hugging Face applies partial rotary: rotate_half on x[..., :R], x[..., R:] appended
    c = torch.cat([cos[pos], cos[pos]], -1).unsqueeze(2).to(device)
    s = torch.cat([sin[pos], sin[pos]], -1).unsqueeze(2).to(device)
    x = q.float()
    xr = x[..., : 2 * R2]
    rot = torch.cat([-xr[..., R2:], xr[..., :R2]], -1)
    assert_close(got[0], torch.cat([xr * c + rot * s, x[..., 2 * R2:]], -1).to(dtype))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rope_append_partial_opcheck(device, dtype):
    inputs = make_inputs(2, 3, 4, 2, 32, 10, device, dtype, seed=8, rot_half=4)
    torch.library.opcheck(torch.ops.balcony.rope_append.default, inputs)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rope_append_padding(cpu_capability, device, dtype):
    q, k, v, kc, vc, pos, cos, sin = make_inputs(3, 4, 4, 2, 64, 16, device, dtype, seed=1)
    pos[0, 0] = -1
    pos[1, :] = -1
    pos[2, 3] = -7
    got, want = run_both(q, k, v, kc, vc, pos, cos, sin)
    for g, w in zip(got, want):
        assert_close(g, w)
    # padded query rows are bit-identical; a fully padded sequence leaves its cache untouched
    assert torch.equal(got[0][1], q[1]) and torch.equal(got[0][0, 0], q[0, 0])
    assert torch.equal(got[1][1], kc[1]) and torch.equal(got[2][1], vc[1])


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rope_append_fused_qkv_views(cpu_capability, device, dtype):
    """query/key/value as head views of one fused projection output [B, T, (Hq + 2 Hkv) D]."""
    B, T, Hq, Hkv, D, S = 2, 3, 9, 3, 64, 20
    _, _, _, kc, vc, pos, cos, sin = make_inputs(B, T, Hq, Hkv, D, S, device, dtype, seed=2)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=device).to(dtype)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D :].view(B, T, Hkv, D)
    assert not q.is_contiguous()
    want_q, want_kc, want_vc = q.clone(), kc.clone(), vc.clone()
    reference_rope_append(want_q, k, v, want_kc, want_vc, pos, cos, sin)
    kc2, vc2 = kc.clone(), vc.clone()
    ops.rope_append(q, k, v, kc2, vc2, pos, cos, sin)
    assert_close(qkv[..., : Hq * D].view(B, T, Hq, D), want_q)
    assert_close(kc2, want_kc)
    assert_close(vc2, want_vc)
    # the key and value parts of the fused buffer are inputs only
    torch.testing.assert_close(k, qkv[..., Hq * D : (Hq + Hkv) * D].view(B, T, Hkv, D), rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_rope_append_matches_hf_rotate_half(cpu_capability, device):
    """cos/sin built from an inv_freq as HF does (cat(c, c)), applied the HF way."""
    B, T, H, D, S = 2, 3, 4, 64, 12
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos, sin = ops.rope_tables(inv_freq, S)
    q, k, v, kc, vc, pos, _, _ = make_inputs(B, T, H, H, D, S, device, torch.float32, seed=3)
    cos, sin = cos.to(device), sin.to(device)

    def hf(x, p):  # x [B,T,H,D]
        c = torch.cat([cos[p], cos[p]], -1).unsqueeze(2)
        s = torch.cat([sin[p], sin[p]], -1).unsqueeze(2)
        rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
        return x * c + rot * s

    want_q, want_k = hf(q, pos), hf(k, pos)
    ops.rope_append(q, k, v, kc, vc, pos, cos, sin)
    assert_close(q, want_q)
    for b in range(B):
        assert_close(kc[b, :, pos[b]], want_k[b].transpose(0, 1))
        assert_close(vc[b, :, pos[b]], v[b].transpose(0, 1))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_rope_append_opcheck(device, dtype):
    inputs = make_inputs(2, 3, 4, 2, 32, 10, device, dtype, seed=4)
    torch.library.opcheck(torch.ops.balcony.rope_append.default, inputs)


def test_rope_append_errors():
    q, k, v, kc, vc, pos, cos, sin = make_inputs(2, 3, 4, 2, 32, 10, "cpu", torch.float32, seed=5, P=12)
    kc0, vc0 = kc.clone(), vc.clone()
    bad = pos.clone()
    bad[1, 2] = 10  # == S
    with pytest.raises(RuntimeError, match="position 10 .* out of range"):
        ops.rope_append(q, k, v, kc, vc, bad, cos, sin)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)  # checked before anything is written
    small_cos, small_sin = cos[:8], sin[:8]
    bad[1, 2] = 9  # < S but >= P
    with pytest.raises(RuntimeError, match="position 9 .* P = 8"):
        ops.rope_append(q, k, v, kc, vc, bad, small_cos, small_sin)
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        ops.rope_append(q[..., :31], k[..., :31], v[..., :31], kc[..., :31].contiguous(), vc[..., :31].contiguous(),
                        pos, cos, sin)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.rope_append(q, k, v, kc.double(), vc, pos, cos, sin)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.rope_append(q, k, v, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, pos, cos, sin)
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        ops.rope_append(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, kc, vc, pos, cos, sin)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        ops.rope_append(q, k, v, kc, vc, pos.int(), cos, sin)
    with pytest.raises(RuntimeError, match="cos and sin must be float32"):
        ops.rope_append(q, k, v, kc, vc, pos, cos.double(), sin.double())
    for width in (17, 0):  # wider than D/2; empty
        with pytest.raises(RuntimeError, match=r"cos and sin must be \[P, R/2\] with R <= D = 32"):
            ops.rope_append(q, k, v, kc, vc, pos, cos.new_zeros(12, width), sin.new_zeros(12, width))
    with pytest.raises(RuntimeError, match="key_cache must be"):
        ops.rope_append(q, k, v, kc[:, :1].contiguous(), vc[:, :1].contiguous(), pos, cos, sin)


@pytest.mark.cuda
def test_rope_append_cuda_skips_out_of_range_positions():
    """On CUDA positions are not copied to the host to be checked: one >= S or >= P is skipped."""
    q, k, v, kc, vc, pos, cos, sin = make_inputs(2, 3, 4, 2, 32, 10, "cuda", torch.float32, seed=6, P=12)
    pos[0, 1] = 10  # == S
    pos[1, 0] = 50
    got, want = run_both(q, k, v, kc, vc, torch.where(pos >= 10, -1, pos), cos, sin)
    got2 = [q.clone(), kc.clone(), vc.clone()]
    ops.rope_append(got2[0], k, v, got2[1], got2[2], pos, cos, sin)
    for g, w in zip(got2, want):
        assert_close(g, w)

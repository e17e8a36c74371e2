"""balcony/rope_append.cuh (rotary embedding of query and key, key/value appended to the KV cache) run
on the CPU under the CUDA execution harness, against the plain-PyTorch reference, for every
scheduling seed.

    pytest -m cuda_harness python_tests/test_cuda_harness_rope_append.py
"""

import zlib

import pytest
import torch

import cuda_harness as ch
from balcony_ext.reference import reference_rope_append
from tolerances import assert_close

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(B, T, Hq, Hkv, D, S, P, positions, layout="separate", head_pad=0, token_pad=0, offset=0, table_offset=0,
          rot_half=None):
    return dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, P=P, positions=positions, layout=layout, head_pad=head_pad,
                token_pad=token_pad, offset=offset, table_offset=table_offset,
                rot_half=D // 2 if rot_half is None else rot_half)


# Packed path: R/2 (the rotated half; D/2 for full rotary) and D a multiple of the 16-byte pack (8 for 16-bit types, 4 for float32), every base and
# stride a multiple of the pack. Padding tokens (< 0) are skipped; so is a position >= S or >= P.
CASES = {
    # decode (T = 1), GQA 2, one padding row
    "decode_packed": _case(3, 1, 4, 2, 64, 8, 8, [[5], [0], [-1]]),
    # prefill from a fused QKV projection (q, k, v strided views of one buffer), GQA 3, left padding
    "prefill_qkv_packed": _case(2, 3, 6, 2, 64, 8, 8, [[0, 1, 2], [-1, 3, 4]], layout="qkv", token_pad=8),
    # GQA 8 (one kv head), D 128, padding between heads and between tokens
    "gqa8_strided_packed": _case(2, 2, 8, 1, 128, 4, 4, [[2, 3], [0, -1]], head_pad=8, token_pad=16),
    # scalar path: D/2 = 10 not a multiple of any pack
    "scalar_odd_half": _case(2, 2, 3, 1, 20, 5, 6, [[3, 4], [-1, 0]]),
    # scalar path: q/k/v and cache pointers one element off 16-byte alignment
    "scalar_misaligned": _case(2, 2, 4, 2, 64, 6, 6, [[1, 2], [4, 5]], offset=1),
    # scalar path: only the cos/sin tables misaligned
    "scalar_table_misaligned": _case(1, 3, 2, 2, 64, 4, 4, [[0, 1, 3]], table_offset=1),
    # scalar path from a fused QKV with an odd row stride: 12 heads x 64 items > 256 threads (loop wraps)
    "scalar_qkv_wrap": _case(2, 1, 8, 4, 128, 3, 3, [[2], [1]], layout="qkv", token_pad=1),
    # positions past the cache (>= S) or the tables (>= P) are skipped, like padding
    "out_of_range_cache": _case(2, 2, 4, 2, 64, 4, 8, [[3, 4], [7, 1]]),
    "out_of_range_table": _case(2, 2, 4, 2, 64, 8, 5, [[4, 5], [7, 2]]),
    # partial rotary (the first R = 2 * rot_half dimensions of a head; Phi-4-mini rotates 3/4 of them)
    "partial_packed": _case(2, 2, 6, 2, 64, 6, 6, [[0, 5], [-1, 2]], layout="qkv", rot_half=16),
    "scalar_partial_odd": _case(2, 2, 3, 1, 20, 5, 6, [[3, 4], [-1, 0]], rot_half=3),
}


def _storage_len(offset, sizes, strides):
    return offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1


def _layouts(c):
    """(storage lengths, {name: (buffer, offset, sizes, strides)}) for query, key, value."""
    B, T, Hq, Hkv, D, off = c["B"], c["T"], c["Hq"], c["Hkv"], c["D"], c["offset"]
    if c["layout"] == "qkv":
        st = (Hq + 2 * Hkv) * D + c["token_pad"]
        views = {
            "query": ("query", off, (B, T, Hq, D), (T * st, st, D, 1)),
            "key": ("query", off + Hq * D, (B, T, Hkv, D), (T * st, st, D, 1)),
            "value": ("query", off + (Hq + Hkv) * D, (B, T, Hkv, D), (T * st, st, D, 1)),
        }
        return {"query": _storage_len(off, (B, T, Hq + 2 * Hkv, D), (T * st, st, D, 1))}, views
    views, lens = {}, {}
    for name, H in (("query", Hq), ("key", Hkv), ("value", Hkv)):
        sh = D + c["head_pad"]
        st = H * sh + c["token_pad"]
        strides = (T * st, st, sh, 1)
        views[name] = (name, off, (B, T, H, D), strides)
        lens[name] = _storage_len(off, (B, T, H, D), strides)
    return lens, views


def _packed(c, dtype, views):
    """Whether launch_rope_append takes the 16-byte packed path for this case (its own test)."""
    n = 16 // torch.tensor([], dtype=dtype).element_size()
    ok = c["rot_half"] % n == 0 and c["D"] % n == 0 and c["offset"] % n == 0 and c["table_offset"] % 4 == 0
    for _, off, _, strides in views.values():
        ok = ok and off % n == 0 and all(s % n == 0 for s in strides[:3])
    return ok


def _view(bufs, spec):
    buf, off, sizes, strides = spec
    return bufs[buf].as_strided(sizes, strides, off)


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("case", list(CASES))
def test_rope_append_under_harness(case, dtype):
    c = CASES[case]
    B, T, Hq, Hkv, D, S, P = (c[k] for k in ("B", "T", "Hq", "Hkv", "D", "S", "P"))
    torch.manual_seed(zlib.crc32(case.encode()))
    lens, views = _layouts(c)
    assert _packed(c, dtype, views) == (not case.startswith("scalar")), "the case misses its path"
    # Every storage starts as NaN (padding between views included), the views then get random values.
    bufs = {name: torch.full((n,), float("nan"), dtype=dtype) for name, n in lens.items()}
    for spec in views.values():
        _view(bufs, spec).copy_(torch.randn(spec[2]) * 2)
    off = c["offset"]
    cache_len = off + B * Hkv * S * D
    key_cache = torch.full((cache_len,), float("nan"), dtype=dtype)
    value_cache = torch.full((cache_len,), float("nan"), dtype=dtype)
    positions = torch.tensor(c["positions"], dtype=torch.int64)
    assert positions.shape == (B, T)
    toff = c["table_offset"]
    R2 = c["rot_half"]
    angles = torch.arange(P, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(R2) / R2))[None]
    cos = torch.cat([torch.full((toff,), float("nan")), angles.cos().reshape(-1)])
    sin = torch.cat([torch.full((toff,), float("nan")), angles.sin().reshape(-1)])

    strides = {}
    for name, key in (("query", "q"), ("key", "k"), ("value", "v")):
        _, o, _, st = views[name]
        strides.update({f"{key}_sb": st[0], f"{key}_st": st[1], f"{key}_sh": st[2], f"{key}_offset": o})
    params = dict(dtype=ch.dtype_name(dtype), qkv=int(c["layout"] == "qkv"), T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, P=P,
                  tokens=B * T, cache_offset=off, table_offset=toff, rot_half=R2, **strides)
    inputs = dict(positions=positions, cos=cos, sin=sin)
    outputs = dict(query=bufs["query"], key_cache=key_cache, value_cache=value_cache)
    for name in ("key", "value"):
        if name in bufs:
            inputs[name] = bufs[name]

    # The reference on copies; positions the kernel skips (>= S or >= P) read as padding there.
    want = {name: t.clone() for name, t in bufs.items()}
    want_kc, want_vc = key_cache.clone(), value_cache.clone()
    skipped = (positions < 0) | (positions >= S) | (positions >= P)
    cache4 = lambda t: t[off:].view(B, Hkv, S, D)  # noqa: E731
    reference_rope_append(_view(want, views["query"]), _view(want, views["key"]), _view(want, views["value"]),
                          cache4(want_kc), cache4(want_vc), torch.where(skipped, -1, positions),
                          cos[toff:].view(P, R2), sin[toff:].view(P, R2))

    # Which storage elements the op writes: the query rows of kept tokens, the cache slots they name.
    ids = torch.arange(lens["query"])
    q_ids = ids.as_strided(views["query"][2], views["query"][3], views["query"][1])
    q_written = torch.zeros(lens["query"], dtype=torch.bool)
    q_written[q_ids[~skipped].reshape(-1)] = True
    cache_written = torch.zeros(cache_len, dtype=torch.bool)
    cw = cache4(cache_written)
    for b in range(B):
        for t in range(T):
            if not skipped[b, t]:
                cw[b, :, positions[b, t]] = True

    def bits(t):
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

    result = ch.run("rope_append", params, inputs, outputs)
    for seed in ch.SEEDS:
        got = result[seed]
        msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
        assert_close(got["query"][q_written], want["query"][q_written], msg=msg)
        assert torch.equal(bits(got["query"][~q_written]), bits(bufs["query"][~q_written])), \
            "query storage changed outside the rows of kept tokens (padding, skipped tokens, k/v, gaps)"
        assert_close(got["key_cache"][cache_written], want_kc[cache_written], msg=msg)
        # value rows are copied: bit-exact
        assert torch.equal(bits(got["value_cache"][cache_written]), bits(want_vc[cache_written]))
        for name in ("key_cache", "value_cache"):
            assert torch.isnan(got[name][~cache_written].float()).all(), f"{name} written outside the kept slots"
    ch.assert_same_across_seeds(result)

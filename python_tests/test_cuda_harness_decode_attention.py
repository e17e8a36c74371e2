"""balcony/decode_attention.cuh (split-KV decode attention: split kernel + merge kernel) run on the CPU
under the CUDA execution harness, against the plain-PyTorch reference, for every scheduling seed.

    pytest -m cuda_harness python_tests/test_cuda_harness_decode_attention.py
"""

import math
import zlib

import pytest
import torch

import cuda_harness as ch
from balcony_ext.reference import reference_decode_attention
from tolerances import assert_close

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACK = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte pack


def _case(B, Hkv, G, D, S, lens, splits, expect_splits=None, lens64=False, pos_pad=0, head_pad=0, q_pad=0,
          elem_pad=False, q_offset=0, sm_count=None, copied=(), window=0, softcap=0.0):
    """splits: the op's num_splits argument (0: its automatic choice); expect_splits: the count the op's
    host logic must pick (default: splits); copied: the tensors the op must copy to a contiguous layout."""
    return dict(B=B, Hkv=Hkv, G=G, D=D, S=S, lens=lens, splits=splits,
                expect_splits=splits if expect_splits is None else expect_splits, lens64=lens64, pos_pad=pos_pad,
                head_pad=head_pad, q_pad=q_pad, elem_pad=elem_pad, q_offset=q_offset, sm_count=sm_count,
                copied=set(copied), window=window, softcap=softcap)


# One split: the split kernel writes the output directly. Several splits: partials + merge kernel,
# with splits past a sequence's length empty. Query heads per block: 1, 2, 4 or 8 (G > 8: several
# blocks per kv head, the last one partial). Lengths: 0 (zeros out), 1, odd, S, > S (clamped to S).
# Cache entries past each length are NaN; so is every gap of a strided layout. Padding (pos_pad,
# head_pad, q_pad) is in units of the dtype's 16-byte pack, as the kernel needs, or in elements
# (elem_pad: the op copies such a tensor to a contiguous one first, as it does a misaligned one).
# The split count and chunk come from the op's host logic (balcony/decode_attention_launch.h) in the
# harness entry; the test states the count it expects.
CASES = {
    "one_split_g1": _case(3, 2, 1, 64, 37, [0, 1, 37], 1),
    "one_split_g3_d128": _case(2, 1, 3, 128, 21, [21, 9], 1),
    "splits_g1_empty_tail": _case(2, 2, 1, 64, 40, [7, 40], 4),  # len 7: splits 1..3 empty
    "splits_g3": _case(2, 2, 3, 64, 40, [17, 0], 3),
    "splits_g4_d128": _case(2, 1, 4, 128, 50, [23, 50], 4),
    "splits_g8": _case(1, 1, 8, 64, 33, [33], 2),
    "g12_one_split": _case(2, 1, 12, 64, 20, [19, 5], 1),  # 2 blocks per kv head: 8 + 4 heads
    "g12_splits": _case(1, 1, 12, 64, 24, [24], 3),
    "clamped_len64": _case(2, 2, 2, 64, 16, [16 + 5, 3], 2, lens64=True),  # len > S reads S entries
    "strided": _case(2, 2, 4, 64, 19, [11, 19], 2, lens64=True, pos_pad=1, head_pad=2, q_pad=1),
    "d96_npack_not_pow2": _case(1, 2, 2, 96, 15, [15], 1),  # lanes own packs < npack only
    "d256_two_packs_per_lane": _case(1, 1, 2, 256, 10, [9], 2),  # float32: 64 packs, 2 per lane
    "splits_clamped_to_s": _case(1, 1, 2, 64, 5, [5], 8, expect_splits=5),  # 8 asked, S = 5: chunks of 1
    # automatic: 4 * 132 SMs want many blocks, positions of at least 64 allow 3 splits (chunk 44)
    "auto_splits": _case(1, 1, 1, 64, 130, [130], 0, expect_splits=3),
    # automatic on a 1-SM device: 4 blocks (B * Hkv) already fill it
    "auto_one_split_sm1": _case(2, 2, 1, 64, 130, [130, 77], 0, expect_splits=1, sm_count=1),
    # caches with rows not a whole number of packs apart, query misaligned by one element: copied first
    "unpacked_copied": _case(2, 1, 2, 64, 9, [9, 4], 2, pos_pad=1, q_offset=1, elem_pad=True,
                             copied=("query", "key_cache", "value_cache")),
    # sliding windows: splits wholly before a row's window do no work, the split holding its start
    # begins there; rows shorter than the window attend to everything
    "window_splits": _case(3, 2, 2, 64, 40, [40, 5, 23], 4, window=9),  # chunks of 10: rows start in splits 3 / 0 / 1
    "window_one_split": _case(2, 1, 3, 64, 21, [21, 12], 1, window=12),
    "window_one_entry": _case(1, 2, 1, 64, 17, [17], 3, window=1),
    # soft-capped scores (Gemma 2), alone and with a window
    "softcap": _case(2, 2, 2, 64, 33, [33, 6], 2, softcap=1.5),
    "softcap_window": _case(2, 1, 4, 128, 50, [50, 31], 4, window=20, softcap=3.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("case", list(CASES))
def test_decode_attention_under_harness(case, dtype):
    c = CASES[case]
    B, Hkv, G, D, S = c["B"], c["Hkv"], c["G"], c["D"], c["S"]
    Hq, n = Hkv * G, (1 if c["elem_pad"] else PACK[dtype])
    torch.manual_seed(zlib.crc32(case.encode()))
    # Strided layouts: query [B, Hq, D] and caches [B, Hkv, S, D] with gaps after each row / head.
    q_sh = D + c["q_pad"] * n
    q_sb = Hq * q_sh
    k_ss = D + c["pos_pad"] * n
    k_sh = S * k_ss + c["head_pad"] * n
    k_sb = Hkv * k_sh
    q_off = c["q_offset"]
    query = torch.full((q_off + B * q_sb,), float("nan"), dtype=dtype)
    qv = query[q_off:].as_strided((B, Hq, D), (q_sb, q_sh, 1))
    qv.copy_(torch.randn(B, Hq, D))
    caches = []
    lens = torch.tensor(c["lens"], dtype=torch.int64 if c["lens64"] else torch.int32)
    for _ in range(2):
        cache = torch.full((B * k_sb,), float("nan"), dtype=dtype)
        cv = cache.as_strided((B, Hkv, S, D), (k_sb, k_sh, k_ss, 1))
        for b in range(B):
            m = min(int(lens[b]), S)
            cv[b, :, :m] = torch.randn(Hkv, m, D) * 2  # NaN garbage beyond the length
        caches.append((cache, cv))
    (kc, kv), (vc, vv) = caches
    scale = 1.0 / math.sqrt(D)

    params = dict(dtype=ch.dtype_name(dtype), B=B, Hkv=Hkv, G=G, D=D, S=S, q_sb=q_sb, q_sh=q_sh, k_sb=k_sb, k_sh=k_sh,
                  k_ss=k_ss, v_sb=k_sb, v_sh=k_sh, v_ss=k_ss, q_offset=q_off, seq_lens_64=int(c["lens64"]),
                  num_splits=c["splits"], scale=repr(scale), window=c["window"], softcap=repr(c["softcap"]))
    if c["sm_count"] is not None:
        params["sm_count"] = c["sm_count"]
    inputs = dict(query=query, key_cache=kc, value_cache=vc, seq_lens=lens)
    outputs = dict(out=torch.full((B, Hq, D), float("nan"), dtype=dtype))

    want = reference_decode_attention(qv, kv, vv, lens.clamp(max=S), scale, window=c["window"], softcap=c["softcap"])
    result = ch.run("decode_attention", params, inputs, outputs)
    r = result.reports
    assert r["num_splits"] == c["expect_splits"], r
    assert r["chunk"] * r["num_splits"] >= S, r  # the splits cover the cache
    for name in ("query", "key_cache", "value_cache"):
        assert r[f"{name}_copied"] == (name in c["copied"]), (name, r)
    for seed in ch.SEEDS:
        assert_close(result[seed]["out"], want, msg=lambda m: f"seed {seed}: {m}")
        for b in range(B):
            if int(lens[b]) == 0:
                assert torch.equal(result[seed]["out"][b].float(), torch.zeros(Hq, D)), "empty sequence: zeros"
    ch.assert_same_across_seeds(result)

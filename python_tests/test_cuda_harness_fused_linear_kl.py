"""balcony/fused_linear_kl.cuh (the fused KL(p_teacher || p_student) row kernel) run on the CPU under the
CUDA execution harness, for every scheduling seed. The logits are computed here (as the driver's GEMM
would); the per-row KL and the gradient the kernel writes into the student logits are compared with
a reference computed from the same logits: grad_scale * (softmax(s) - softmax(t)).

    pytest -m cuda_harness python_tests/test_cuda_harness_fused_linear_kl.py
"""

import zlib

import pytest
import torch

import cuda_harness as ch
from tolerances import assert_close

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACK = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte pack
HIDDEN = 32

# (rows, vocab, student row padding, teacher row padding, element offset of both, -inf teacher logits).
# Blocks: one per row, 64..512 threads (vocab / pack on the vector path, vocab / 4 on the scalar one).
CASES = {
    "v1": (3, 1, 0, 0, 0, False),  # scalar, one element, 63 idle threads
    "v3": (2, 3, 0, 5, 0, False),  # scalar, strided teacher
    "v127": (3, 127, 1, 2, 0, False),  # scalar, both strided
    "v1000_vec": (3, 1000, 0, 0, 0, False),  # vector path (1000 % 8 == 0), several warps, last partial
    "v1000_vec_strided": (2, 1000, 8, 16, 0, False),  # vector path, padded rows (pack multiples)
    "v1000_misaligned": (2, 1000, 0, 0, 1, False),  # scalar path: rows not 16-byte aligned; 4 per thread
    "v4160_vec_wrap": (2, 4160, 0, 0, 0, False),  # vector path, more packs than the 512 threads (16-bit)
    "v1000_masked_teacher": (2, 1000, 0, 0, 0, True),  # teacher -inf on some entries (probability 0)
}


def _reference(s, t, grad_scale):
    """Per-row KL(softmax(t) || softmax(s)) and grad_scale * (softmax(s) - softmax(t)), float32."""
    s, t = s.float(), t.float()
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)
    pt = log_pt.exp()
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    return kl, grad_scale * (log_ps.exp() - pt)


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss_only"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_kl_under_harness(case, compute_grad, dtype):
    rows, vocab, s_pad, t_pad, offset, masked = CASES[case]
    if case.endswith("wrap") and dtype == torch.float32:
        vocab = 2080  # 520 packs of 4: still wraps, half the work
    if "vec" in case:
        assert vocab % PACK[dtype] == 0 and s_pad % PACK[dtype] == 0 and t_pad % PACK[dtype] == 0
    torch.manual_seed(zlib.crc32(case.encode()))
    # Logits as the driver makes them: hidden states @ weight^T, rounded to the dtype.
    weight = torch.randn(vocab, HIDDEN) / HIDDEN**0.5
    s_logits = ((torch.randn(rows, HIDDEN) * 2) @ weight.t()).to(dtype)
    t_logits = ((torch.randn(rows, HIDDEN) * 3) @ weight.t()).to(dtype)
    if masked:
        t_logits[:, torch.randperm(vocab)[: vocab // 3]] = float("-inf")
    ss, ts = vocab + s_pad, vocab + t_pad
    s = torch.full((offset + rows * ss,), float("nan"), dtype=dtype)
    t = torch.full((offset + rows * ts,), float("nan"), dtype=dtype)
    sv = s[offset:].view(rows, ss)[:, :vocab]
    tv = t[offset:].view(rows, ts)[:, :vocab]
    sv.copy_(s_logits)
    tv.copy_(t_logits)
    grad_scale = 1.0 / 3
    params = dict(dtype=ch.dtype_name(dtype), rows=rows, vocab=vocab, s_stride=ss, t_stride=ts, s_offset=offset,
                  t_offset=offset, grad_scale=repr(grad_scale), compute_grad=int(compute_grad))
    want_kl, want_grad = _reference(s_logits, t_logits, grad_scale)
    result = ch.run("fused_kl", params, inputs=dict(t=t), outputs=dict(s=s, loss=torch.full((rows,), float("nan"))))

    def bits(x):
        return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)

    inside = torch.zeros(s.numel(), dtype=torch.bool)
    inside[offset:].view(rows, ss)[:, :vocab] = True
    for seed in ch.SEEDS:
        got = result[seed]
        msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
        # float32 loss from the same logits: float32 summation order only (plus exp/log rounding).
        assert_close(got["loss"], want_kl, dtype=torch.float32, scale=10, msg=msg)
        g = got["s"][offset:].view(rows, ss)[:, :vocab]
        if compute_grad:
            assert_close(g, want_grad, msg=msg)
        else:
            assert torch.equal(bits(got["s"][inside]), bits(s[inside])), "logits changed without compute_grad"
        assert torch.isnan(got["s"][~inside].float()).all(), "wrote outside the rows"
    ch.assert_same_across_seeds(result)

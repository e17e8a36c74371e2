"""balcony/sample_tokens.cuh (greedy / temperature / top-k / top-p sampling) run on the CPU under the
CUDA execution harness, against reference_sample_tokens with the same uniforms, for every
scheduling seed.

    pytest -m cuda_harness python_tests/test_cuda_harness_sample_tokens.py
"""

import zlib

import pytest
import torch

import cuda_harness as ch
from balcony_ext.reference import reference_sample_tokens

pytestmark = pytest.mark.cuda_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# One row per setting (temperature, top_k, top_p); None for top_k stands for "more than the vocab".
SETTINGS = [
    (0.0, 0, 1.0),  # greedy
    (-1.0, 5, 0.5),  # greedy (temperature <= 0 ignores the filters)
    (1.0, 0, 1.0),  # full distribution
    (0.7, 5, 1.0),  # top-k
    (1.3, 0, 0.9),  # top-p
    (0.9, 50, 0.8),  # both
    (1.0, 1, 1.0),  # top-k 1 = greedy
    (0.8, 0, 0.0),  # top-p 0 keeps only the most likely
    (1.0, None, 0.95),  # top_k >= vocab keeps all, then top-p
]


# Each bisection step (top-k, top-p: about 31 each) is two block reductions; at 512 threads under
# ASan a filtered row costs about a second per seed. So the big vocabularies run the filters on
# fewer rows and schedules (one of each kind: warp-greedy and uniform); the small ones run all.
BIG_ROWS = [0, 2, 5]  # greedy, full distribution, top-k + top-p
BIG_SEEDS = {1000: ch.SEEDS[:4], 5000: ch.SEEDS[:2]}


def _run(logits_rows, temperature, top_k, top_p, uniform, dtype, pad=3, offset=1, seeds=ch.SEEDS):
    """Runs the kernel on rows of logits stored with `pad` elements between rows and `offset` before
    the first (NaN there: the kernel must not read them); returns each seed's tokens."""
    rows, vocab = logits_rows.shape
    stride = vocab + pad
    storage = torch.full((offset + rows * stride,), float("nan"), dtype=dtype)
    storage[offset:].view(rows, stride)[:, :vocab] = logits_rows
    params = dict(dtype=ch.dtype_name(dtype), rows=rows, vocab=vocab, stride=stride, offset=offset)
    inputs = dict(logits=storage, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform)
    outputs = dict(out=torch.full((rows,), -1, dtype=torch.int64), scratch=torch.full((rows * vocab,), float("nan")))
    result = ch.run("sample_tokens", params, inputs, outputs, seeds=seeds)
    ch.assert_same_across_seeds(result, names=["out"])
    return {seed: result[seed]["out"] for seed in seeds}


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5000])
def test_sample_tokens_under_harness(vocab, dtype):
    torch.manual_seed(zlib.crc32(f"sample-{vocab}".encode()))
    settings = SETTINGS
    if vocab in BIG_SEEDS and (dtype != torch.float32 or vocab > 1000):  # every setting: float32 at 1000
        settings = [SETTINGS[i] for i in BIG_ROWS]
    rows = len(settings)
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    temperature = torch.tensor([s[0] for s in settings], dtype=torch.float32)
    top_k = torch.tensor([vocab + 3 if s[1] is None else s[1] for s in settings], dtype=torch.int64)
    top_p = torch.tensor([s[2] for s in settings], dtype=torch.float32)
    uniform = torch.rand(rows)
    want = reference_sample_tokens(logits, temperature, top_k, top_p, uniform)
    seeds = BIG_SEEDS.get(vocab, ch.SEEDS)
    for seed, got in _run(logits, temperature, top_k, top_p, uniform, dtype, seeds=seeds).items():
        assert torch.equal(got, want), f"seed {seed}: got {got.tolist()}, want {want.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
@pytest.mark.parametrize("vocab", [7, 100, 5000])
def test_sample_tokens_greedy_ties_under_harness(vocab, dtype):
    """The maximum at several indices (owned by different threads, and twice by one thread): greedy
    gives the lowest; top-k 1 and top-p 0 keep every tied maximum and pick among them by the uniform
    (those rows only up to vocab 100, for time)."""
    torch.manual_seed(zlib.crc32(f"ties-{vocab}".encode()))
    logits = (torch.randn(vocab) * 2).clamp(max=5.0)
    ties = sorted({vocab - 1, vocab // 2, 3 % vocab, min(vocab - 1, 3 + 512), min(vocab - 1, 3 + 32)})
    logits[ties] = 8.0
    rows = 5 if vocab <= 100 else 2
    logits = logits.expand(rows, vocab).to(dtype)
    temperature = torch.tensor([0.0, -1.0, 1.0, 0.5, 0.5])[:rows]
    top_k = torch.tensor([0, 3, 1, 0, 0], dtype=torch.int64)[:rows]
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])[:rows]
    uniform = torch.tensor([0.3, 0.9, 0.99, 0.0, 1.0 - 2**-24])[:rows]
    want = reference_sample_tokens(logits, temperature, top_k, top_p, uniform)
    assert want[:2].tolist() == [ties[0]] * 2
    if rows > 2:
        assert want[2] == ties[-1] and want[3] == ties[0] and want[4] == ties[-1]
    for seed, got in _run(logits, temperature, top_k, top_p, uniform, dtype).items():
        assert torch.equal(got, want), f"seed {seed}: got {got.tolist()}, want {want.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=ch.dtype_name)
def test_sample_tokens_uniform_edges_under_harness(dtype):
    """Uniforms 0, just below 1, out of range and NaN (clamped to [0, 1)), on aligned contiguous rows
    (no filter, so no bisection: the inverse-CDF walk and its block scan only)."""
    torch.manual_seed(7)
    vocab = 300
    uniform = torch.tensor([0.0, 1.0 - 2**-24, -0.5, 1.0, 7.0, float("nan")])
    rows = uniform.numel()
    logits = (torch.randn(vocab) * 2).expand(rows, vocab).to(dtype)
    temperature = torch.full((rows,), 0.9)
    top_k = torch.zeros(rows, dtype=torch.int64)
    top_p = torch.ones(rows)
    want = reference_sample_tokens(logits, temperature, top_k, top_p, uniform)
    assert want[2] == want[0] == want[5] and want[3] == want[4] == want[1]
    for seed, got in _run(logits, temperature, top_k, top_p, uniform, dtype, pad=0, offset=0).items():
        assert torch.equal(got, want), f"seed {seed}: got {got.tolist()}, want {want.tolist()}"

"""torch.ops.balcony.sample_tokens against the sort-based reference: exact tokens, greedy ties,
the empirical distribution, and the degenerate settings that must equal greedy."""

import pytest
import torch

from balcony_ext import ops
from balcony_ext.reference import reference_sample_tokens
from conftest import device_dtype_params

SETTINGS = [  # (temperature, top_k, top_p)
    (0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (1.0, 20, 0.5), (2.0, 3, 0.8), (-1.0, 5, 0.5),
]


def rows(value, b, dtype, device):
    return torch.full((b,), value, dtype=dtype, device=device)


def both(logits, temperature, top_k, top_p, uniform):
    b, dev = logits.shape[0], logits.device
    args = (rows(temperature, b, torch.float32, dev), rows(top_k, b, torch.int64, dev),
            rows(top_p, b, torch.float32, dev), uniform)
    return torch.ops.balcony.sample_tokens(logits, *args), reference_sample_tokens(logits, *args)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("vocab", [1, 7, 1000, 49152])
@pytest.mark.parametrize("batch", [1, 5])
def test_sample_tokens_vs_reference(cpu_capability, device, dtype, vocab, batch):
    g = torch.Generator().manual_seed(vocab + batch)
    logits = (torch.randn(batch, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    for setting in SETTINGS:
        for _ in range(1 if vocab > 10000 else 3):  # the sort-based reference dominates the time
            uniform = torch.rand(batch, generator=g).to(device)
            got, want = both(logits, *setting, uniform)
            assert got.dtype == torch.int64
            assert torch.equal(got.cpu(), want.cpu()), f"setting {setting}, uniform {uniform}"


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_greedy_ties_lowest_index(cpu_capability, device, dtype):
    logits = torch.zeros(4, 37, dtype=dtype, device=device)
    logits[0, [5, 9, 30]] = 2.0
    logits[1, [36]] = 1.0
    logits[2] = -1.0  # all tied
    logits[3, [17, 18]] = 3.0
    uniform = torch.rand(4, device=device)
    got = torch.ops.balcony.sample_tokens(logits, torch.zeros(4, device=device), torch.zeros(4, dtype=torch.long,
                                          device=device), torch.ones(4, device=device), uniform)
    assert got.tolist() == [5, 36, 0, 17]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_top_k_1_and_tiny_top_p_equal_greedy(cpu_capability, device, dtype):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(5, 1000, generator=g) * 2).to(device=device, dtype=dtype)
    # a unique maximum (bfloat16 rounding can tie the top two, and ties are all kept by top-k/top-p)
    logits[torch.arange(5), logits.float().argmax(-1)] += 1
    greedy = ops.sample_tokens(logits, 0.0)
    for _ in range(4):
        u = torch.rand(5, device=device)
        assert torch.equal(ops.sample_tokens(logits, 1.0, top_k=1, uniform=u), greedy)
        assert torch.equal(ops.sample_tokens(logits, 0.8, top_p=1e-6, uniform=u), greedy)
        assert torch.equal(ops.sample_tokens(logits, 0.8, top_p=0.0, uniform=u), greedy)


def filtered_probs(logits, temperature, top_k, top_p):
    """The distribution the spec samples from, computed with sort (float64 for the comparison)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    ordered = torch.sort(probs, descending=True).values
    keep = probs >= ordered[top_k - 1] if top_k else torch.ones_like(probs, dtype=torch.bool)
    ranked = ordered[ordered >= ordered[top_k - 1]] if top_k else ordered
    cum = torch.cumsum(ranked, 0)
    tau = ranked[int(torch.nonzero(cum >= top_p * probs[keep].sum())[0])]
    keep &= probs >= tau
    p = torch.where(keep, probs, torch.zeros_like(probs))
    return p / p.sum()


@pytest.mark.parametrize("setting", [(1.0, 0, 1.0), (0.8, 6, 1.0), (1.2, 0, 0.85), (1.0, 8, 0.7)])
def test_empirical_distribution(cpu_capability, setting):
    """Over a fine grid of uniforms, token frequencies equal the filtered probabilities."""
    torch.manual_seed(4)
    logits = torch.randn(1, 12) * 1.5
    m = 20000
    uniform = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    tokens = ops.sample_tokens(logits.expand(m, 12), setting[0], setting[1], setting[2], uniform.float())
    freq = torch.bincount(tokens, minlength=12).double() / m
    want = filtered_probs(logits[0], *setting)
    assert (freq[want == 0] == 0).all()
    torch.testing.assert_close(freq, want, atol=3.0 / m, rtol=0)
    # and independent random uniforms agree statistically (5 sigma)
    tokens = ops.sample_tokens(logits.expand(m, 12), setting[0], setting[1], setting[2])
    freq = torch.bincount(tokens, minlength=12).double() / m
    sigma = (want * (1 - want) / m).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-9).all()


def test_uniform_is_clamped(cpu_capability):
    logits = torch.randn(3, 100)
    lo = ops.sample_tokens(logits, 1.0, uniform=torch.zeros(3))
    hi = ops.sample_tokens(logits, 1.0, uniform=torch.full((3,), 1.0 - 2**-24))
    assert torch.equal(ops.sample_tokens(logits, 1.0, uniform=torch.full((3,), -0.5)), lo)
    assert torch.equal(ops.sample_tokens(logits, 1.0, uniform=torch.full((3,), 1.0)), hi)
    assert torch.equal(ops.sample_tokens(logits, 1.0, uniform=torch.full((3,), 7.0)), hi)
    assert torch.equal(ops.sample_tokens(logits, 1.0, uniform=torch.full((3,), float("nan"))), lo)


def test_per_row_parameters(cpu_capability):
    torch.manual_seed(5)
    logits = torch.randn(4, 300) * 2
    temperature = torch.tensor([0.0, 1.0, 0.5, 1.5])
    top_k = torch.tensor([0, 10, 0, 3], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0], dtype=torch.float64)
    for _ in range(5):
        u = torch.rand(4)
        got = torch.ops.balcony.sample_tokens(logits, temperature, top_k, top_p, u)
        assert torch.equal(got, reference_sample_tokens(logits, temperature, top_k, top_p, u))


def test_non_contiguous_rows(cpu_capability):
    logits = torch.randn(6, 2 * 513)[::2, :513]
    u = torch.rand(3)
    got, want = both(logits, 1.0, 40, 0.9, u)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_tokens_opcheck(dtype):
    logits = torch.randn(3, 65, dtype=dtype)
    args = (logits, torch.tensor([0.0, 1.0, 0.7]), torch.tensor([0, 5, 1]), torch.tensor([1.0, 0.9, 0.5]),
            torch.rand(3))
    torch.library.opcheck(torch.ops.balcony.sample_tokens, args)


def test_sample_tokens_errors():
    op = torch.ops.balcony.sample_tokens
    x = torch.randn(3, 10)
    t, k, p, u = torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.rand(3)
    with pytest.raises(RuntimeError, match="logits must have 2 dimensions"):
        op(x[0], t, k, p, u)
    with pytest.raises(RuntimeError, match="at least one column"):
        op(x[:, :0], t, k, p, u)
    with pytest.raises(RuntimeError, match="temperature must have shape \\[B\\]"):
        op(x, t[:2], k, p, u)
    with pytest.raises(RuntimeError, match="uniform must have shape \\[B\\]"):
        op(x, t, k, p, u[None])
    with pytest.raises(RuntimeError, match="top_k must be an integer tensor"):
        op(x, t, k.float(), p, u)
    with pytest.raises(RuntimeError, match="top_p must be a floating tensor"):
        op(x, t, k, p.long(), u)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        op(x.double(), t, k, p, u)

"""Repetition penalties: the logits processor against a plain reference, generate() against Hugging
Face and a hand-written greedy loop, the batcher against generate(), and bad values."""

import pytest
import torch

import balcony_ext as bx
from balcony_ext.batcher import Batcher, Request
from balcony_ext.model import attach
from balcony_ext.penalties import DRY_CAP, DRY_LONGEST, Penalties, sequence_breakers
from tiny_models import tiny_balcony

L = 6


def _model():
    m = tiny_balcony(layers=L, initializer_range=0.2)
    attach(m, [2, 4], init="random", seed=1)
    return m


def _prompts(n, lengths=(5, 9, 3)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 60, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _reference(logits, seq, start, presence, frequency, repetition):
    """One row, by the definitions: OpenAI's over the generated tokens, CTRL's over all of them."""
    out = logits.clone()
    gen = seq[start:]
    for t in set(gen):
        out[t] -= frequency * gen.count(t) + presence
    for t in set(seq):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    return out


def test_apply_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    B, V, S = 4, 37, 23
    logits = torch.randn(B, V, generator=g) * 3
    tokens = torch.randint(0, 9, (B, S), generator=g)  # few distinct ids: many repeats
    length = torch.tensor([23, 7, 1, 15])
    start = torch.tensor([5, 7, 0, 14])
    pres, freq, rep = [0.5, -1.0, 2.0, 0.0], [0.3, 0.0, -0.7, 1.9], [1.3, 0.8, 1.0, 2.0]
    p = Penalties.of(B, pres, freq, rep, start)
    got = logits.clone()
    p.apply(got, tokens, length)
    for b in range(B):
        seq = tokens[b, :length[b]].tolist()
        want = _reference(logits[b], seq, int(start[b]), pres[b], freq[b], rep[b])
        torch.testing.assert_close(got[b], want)
    assert Penalties.of(B) is None and Penalties.of(B, 0.0, [0.0] * B, 1.0) is None


def _dry_reference(logits, seq, start, mult, base, allowed, breakers=frozenset()):
    """One row, by DRY's definition: for every earlier answer position j, the longest stretch of the
    answer's last tokens equal to the tokens before j (not across a breaker, not before the answer's
    start); the token at j loses mult * base ** (n - allowed) for the longest n >= allowed."""
    out = logits.clone()
    n_all = len(seq)
    pen = {}
    for j in range(start + 1, n_all):
        n = 0
        while (j - 1 - n >= start and seq[j - 1 - n] == seq[n_all - 1 - n] and seq[n_all - 1 - n] not in breakers
               and n < DRY_LONGEST):
            n += 1
        if n >= allowed:
            pen[seq[j]] = max(pen.get(seq[j], 0.0), min(mult * base ** (n - allowed), DRY_CAP))
    for t, p in pen.items():
        out[t] -= p
    return out


def test_dry_equals_the_definition():
    g = torch.Generator().manual_seed(1)
    B, V, S = 5, 29, 41
    logits = torch.randn(B, V, generator=g) * 3
    tokens = torch.randint(0, 4, (B, S), generator=g)  # few distinct ids: many repeats
    tokens[1, 10:34] = torch.tensor([7, 8, 9, 10, 11, 12] * 4)  # a loop
    tokens[4, :40] = 6  # one token over and over: repeats past DRY_CAP
    length = torch.tensor([41, 34, 1, 20, 40])
    start = torch.tensor([3, 8, 0, 19, 0])
    mult, base, allowed = [0.8, 1.0, 0.5, 2.0, 3.0], [1.75, 2.0, 1.5, 1.0, 16.0], [2, 1, 3, 2, 1]
    breakers = torch.zeros(V, dtype=torch.bool)
    breakers[[2, 9]] = True
    for mask in (None, breakers):
        p = Penalties.of(B, dry=mult, dry_base=base, dry_allowed_length=allowed, start=start, breakers=mask)
        got = logits.clone()
        p.apply(got, tokens, length)
        broken = frozenset(mask.nonzero().flatten().tolist()) if mask is not None else frozenset()
        for b in range(B):
            seq = tokens[b, :length[b]].tolist()
            want = _dry_reference(logits[b], seq, int(start[b]), mult[b], base[b], allowed[b], broken)
            torch.testing.assert_close(got[b], want, msg=f"row {b}, breakers {mask is not None}")
        assert (got != logits).any(1)[1] and (got[4] <= logits[4] - DRY_CAP + 1e-3).any()  # (the loops)
    # with the other penalties: each applied as alone, in order (DRY last)
    p = Penalties.of(B, 0.5, 0.3, 1.2, start, dry=0.8)
    got = logits.clone()
    p.apply(got, tokens, length)
    for b in range(B):
        seq = tokens[b, :length[b]].tolist()
        want = _reference(logits[b], seq, int(start[b]), 0.5, 0.3, 1.2)
        torch.testing.assert_close(got[b], _dry_reference(want, seq, int(start[b]), 0.8, 1.75, 2))
    assert Penalties.of(B, dry=0.0) is None


def test_sequence_breakers_are_the_tokens_holding_one():
    from tiny_models import tiny_chat_balcony

    m = tiny_chat_balcony()
    mask = sequence_breakers(m.tokenizer, m.adapter.vocab_size)
    texts = [m.tokenizer.decode([i]) for i in range(m.adapter.vocab_size)]
    assert mask.tolist() == [any(c in t for c in ("\n", ":", '"', "*")) for t in texts] and mask.any()
    assert sequence_breakers(m.tokenizer, m.adapter.vocab_size) is mask  # decoded once
    assert not sequence_breakers(None, 11).any()


@pytest.mark.parametrize("native", [True, False], ids=["native", "composed"])
def test_dry_greedy_equals_a_plain_loop_and_the_batcher(native, cpu_capability):
    m = _model()
    prompts = [p * 2 for p in _prompts(3)]
    exits, mult = [2, L, 4], [0.8, 1.5, 0.0]
    out = bx.generate(m, prompts, exit_layer=exits, max_new_tokens=24, stop_tokens=[], native=native,
                      dry_multiplier=mult, dry_allowed_length=[2, 1, 2], frequency_penalty=[0.0, 0.0, 0.2])
    plain = bx.generate(m, prompts, exit_layer=exits, max_new_tokens=24, stop_tokens=[], native=native)
    for b, ids in enumerate(prompts):
        seq = list(ids)
        for _ in range(24):
            with torch.no_grad():
                logits = m(torch.tensor([seq]), exits=[exits[b]])[exits[b]][0, -1].float()
            logits = _reference(logits, seq, len(ids), 0.0, [0.0, 0.0, 0.2][b], 1.0)
            seq.append(int(_dry_reference(logits, seq, len(ids), mult[b], 1.75, [2, 1, 2][b]).argmax()))
        assert out[b].tokens == seq[len(ids):]
    assert out[0].tokens != plain[0].tokens or out[1].tokens != plain[1].tokens
    # the batcher, requests mixed with and without DRY
    bt = Batcher(m, max_batch=3, max_len=96, calibration=None)
    kws = [dict(exit_layer=e, dry_multiplier=x, dry_allowed_length=a) for e, x, a in zip(exits, mult, [2, 1, 2])]
    kws[2]["frequency_penalty"] = 0.2
    reqs = [bt.submit(Request(p, max_new_tokens=24, stop_tokens=[], **kw)) for p, kw in zip(prompts, kws)]
    while bt.busy:
        bt.iterate()
    assert [r.tokens for r in reqs] == [o.tokens for o in out]


def test_repetition_penalty_equals_hugging_face_generate(cpu_capability):
    m = _model()
    ids = _prompts(1)[0] * 3  # (a random model repeats little: make the penalty bite)
    ref = m.adapter.hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                pad_token_id=0, repetition_penalty=3.0)[0, len(ids):].tolist()
    plain = bx.generate(m, ids, max_new_tokens=30, stop_tokens=[])
    out = bx.generate(m, ids, max_new_tokens=30, stop_tokens=[], repetition_penalty=3.0)
    assert out.tokens == ref and out.tokens != plain.tokens


@pytest.mark.parametrize("native", [True, False], ids=["native", "composed"])
def test_penalised_greedy_equals_a_plain_loop_per_sequence(native, cpu_capability):
    m = _model()
    prompts = _prompts(3)
    exits, pres, freq, rep = [2, L, 4], [1.5, 0.0, 0.4], [0.5, 1.0, 0.0], [1.0, 1.0, 1.4]
    plain = bx.generate(m, prompts, exit_layer=exits, max_new_tokens=10, stop_tokens=[], native=native)
    out = bx.generate(m, prompts, exit_layer=exits, max_new_tokens=10, stop_tokens=[], native=native,
                      presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep)
    for b, ids in enumerate(prompts):
        seq = list(ids)
        for _ in range(10):
            with torch.no_grad():
                logits = m(torch.tensor([seq]), exits=[exits[b]])[exits[b]][0, -1].float()
            seq.append(int(_reference(logits, seq, len(ids), pres[b], freq[b], rep[b]).argmax()))
        assert out[b].tokens == seq[len(ids):]
    assert [o.tokens for o in out] != [o.tokens for o in plain]


def test_batcher_penalties_equal_generate():
    m = _model()
    b = Batcher(m, max_batch=3, max_len=64, calibration=None)
    kws = [dict(frequency_penalty=0.8), dict(), dict(presence_penalty=1.0, repetition_penalty=1.3, exit_layer=2)]
    reqs = [b.submit(Request(p, max_new_tokens=9, stop_tokens=[], **kw)) for p, kw in zip(_prompts(3), kws)]
    while b.busy:
        b.iterate()
    for r, kw in zip(reqs, kws):
        alone = bx.generate(m, r.prompt_ids, max_new_tokens=9, stop_tokens=[], calibration=None, **kw)
        assert r.tokens == alone.tokens


@pytest.mark.parametrize("kw,match", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(frequency_penalty=[0.1, 0.2]), "per-sequence"),
    (dict(dry_multiplier=-0.1), "dry_multiplier"), (dict(dry_multiplier=float("inf")), "dry_multiplier"),
    (dict(dry_multiplier=0.8, dry_base=0.9), "dry_base"), (dict(dry_allowed_length=0), "dry_allowed_length"),
    (dict(dry_allowed_length=2.0), "dry_allowed_length"), (dict(dry_multiplier=[0.8, 0.0]), "per-sequence"),
])
def test_bad_penalties_are_refused(kw, match):
    m = _model()
    with pytest.raises(ValueError, match=match):
        bx.generate(m, _prompts(3), max_new_tokens=2, **kw)
    if "per-sequence" not in match:
        with pytest.raises(ValueError, match=match):
            Batcher(m, max_batch=1, max_len=32, calibration=None).submit(Request(_prompts(1)[0], max_new_tokens=4, **kw))

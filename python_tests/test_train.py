"""Training the exits: loss, schedule, learning, and exact interrupt-and-resume."""

import math
import sys

import pytest
import torch

from balcony_ext.data import Corpus
from balcony_ext.model import attach
from balcony_ext.train import distill_loss, lr_factor, reference_distill_loss, train
from tiny_models import tiny_balcony


def _corpus(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: repeated random phrases
    phrases = torch.randint(0, 256, (20, 8), generator=g)
    picks = torch.randint(0, 20, (n // 8,), generator=g)
    ids = phrases[picks].reshape(-1)
    return Corpus(ids, ids[:256].clone(), ["train"], ["held"], "synthetic")


class Stop(Exception):
    """Raised by a training callback: an interruption at a chosen step."""


def stop_at(n):
    def callback(step, info):
        if step == n:
            raise Stop

    return callback


def test_distill_loss_matches_kl_definition():
    torch.manual_seed(0)
    s, t, w = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16), torch.randn(40, 16)
    loss = distill_loss(s, w, t)
    p = torch.softmax(t @ w.T, -1)
    q = torch.softmax(s @ w.T, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert distill_loss(t, w, t).abs().item() < 1e-5
    torch.testing.assert_close(reference_distill_loss(s, w, t), loss)
    torch.testing.assert_close(distill_loss(s, w, t @ w.T, teacher_is_logits=True), loss.detach())


def test_distill_loss_uses_fused_op_when_present(monkeypatch):
    from balcony_ext import ops

    calls = []

    def fake(student, weight, teacher, teacher_is_logits=False, reduction="mean", chunk_size=0):
        calls.append((student.shape, teacher.shape, teacher_is_logits, reduction))
        return reference_distill_loss(student, weight, teacher, teacher_is_logits)

    monkeypatch.setattr(ops, "fused_linear_kl", fake, raising=False)
    s, t, w = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(40, 16)
    torch.testing.assert_close(distill_loss(s, w, t), reference_distill_loss(s, w, t))
    assert calls == [((10, 16), (10, 16), False, "mean")]


def test_fused_and_reference_loss_agree():
    from balcony_ext import ops

    torch.manual_seed(0)
    s = torch.randn(37, 24, requires_grad=True)
    t, w = torch.randn(37, 24), torch.randn(111, 24)
    a = ops.fused_linear_kl(s, w, t)
    b = reference_distill_loss(s, w, t)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga, = torch.autograd.grad(a, s)
    gb, = torch.autograd.grad(b, s)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


def test_lr_schedule():
    total, warm = 100, 5
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[-1] < 0.01 and f[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))


def test_training_reduces_kl_and_keeps_base():
    model = tiny_balcony()
    attach(model, [1, 2], init="random", seed=0)
    base = {k: v.clone() for k, v in model.base.state_dict().items()}
    out = train(model, data=_corpus(), tokens=40 * 4 * 32, lr=3e-3, batch_size=4, seq_len=32, progress=False)
    h = out["history"]
    assert len(h) == 40 and set(h[0]["loss_per_exit"]) == {1, 2}
    first = sum(x["loss"] for x in h[:5]) / 5
    last = sum(x["loss"] for x in h[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert model.tokens_trained == 40 * 4 * 32 and model.last_loss == h[-1]["loss"]
    assert all(torch.equal(v, base[k]) for k, v in model.base.state_dict().items())


def test_interrupt_and_resume_is_exact(tmp_path):
    kw = dict(data=_corpus(), tokens=6 * 2 * 16 * 2, lr=1e-3, batch_size=2, seq_len=16, grad_accum=2,
              warmup=0.2, progress=False, seed=3)

    ref = tiny_balcony()
    attach(ref, [1, 3], init="random", seed=0)
    ref_out = train(ref, **kw)

    run = tiny_balcony()
    attach(run, [1, 3], init="random", seed=0)
    with pytest.raises(Stop):
        train(run, checkpoint_dir=tmp_path, checkpoint_every=2, callback=stop_at(3), **kw)
    # a fresh process: new model, exits initialised differently, state comes from the checkpoint
    fresh = tiny_balcony()
    attach(fresh, [1, 3], init="random", seed=99)
    out = train(fresh, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    assert out["steps"] == 6 and len(out["history"]) == 6
    for k, v in ref.balconies.state_dict().items():
        assert torch.equal(fresh.balconies.state_dict()[k], v), k
    assert [h["loss"] for h in out["history"]] == [h["loss"] for h in ref_out["history"]]
    assert (tmp_path / "exits.safetensors").exists()

    with pytest.raises(ValueError, match="settings differ"):
        train(fresh, checkpoint_dir=tmp_path, **{**kw, "lr": 2e-3})


def test_train_without_exits_or_data_errors():
    model = tiny_balcony()
    with pytest.raises(ValueError, match="no exits"):
        train(model, data=_corpus(), tokens=10, progress=False)
    attach(model, [2])
    with pytest.raises(ValueError, match="fewer than"):
        train(model, data=_corpus(n=64), tokens=10, seq_len=32, batch_size=4, progress=False)


@pytest.mark.parametrize("tokens", [0, -5])
def test_train_needs_a_positive_token_count(tokens):
    model = tiny_balcony()
    attach(model, [2])
    before = {k: v.clone() for k, v in model.balconies.state_dict().items()}
    with pytest.raises(ValueError, match=rf"tokens \(the number of training tokens\) must be positive, got {tokens}"):
        train(model, data=_corpus(), tokens=tokens, progress=False)
    assert model.tokens_trained == 0
    assert all(torch.equal(v, before[k]) for k, v in model.balconies.state_dict().items())


def test_affine_baseline_trains_on_the_same_batches_and_resumes(tmp_path):
    from balcony_ext.evaluate import evaluate

    corpus = _corpus()
    kw = dict(data=corpus, tokens=4 * 2 * 16, lr=1e-3, clip=1e-3, batch_size=2, seq_len=16, warmup=0.25, progress=False,
              seed=1, affine_baseline=True)
    ref = tiny_balcony()
    attach(ref, [1, 3], init="random", seed=0)
    ref_out = train(ref, **kw)
    lenses = ref_out["affine"]
    assert sorted(lenses) == [1, 3]
    # the lenses learned: on held-out text they are closer to the full model than at initialisation
    from balcony_ext.affine import new_affine_exits

    trained = evaluate(ref, data=corpus, seq_len=16, batch_size=2, baselines=(), affine=lenses, progress=False)
    initial = evaluate(ref, data=corpus, seq_len=16, batch_size=2, baselines=(),
                       affine=new_affine_exits(ref, [1, 3]), progress=False)
    for k in (1, 3):
        assert trained.row("affine", k)["kl"] < initial.row("affine", k)["kl"]
        assert all(f"affine@{k}" in h["loss_per_exit"] for h in ref_out["history"])
    # the exits' own trajectory is unchanged by training the baseline beside them
    plain = tiny_balcony()
    attach(plain, [1, 3], init="random", seed=0)
    train(plain, **{**kw, "affine_baseline": False})
    for k, v in plain.balconies.state_dict().items():
        torch.testing.assert_close(ref.balconies.state_dict()[k], v)

    run = tiny_balcony()
    attach(run, [1, 3], init="random", seed=0)
    with pytest.raises(Stop):
        train(run, checkpoint_dir=tmp_path, checkpoint_every=1, callback=stop_at(2), **kw)
    fresh = tiny_balcony()
    attach(fresh, [1, 3], init="random", seed=5)
    out = train(fresh, checkpoint_dir=tmp_path, checkpoint_every=1, **kw)
    for k in (1, 3):
        for name, v in lenses[k].state_dict().items():
            assert torch.equal(out["affine"][k].state_dict()[name], v), (k, name)

    rep = evaluate(fresh, data=corpus, seq_len=16, batch_size=2, affine=out["affine"], progress=False)
    assert {r["exit"] for r in rep.rows if r["method"] == "affine"} == {1, 3}
    with pytest.raises(ValueError, match="missing"):
        evaluate(fresh, data=corpus, seq_len=16, affine={1: lenses[1]}, progress=False)


def test_reference_loss_impl_trains_the_same():
    kw = dict(data=_corpus(), tokens=3 * 2 * 16, lr=1e-3, batch_size=2, seq_len=16, progress=False, seed=2)
    a, b = tiny_balcony(), tiny_balcony()
    attach(a, [2], init="random", seed=0)
    attach(b, [2], init="random", seed=0)
    ha = train(a, **kw)["history"]
    hb = train(b, loss_impl="reference", **kw)["history"]
    for x, y in zip(ha, hb):
        assert abs(x["loss"] - y["loss"]) < 1e-4 * max(1.0, abs(y["loss"]))
    for k, v in a.balconies.state_dict().items():
        torch.testing.assert_close(b.balconies.state_dict()[k], v, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="loss_impl"):
        train(a, loss_impl="fast", **kw)


@pytest.mark.parametrize("model_type,vocab", [("llama", None), ("llama", 100), ("gemma2", None)])
def test_bf16_teacher_logits_shared_by_the_exits_train_as_each_exit_computing_them(monkeypatch, model_type, vocab):
    # a bf16 step computes the teacher's logits once for every exit and lens; past SHARED_LOGITS_MAX
    # each loss computes them itself: the same training either way (gemma2: soft-capped logits)
    from balcony_ext.shortlist import set_shortlist

    train_mod = sys.modules["balcony_ext.train"]  # (the package exports a function of that name)
    kw = dict(data=_corpus(), tokens=3 * 2 * 16, lr=1e-3, batch_size=2, seq_len=16, progress=False, seed=3,
              bf16=True, vocab=vocab, affine_baseline=True)
    runs = []
    for limit in (train_mod.SHARED_LOGITS_MAX, 0):
        monkeypatch.setattr(train_mod, "SHARED_LOGITS_MAX", limit)
        m = tiny_balcony(model_type)
        with torch.no_grad():
            m.adapter.lm_head.weight.mul_(30)  # logits well past gemma2's cap of 5
        attach(m, [1, 2], init="random", seed=0)
        set_shortlist(m, list(range(200)))
        runs.append((train(m, **kw), m))
    (a, ma), (b, mb) = runs
    for x, y in zip(a["history"], b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-2)
    for k, v in ma.balconies.state_dict().items():
        torch.testing.assert_close(mb.balconies.state_dict()[k], v, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("kw,match", [
    (dict(tokens=float("inf")), r"tokens \(the number of training tokens\) must be positive, got inf"),
    (dict(tokens=True), r"tokens \(the number of training tokens\) must be positive, got True"),
    (dict(tokens="100"), r"tokens \(the number of training tokens\) must be positive, got '100'"),
    (dict(lr=0), "lr must be a finite number > 0, got 0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(lr="1e-3"), "lr must be a finite number > 0"),
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(batch_size=-1), "batch_size must be a positive int, got -1"),
    (dict(batch_size=True), "batch_size must be a positive int, got True"),
    (dict(seq_len=0), "seq_len must be a positive int, got 0"),
    (dict(seq_len=2.5), "seq_len must be a positive int, got 2.5"),
    (dict(seq_len=300), r"seq_len=300 is past the model's 256 positions \(max_position_embeddings\)"),
    (dict(grad_accum=0), "grad_accum must be a positive int, got 0"),
    (dict(grad_accum=-1), "grad_accum must be a positive int, got -1"),
    (dict(warmup=-1), r"warmup .* must be in \[0, 1\], got -1"),
    (dict(warmup=float("nan")), r"warmup .* must be in \[0, 1\], got nan"),
    (dict(clip=float("nan")), "clip must be a finite number >= 0"),
    (dict(clip=-1), "clip must be a finite number >= 0"),
    (dict(weight_decay=-1), "weight_decay must be a finite number >= 0"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive int, got 0"),
    (dict(seed="x"), r"seed must be an int in \[0, 2\*\*32\), got 'x'"),
    (dict(seed=1.5), r"seed must be an int in \[0, 2\*\*32\), got 1.5"),
    (dict(bf16="no"), "bf16 must be True, False or None"),
    (dict(callback=5), "callback must be a function"),
    (dict(data=None), None),
    (dict(data=[("a", 0.5, 1)]), r"a data mixture is a list of \(data, weight\) pairs"),
    # truthy non-bools were taken as True before
    (dict(resume="no"), "resume must be True or False, got str 'no'"),
    (dict(progress="no"), "progress must be True or False, got str 'no'"),
    (dict(affine_baseline="no"), "affine_baseline must be True or False, got str 'no'"),
    (dict(affine_baseline=None), "affine_baseline must be True or False, got NoneType None"),
    # a ready Corpus has its split: heldout was silently ignored before
    (dict(heldout=0.2), r"heldout=0.2 cannot apply: data is a ready Corpus that already has its held-out split"),
    (dict(heldout=1.5), r"heldout must be a fraction in \[0, 1\), got 1.5"),
    (dict(heldout=True), r"heldout must be a fraction in \[0, 1\), got True"),
])
def test_bad_training_arguments_named_and_nothing_trained(kw, match):
    model = tiny_balcony()
    attach(model, [2])
    before = {k: v.clone() for k, v in model.balconies.state_dict().items()}
    args = dict(data=_corpus(), tokens=2 * 4 * 16, batch_size=4, seq_len=16, progress=False) | kw
    if match is None:
        with pytest.raises(TypeError, match=r"data must be a Corpus, a name \('self', 'shakespeare'"):
            train(model, **args)
    else:
        with pytest.raises(ValueError, match=match):
            train(model, **args)
    assert model.tokens_trained == 0
    assert all(torch.equal(v, before[k]) for k, v in model.balconies.state_dict().items())


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), True, "0.5", -1, 0])
def test_mixture_weights_checked_before_any_part_is_prepared(weight):
    model = tiny_balcony()
    attach(model, [2])
    # "no-such-data" would fail if it were prepared: the weights are checked first
    with pytest.raises(ValueError, match="mixture weights must be positive finite numbers"):
        train(model, data=[(_corpus(), weight), ("no-such-data", 1.0)], tokens=128, batch_size=4, seq_len=16,
              progress=False)



def test_checkpoint_dir_must_be_a_path(tmp_path):
    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(TypeError, match=r"checkpoint_dir must be a str or os.PathLike \(a file path\) or None "
                                        r"\(no checkpoints\), got int 5"):
        train(model, data=_corpus(), tokens=2 * 4 * 16, batch_size=4, seq_len=16, progress=False, checkpoint_dir=5)
    assert model.tokens_trained == 0  # (a TypeError from pathlib after the data was prepared before)


def _restricted_first_loss(model, kw, rows):
    """The first step's mean KL over the exits, by hand, with the head cut to `rows` (teacher and exits
    renormalised there): what train(vocab=...) must report."""
    from balcony_ext.train import micro_batch

    ids = micro_batch(kw["data"].train_blocks(kw["seq_len"]), 0, kw["batch_size"], kw.get("seed", 0))
    with torch.no_grad():
        hidden, teacher = model.frozen_forward(ids, model.exits)
        w = model.adapter.lm_head.weight[rows]
        return sum(reference_distill_loss(model.exit_hidden(k, hidden[k]), w, teacher).item()
                   for k in model.exits) / len(model.exits)


@pytest.mark.parametrize("loss_impl", ["fused", "reference"])
def test_vocab_restricts_the_kl_to_the_shortlist_head(loss_impl):
    from balcony_ext.shortlist import set_shortlist

    kw = dict(data=_corpus(), tokens=3 * 4 * 32, lr=3e-3, batch_size=4, seq_len=32, progress=False, seed=1,
              loss_impl=loss_impl)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(256, generator=g).tolist()
    first = {}
    for vocab in (None, 255, 100):
        model = tiny_balcony()
        attach(model, [1, 2], init="random", seed=0)
        set_shortlist(model, order[:255])
        expected = _restricted_first_loss(model, kw, torch.tensor(order[:vocab] if vocab else list(range(256))))
        out = train(model, vocab=vocab, **kw)
        first[vocab] = out["history"][0]["loss"]
        assert first[vocab] == pytest.approx(expected, rel=1e-4), vocab
        assert out["steps"] == 3 and model.tokens_trained == 3 * 4 * 32
    assert first[100] != pytest.approx(first[None], rel=1e-3)  # (the restriction is not a no-op)


def test_vocab_is_checked_before_training():
    from balcony_ext.shortlist import set_shortlist

    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(ValueError, match=r"vocab=64: the model has no vocabulary shortlist"):
        train(model, data=_corpus(), tokens=10, seq_len=32, vocab=64, progress=False)
    set_shortlist(model, list(range(0, 256, 2)))
    for bad in (0, 129, 3.5, True):
        with pytest.raises(ValueError, match=r"vocab must be None \(the whole vocabulary\) or an int in 1\.\.128"):
            train(model, data=_corpus(), tokens=10, seq_len=32, vocab=bad, progress=False)
    assert model.tokens_trained == 0

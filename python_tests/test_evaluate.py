"""evaluate(): metrics against direct computation, baselines, costs, JSON and plot."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from balcony_ext.data import Corpus
from balcony_ext.evaluate import evaluate
from balcony_ext.model import attach
from tiny_models import tiny_balcony


def _corpus():
    g = torch.Generator().manual_seed(0)
    return Corpus(torch.randint(0, 256, (3000,), generator=g), torch.randint(0, 256, (96,), generator=g),
                  ["a"], ["b"], "random tokens")


def test_metrics_match_direct_computation(tmp_path):
    model = tiny_balcony()
    attach(model, [1, 3], init="random", seed=2)
    corpus = _corpus()
    rep = evaluate(model, data=corpus, seq_len=32, batch_size=2, affine_tokens=256, progress=False,
                   json_path=tmp_path / "e.json", plot_path=tmp_path / "e.png")
    blocks = corpus.heldout_blocks(32)
    with torch.no_grad():
        out = model(blocks, exits=[1, 3, 4])
    tgt = blocks[:, 1:].reshape(-1)
    logp = F.log_softmax(out[4][:, :-1], -1).reshape(-1, 256)
    for k in (1, 3):
        logq = F.log_softmax(out[k][:, :-1], -1).reshape(-1, 256)
        r = rep.row("balcony", k)
        assert r["perplexity"] == pytest.approx(math.exp(F.nll_loss(logq, tgt).item()), rel=1e-4)
        assert r["kl"] == pytest.approx(F.kl_div(logq, logp, log_target=True, reduction="sum").item() / tgt.numel(), rel=1e-4)
        assert r["top1"] == pytest.approx((logq.argmax(-1) == logp.argmax(-1)).float().mean().item())
    full = rep.row("full")
    assert full["perplexity"] == pytest.approx(math.exp(F.nll_loss(logp, tgt).item()), rel=1e-4)
    assert full["kl"] == 0 and full["top1"] == 1 and full["rel_cost"] == 1
    # every method has a row at every depth, costs grow with depth
    for method in ("balcony", "truncation", "untrained", "affine"):
        assert rep.row(method, 1)["rel_cost"] < rep.row(method, 3)["rel_cost"] < 1.3
    assert rep.row("truncation", 1)["rel_cost"] < rep.row("balcony", 1)["rel_cost"]
    assert "balcony" in str(rep) and "perplexity" in str(rep)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert len(saved["rows"]) == 1 + 4 * 2 and saved["info"]["tokens"] == tgt.numel()
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_truncation_baseline_is_final_norm_and_head():
    model = tiny_balcony()
    attach(model, [2])
    corpus = _corpus()
    rep = evaluate(model, data=corpus, seq_len=32, baselines=("truncation",), progress=False)
    blocks = corpus.heldout_blocks(32)
    with torch.no_grad():
        h = model.base(blocks, output_hidden_states=True).hidden_states[2]
        logq = F.log_softmax(model.base.lm_head(model.base.model.norm(h))[:, :-1], -1).reshape(-1, 256)
    ppl = math.exp(F.nll_loss(logq, blocks[:, 1:].reshape(-1)).item())
    assert rep.row("truncation", 2)["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_untrained_baseline_equals_fresh_last_init():
    model = tiny_balcony()
    attach(model, [2], init="last")
    rep = evaluate(model, data=_corpus(), seq_len=32, progress=False)
    assert rep.row("untrained", 2)["perplexity"] == pytest.approx(rep.row("balcony", 2)["perplexity"], rel=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=0), "seq_len must be an int >= 1, got 0"),
    (dict(seq_len=-1), "seq_len must be an int >= 1, got -1"),
    (dict(seq_len=300), r"seq_len=300 is past the model's 256 positions"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(max_tokens=0), "max_tokens must be a positive int or None"),
    (dict(max_tokens=-5), "max_tokens must be a positive int or None"),
    (dict(affine_tokens=-1), "affine_tokens must be an int >= 0, got -1"),
    (dict(chat_prompts=-1), "chat_prompts must be an int >= 0, got -1"),
    (dict(baselines="truncation"), "baselines must be a list of 'truncation' / 'untrained', got the string"),
])
def test_bad_evaluation_arguments_named(kw, match):
    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(ValueError, match=match):
        evaluate(model, data=_corpus(), **{"seq_len": 32, "progress": False, **kw})


def test_bad_affine_exits_named_before_any_work():
    from balcony_ext.affine import new_affine_exits

    model = tiny_balcony()
    attach(model, [1, 3])
    lenses = new_affine_exits(model, [1, 3])
    other = tiny_balcony(hidden=32)  # another width
    for affine, match in [  # (the first two failed deep inside, after the data was prepared, before)
        ({1: 5, 3: lenses[3]}, r"affine maps each exit depth to an AffineExit .* got int 5 at depth 1"),
        ([lenses[1], lenses[3]], r"affine must be a dict \{depth: AffineExit\} .* or None, got list"),
        ({1: lenses[1]}, r"affine exits given for depths \[1\], missing \[3\]"),
        (new_affine_exits(other, [1, 3]), r"the affine exit at depth 1 maps width 32, not this model's hidden size"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate(model, data="no-such-data", seq_len=32, progress=False, affine=affine)  # (checked before the data)
    rep = evaluate(model, data=_corpus(), seq_len=32, baselines=(), progress=False, affine=lenses)
    assert {r["exit"] for r in rep.rows if r["method"] == "affine"} == {1, 3}


@pytest.mark.parametrize("kw,exc,match", [
    (dict(progress="no"), ValueError, "progress must be True or False, got str 'no'"),
    (dict(json_path=5), TypeError, r"json_path must be a str or os.PathLike \(a file path\) or None"),
    (dict(plot_path=True), TypeError, r"plot_path must be a str or os.PathLike \(a file path\) or None"),
    (dict(heldout=0.2), ValueError, "heldout=0.2 cannot apply: data is a ready Corpus that already has its held-out"),
    (dict(heldout=-0.1), ValueError, r"heldout must be a fraction in \[0, 1\), got -0.1"),
])
def test_bad_flags_paths_and_heldout_named(kw, exc, match):
    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(exc, match=match):  # (json_path, plot_path: after the whole evaluation before)
        evaluate(model, data=_corpus(), **{"seq_len": 32, "progress": False, **kw})

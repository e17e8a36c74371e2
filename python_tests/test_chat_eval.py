"""The chat evaluation: its figures on exits of known quality, and its metrics by hand."""

import pytest
import torch

from balcony_ext.chat_eval import common_prefix, evaluate_chat, heldout_instructions, repeated_ngram_share, token_f1
from balcony_ext.data import Corpus, split_by_document
from balcony_ext.evaluate import evaluate
from balcony_ext.instructions import build_instructions
from balcony_ext.model import attach
from tiny_models import tiny_chat_balcony


def test_metrics_by_hand():
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 / 5)
    assert repeated_ngram_share([1, 2, 3, 4, 5]) == 0 and repeated_ngram_share([1, 2]) == 0
    assert repeated_ngram_share([7] * 10, 4) == pytest.approx(6 / 7)
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1 and token_f1([1], [2]) == 0
    assert token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)


def test_heldout_instructions_are_the_chat_data_heldout_split():
    texts = [i.text for i in build_instructions(400)]
    held = split_by_document(texts, 0.05, 0)
    got = heldout_instructions(5, n_instructions=400)
    assert got == [t for t in texts if t in held][:5]
    with pytest.raises(ValueError, match="held-out instructions"):
        heldout_instructions(10_000, n_instructions=400)


def test_an_exit_that_copies_the_full_model_agrees_fully():
    model = tiny_chat_balcony(tie_word_embeddings=False)  # tied, a random model just repeats its input
    L = model.num_layers
    # the exit after L-1 layers, initialised from the last layer with the final norm, is the full model
    attach(model, [L - 1], init="last", norm_init="final")
    attach(model, [1], init="random", seed=3)
    rows = evaluate_chat(model, prompts=6, max_new_tokens=10, batch_size=4, n_instructions=400, progress=False)
    copy, weak, full = rows[("balcony", L - 1)], rows[("balcony", 1)], rows[("full", L)]
    assert copy["chat_top1"] == 1.0 and copy["chat_kl"] == pytest.approx(0, abs=1e-5)
    assert copy["chat_f1"] == 1.0 and copy["chat_prefix"] == full["chat_prefix"] > 0
    assert copy["chat_rep4"] == pytest.approx(full["chat_rep4"])
    assert weak["chat_top1"] < 0.9 and weak["chat_kl"] > 1e-3 and weak["chat_f1"] < 1
    assert rows["_info"]["chat_prompts"] == 6 and rows["_info"]["chat_answer_tokens"] > 6
    # decoding options reach the exits' free answers only: a strong penalty moves the copy off the
    # full model's greedy answer, and the teacher-forced figures do not change
    pen = evaluate_chat(model, prompts=6, max_new_tokens=10, batch_size=4, n_instructions=400, progress=False,
                        decoding={"repetition_penalty": 5.0})
    assert pen[("balcony", L - 1)]["chat_f1"] < 1.0 and pen[("full", L)] == full
    assert pen[("balcony", L - 1)]["chat_top1"] == 1.0 and pen["_info"]["chat_decoding"] == {"repetition_penalty": 5.0}


def test_teacher_forced_figures_match_a_direct_computation():
    model = tiny_chat_balcony()
    attach(model, [2], init="random", seed=1)
    prompts = ["Why is the sky blue?", "Name a colour."]
    rows = evaluate_chat(model, prompts=prompts, max_new_tokens=8, free=False, progress=False)
    from balcony_ext.generate import encode_prompt, generate

    top1 = kl = n = 0
    for p in prompts:
        ids = encode_prompt(model.tokenizer, p, chat=True)
        ans = generate(model, ids, exit_layer=model.num_layers, max_new_tokens=8, calibration=None).tokens
        seq = torch.tensor([ids + ans])
        with torch.no_grad():
            out = model(seq, exits=[2, model.num_layers])
        sl = slice(len(ids) - 1, len(ids) + len(ans) - 1)
        lp = torch.log_softmax(out[model.num_layers][0, sl], -1)
        lq = torch.log_softmax(out[2][0, sl], -1)
        top1 += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        kl += (lp.exp() * (lp - lq)).sum().item()
        n += len(ans)
    assert rows[("balcony", 2)]["chat_top1"] == pytest.approx(top1 / n)
    assert rows[("balcony", 2)]["chat_kl"] == pytest.approx(kl / n, rel=1e-4)
    assert "chat_f1" not in rows[("balcony", 2)]


def test_evaluate_reports_chat_columns(tmp_path):
    model = tiny_chat_balcony()
    attach(model, [1, 3], init="random", seed=2)
    g = torch.Generator().manual_seed(0)
    corpus = Corpus(torch.randint(0, 255, (2000,), generator=g), torch.randint(0, 255, (96,), generator=g),
                    ["a"], ["b"], "random")
    rep = evaluate(model, data=corpus, seq_len=32, chat_prompts=3, chat_max_new_tokens=6, progress=False,
                   plot_path=tmp_path / "e.png")
    for k in (1, 3):
        r = rep.row("balcony", k)
        assert 0 <= r["chat_top1"] <= 1 and r["chat_kl"] >= 0 and "chat_rep4" in r and "chat_f1" in r
        assert 0 <= rep.row("truncation", k)["chat_top1"] <= 1 and "chat_f1" not in rep.row("truncation", k)
    assert rep.row("full")["chat_top1"] == 1 and rep.info["chat_prompts"] == 3
    assert "chat top-1" in str(rep) and (tmp_path / "e.png").stat().st_size > 1000

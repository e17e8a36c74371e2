"""Chat data: the instruction set, the model's answers (split by prompt, cached, resumed), the loss
mask, mixtures, and training on the answers only."""

import json
import sys

import pytest
import torch

import balcony_ext.chat_data as chat_mod
from balcony_ext.chat_data import ANSWERS_FILE, chat_data
from balcony_ext.data import Corpus, Mixture, prepare
from balcony_ext.generate import encode_prompt, generate
from balcony_ext.instructions import KIND_WEIGHTS, build_instructions
from balcony_ext.model import attach
from balcony_ext.train import reference_distill_loss, train
from tiny_models import tiny_chat_balcony


def test_instructions_are_deterministic_distinct_and_varied():
    a, b = build_instructions(3000, seed=0), build_instructions(3000, seed=0)
    assert a == b and len({i.text for i in a}) == 3000
    assert build_instructions(500, seed=0) == a[:500]  # a larger set extends a smaller one
    assert build_instructions(500, seed=1) != a[:500]
    assert {i.kind for i in a} == set(KIND_WEIGHTS)
    assert all(i.text[0].isupper() and "{" not in i.text for i in a)
    with pytest.raises(ValueError, match="n must be"):
        build_instructions(-1)


def _small(model, tmp_path, **kw):
    args = dict(prompts=24, heldout=0.2, max_new_tokens=6, batch_size=5, cache_dir=tmp_path / "chat", progress=False)
    return chat_data(model, **{**args, **kw})


def test_answers_are_the_models_own_split_by_prompt(tmp_path):
    model = tiny_chat_balcony()
    data = _small(model, tmp_path)
    assert [e.index for e in data.examples] == list(range(24))
    held, train_ex = data.heldout_examples, data.train_examples
    assert held and train_ex and len(held) + len(train_ex) == 24
    assert not {e.prompt for e in held} & {e.prompt for e in train_ex}
    greedy = [e for e in data.examples if e.temperature == 0]
    assert all(e.temperature == 0 for e in held) and len(greedy) < 24  # held out: greedy; others: both
    for e in greedy[:4]:  # a greedy answer is what generate() gives at full depth
        assert e.prompt_ids == encode_prompt(model.tokenizer, e.prompt, chat=True)
        out = generate(model, e.prompt_ids, exit_layer=model.num_layers, max_new_tokens=6, calibration=None)
        assert out.tokens == e.answer_ids
    # the corpus: prompt then answer, loss on the positions that predict the answer
    corpus = data.corpus()
    first = train_ex[0]
    m, n = len(first.prompt_ids), len(first.answer_ids)
    assert corpus.train_ids[:m + n].tolist() == first.prompt_ids + first.answer_ids
    mask = corpus.train_mask[:m + n].tolist()
    assert mask == [False] * (m - 1) + [True] * n + [False]
    assert int(corpus.train_mask.sum()) == sum(len(e.answer_ids) for e in train_ex)
    assert corpus.heldout_docs == [f"chat-{e.index:06d}" for e in held]
    assert data.corpus(learn_prompt=True).train_mask.all()


def test_cache_is_reused_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    first = _small(model, tmp_path)
    path = tmp_path / "chat" / ANSWERS_FILE
    calls = []
    gen_mod = sys.modules["balcony_ext.generate"]  # the module (the package exports a function of that name)
    original = gen_mod.generate

    def counting(model, prompts, **kw):
        calls.append(len(prompts))
        return original(model, prompts, **kw)

    monkeypatch.setattr(gen_mod, "generate", counting)
    again = _small(model, tmp_path)
    assert calls == [] and again.examples == first.examples  # a complete cache generates nothing
    # interrupted: ten records written, the eleventh torn mid-line
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    resumed = _small(model, tmp_path)
    assert sum(calls) == 14 and len(resumed.examples) == 24
    for a, b in zip(resumed.examples, first.examples):
        assert (a.index, a.prompt, a.prompt_ids, a.temperature) == (b.index, b.prompt, b.prompt_ids, b.temperature)
        if a.temperature == 0:
            assert a.answer_ids == b.answer_ids
    assert all(json.loads(l) for l in path.read_text().splitlines())  # the torn line is gone
    # read-only: nothing missing is generated
    partial = _small(model, tmp_path, prompts=30, generate_missing=False)
    assert len(partial.examples) == 24 and sum(calls) == 14
    with pytest.raises(ValueError, match="other settings"):
        _small(model, tmp_path, max_new_tokens=7)


def test_mixture_draws_in_proportion():
    a = Corpus(torch.zeros(64 * 30, dtype=torch.long), torch.zeros(64 * 2, dtype=torch.long), ["a"], ["a2"], "a")
    b = Corpus(torch.ones(64 * 10, dtype=torch.long), torch.ones(64 * 3, dtype=torch.long), ["b"], ["b2"], "b",
               train_mask=torch.arange(640) % 2 == 0, heldout_mask=torch.ones(192, dtype=torch.bool))
    mix = prepare([(a, 0.25), (b, 0.75)])
    assert isinstance(mix, Mixture)
    blocks, masks = mix.train_blocks(64), mix.train_mask_blocks(64)
    assert blocks.shape == masks.shape == (40, 64)
    assert (blocks[:, 0] == 0).sum() == 10 and (blocks[:, 0] == 1).sum() == 30  # b repeated to its share
    assert masks[blocks[:, 0] == 0].all() and masks[blocks[:, 0] == 1].float().mean() == 0.5
    assert torch.equal(blocks, mix.train_blocks(64))  # deterministic
    assert mix.heldout_blocks(64).shape == (5, 64) and "25%" in mix.describe()
    with pytest.raises(ValueError, match="positive"):
        Mixture([(a, 0.0)])


def test_training_learns_only_where_the_mask_says():
    model = tiny_chat_balcony()
    attach(model, [2], init="random", seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 255, (64 * 8,), generator=g)
    mask = torch.rand(ids.shape, generator=g) < 0.3
    corpus = Corpus(ids, ids[:64].clone(), ["t"], ["h"], "masked", train_mask=mask)
    state = {k: v.clone() for k, v in model.balconies.state_dict().items()}
    run = train(model, data=corpus, tokens=64 * 2, batch_size=2, seq_len=64, warmup=0.5, progress=False)
    # the first step's loss, recomputed by hand on the masked positions of the first micro-batch
    from balcony_ext.train import micro_batch

    model.balconies.load_state_dict(state)
    batch = micro_batch(corpus.train_blocks(64), 0, 2, 0)
    keep = micro_batch(corpus.train_mask_blocks(64), 0, 2, 0)
    with torch.no_grad():
        hidden, final = model.frozen_forward(batch, [2])
        student = model.exit_hidden(2, hidden[2])
        expected = reference_distill_loss(student[keep], model.adapter.lm_head.weight, final[keep])
        everywhere = reference_distill_loss(student, model.adapter.lm_head.weight, final)
    got = run["history"][0]["loss_per_exit"][2]
    assert got == pytest.approx(expected.item(), rel=1e-4) and got != pytest.approx(everywhere.item(), rel=1e-3)


def test_chat_data_spec_trains_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path))
    model = tiny_chat_balcony()
    attach(model, [2])
    monkeypatch.setattr(chat_mod, "chat_data", lambda m, **kw: _small(m, tmp_path, **{**kw, "heldout": 0.2}))
    run = train(model, data=[("chat", 0.5), (Corpus(torch.arange(2048) % 250, torch.arange(64), ["x"], ["y"], "x"),
                                            0.5)], tokens=64 * 4, batch_size=2, seq_len=64, progress=False)
    assert run["steps"] == 2 and "mixture" in run["corpus"] and "chat" in run["corpus"]


def test_exits_answer_on_policy_tied_to_their_weights(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    attach(model, [1, 2], init="random", seed=3)
    data = _small(model, tmp_path / "a", answer_exits=[1, 2])
    assert "exits [1, 2]" in data.source
    for e in [e for e in data.examples if e.temperature == 0][:4]:  # prompt i answered at exit [1, 2][i % 2]
        k = [1, 2][e.index % 2]
        out = generate(model, e.prompt_ids, exit_layer=k, max_new_tokens=6, calibration=None)
        assert out.tokens == e.answer_ids
    full = _small(model, tmp_path / "b")
    assert [e.answer_ids for e in data.examples] != [e.answer_ids for e in full.examples]
    # the cache belongs to those exits: other weights are refused, not mixed in
    with torch.no_grad():
        next(model.balconies.parameters()).add_(0.5)
    with pytest.raises(ValueError, match="exits_sha256"):
        _small(model, tmp_path / "a", answer_exits=[1, 2])
    for bad in ([], [5], [True], [model.num_layers]):
        with pytest.raises(ValueError, match="answer_exits"):
            _small(model, tmp_path / "c", answer_exits=bad)
    # the data spec: the model's exits answer
    monkeypatch.setattr(chat_mod, "chat_data", lambda m, **kw: _small(m, tmp_path / "d", **{**kw, "heldout": 0.2}))
    corpus = prepare("chat-exits", model=model)
    assert "exits [1, 2]" in corpus.describe() and int(corpus.train_mask.sum()) > 0
    with pytest.raises(ValueError, match="exits"):
        prepare("chat-exits", model=tiny_chat_balcony())


def test_several_answers_to_each_training_instruction(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    one = _small(model, tmp_path)
    three = _small(model, tmp_path, samples=3)
    assert three.examples[:24] == one.examples  # the first answers are the same cache
    more = three.examples[24:]
    train = {e.prompt for e in one.train_examples}
    assert len(more) == 2 * len(train) and {e.sample for e in more} == {1, 2}
    assert all(e.prompt in train and e.temperature == 0.8 for e in more)  # sampled; none held out
    for s in (1, 2):
        assert (tmp_path / "chat" / ANSWERS_FILE.replace(".jsonl", f".s{s}.jsonl")).exists()
    # other seeds: the extra answers are not copies of the first ones
    first = {e.index: e.answer_ids for e in one.examples}
    assert sum(e.answer_ids != first[e.index] for e in more) > len(more) // 2
    corpus = three.corpus()
    names = corpus.train_docs + corpus.heldout_docs
    assert len(set(names)) == len(names) == 24 + len(more)
    assert corpus.heldout_docs == one.corpus().heldout_docs
    assert "3 answers to each training instruction" in three.source
    # a complete cache generates nothing more
    gen_mod = sys.modules["balcony_ext.generate"]
    monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert _small(model, tmp_path, samples=3).examples == three.examples
    with pytest.raises(ValueError, match="samples"):
        _small(model, tmp_path, samples=0)


def test_first_leaves_out_the_earlier_instructions(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    whole = _small(model, tmp_path)
    calls = []
    gen_mod = sys.modules["balcony_ext.generate"]
    original = gen_mod.generate
    monkeypatch.setattr(gen_mod, "generate", lambda m, p, **kw: calls.append(len(p)) or original(m, p, **kw))
    late = _small(model, tmp_path, first=16, samples=2)
    firsts = [e for e in late.examples if e.sample == 0]
    assert firsts == whole.examples[16:]  # read from the cache
    train = [e for e in firsts if e.prompt not in late.heldout_prompts]
    assert sum(calls) == len(train)  # second answers only for the training instructions from 16 on
    assert {e.index for e in late.examples if e.sample == 1} == {e.index for e in train}
    for bad in (-1, 24, True):
        with pytest.raises(ValueError, match="first must be"):
            _small(model, tmp_path, first=bad)


def test_read_jsonl_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    from balcony_ext.files import read_jsonl

    path = tmp_path / "records.jsonl"
    assert read_jsonl(path) == []
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"ind')
    assert read_jsonl(path) == [{"index": 0}, {"index": 1}]
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'  # cut, so appending continues cleanly
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"index": 2}\n{"index": 3')  # a whole last line, not ended
    assert [r["index"] for r in read_jsonl(path)] == [0, 1, 2]
    damaged = b'{"index": 0}\n{"ind\xff\n{"index": 2}\n'
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=r"line 2 of 3 is not a JSON record"):
        read_jsonl(path)
    assert path.read_bytes() == damaged  # nothing cut

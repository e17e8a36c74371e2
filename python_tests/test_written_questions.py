"""Questions the model writes itself: parsing its lists, the writing cache (resumed, deterministic),
and chat data that answers them beside the template instructions."""

import json
import sys
from types import SimpleNamespace

import pytest

from balcony_ext.chat_data import WRITTEN_ANSWERS_FILE, WRITTEN_EXCLUDES, WRITTEN_FILE, chat_data
from balcony_ext.written_questions import FRAMINGS, parse_questions, write_questions, writing_prompts
from tiny_models import tiny_chat_balcony

LIST = """Here are five questions about electric cars:

1. How do electric cars work?
2. "Why are electric cars so quiet?"
3) How does it work?
4. Electric cars are great.
- What is the range of an electric car on a cold day?
5. Cars?
* What: electric cars?
"""


def test_parse_keeps_the_list_items_that_are_questions_about_the_topic():
    assert parse_questions(LIST, "electric cars") == [
        "How do electric cars work?", "Why are electric cars so quiet?",
        "What is the range of an electric car on a cold day?"]
    assert parse_questions("1. how do bees make honey?", "bees") == ["How do bees make honey?"]
    assert parse_questions("How do bees make honey?", "bees") == []  # not a list item
    assert parse_questions("1. " + "very " * 40 + "bees?", "bees") == []  # too long


def test_writing_prompts_cover_every_topic_and_framing_once_in_a_seeded_order():
    a = writing_prompts(0)
    assert a == writing_prompts(0) and a != writing_prompts(1)
    assert len(set(a)) == len(a) and sorted(a) == sorted(writing_prompts(1))
    assert {f for _, f in a} == set(range(len(FRAMINGS)))


def _fake_writer(monkeypatch, calls):
    """generate() answering a writing prompt with a numbered list about its topic (and a repeat), and
    any other prompt as the model does."""
    gen_mod = sys.modules["balcony_ext.generate"]
    original = gen_mod.generate

    def fake(model, prompts, **kw):
        texts = [model.tokenizer.decode(p) for p in prompts]
        if not all(t.startswith("<user>Write five") for t in texts):
            return original(model, prompts, **kw)
        calls.append(len(prompts))
        outs = []
        for t in texts:
            topic = t.split(" about ")[1].split(",")[0].split(" that start")[0]
            body = f"1. What is the best thing about {topic}?\n2. Why do people like {topic}?\n3. No.\n"
            outs.append(SimpleNamespace(text=body + f"4. What is the best thing about {topic}?\n"))
        return outs

    monkeypatch.setattr(gen_mod, "generate", fake)


def test_written_questions_are_cached_resumed_and_a_prefix_of_more(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    calls = []
    _fake_writer(monkeypatch, calls)
    path = tmp_path / "w.jsonl"
    qs = write_questions(model, 9, path, batch_size=4, progress=False)
    assert len(qs) == 9 and len({q.text for q in qs}) == 9 and calls == [4, 4]  # two a prompt: 5 prompts
    assert all(q.kind == "written" and q.topic in q.text for q in qs)
    pairs = writing_prompts(0)
    assert qs[0].text == f"What is the best thing about {pairs[0][0]}?"
    assert write_questions(model, 9, path, batch_size=4, progress=False) == qs and calls == [4, 4]  # cached
    assert write_questions(model, 5, path, batch_size=4, progress=False) == qs[:5]
    # a torn last line is dropped and rewritten
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:10])
    assert write_questions(model, 9, path, batch_size=4, progress=False) == qs and calls == [4, 4, 4]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    # excluded texts (the template instructions) are not written again
    fresh = write_questions(model, 3, tmp_path / "x.jsonl", exclude=[qs[0].text.upper()], progress=False)
    assert qs[0].text not in {q.text for q in fresh}
    # only what is cached, and a clear error for a cache of other writing prompts
    cached = {json.loads(line)["index"] for line in path.read_text().splitlines()}  # 8 prompts
    topics = {pairs[k][0] for k in cached}  # (one topic under two framings writes the same questions here)
    assert len(write_questions(model, 50, path, generate_missing=False, progress=False)) == 2 * len(topics)
    bad = [json.loads(line) for line in path.read_text().splitlines()]
    bad[0]["prompt"] = "something else"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(ValueError, match="writing prompts"):
        write_questions(model, 9, path, progress=False)
    with pytest.raises(ValueError, match="int >= 0"):
        write_questions(model, -1, path)


def test_written_questions_stop_when_every_writing_prompt_is_spent(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    gen_mod = sys.modules["balcony_ext.generate"]
    monkeypatch.setattr(gen_mod, "generate", lambda m, p, **kw: [SimpleNamespace(text="nothing useful")] * len(p))
    monkeypatch.setattr("balcony_ext.written_questions.writing_prompts", lambda seed=0: writing_prompts(seed)[:7])
    assert write_questions(model, 5, tmp_path / "w.jsonl", batch_size=3, progress=False) == []


def test_chat_data_answers_the_written_questions_beside_the_templates(tmp_path, monkeypatch):
    model = tiny_chat_balcony()
    calls = []
    _fake_writer(monkeypatch, calls)
    args = dict(prompts=12, heldout=0.2, max_new_tokens=5, batch_size=5, cache_dir=tmp_path / "chat", progress=False)
    plain = chat_data(model, **args)
    data = chat_data(model, written=10, **args)
    assert data.examples[:12] == plain.examples  # the template answers are the same cache
    written = data.examples[12:]
    assert len(written) == 10 and all(e.kind == "written" and e.tag == "w" for e in written)
    assert [e.index for e in written] == list(range(10)) and "10 of them written by the model" in data.source
    assert (tmp_path / "chat" / WRITTEN_FILE).exists() and (tmp_path / "chat" / WRITTEN_ANSWERS_FILE).exists()
    assert all(len(e.answer_ids) >= 1 for e in written)
    corpus = data.corpus()
    names = corpus.train_docs + corpus.heldout_docs
    assert len(set(names)) == 22 and sum(n.startswith("chat-w") for n in names) == 10
    # the held-out split of the templates does not change with the written questions
    assert {e.prompt for e in plain.heldout_examples} <= data.heldout_prompts
    assert not {e.prompt for e in data.heldout_examples} & {e.prompt for e in data.train_examples}
    with pytest.raises(ValueError, match="written must be"):
        chat_data(model, written=-2, **args)
    # first=prompts: the written questions alone (a continuation on new questions only)
    alone = chat_data(model, written=10, first=12, **args)
    assert alone.examples == written and "10 of them written by the model" in alone.source
    with pytest.raises(ValueError, match="first must be"):
        chat_data(model, first=12, **args)  # (no written questions: nothing left)


def test_the_written_questions_do_not_depend_on_the_number_of_template_instructions(tmp_path, monkeypatch):
    # they leave out the same template instructions whatever `prompts` is, so one cache of their answers
    # serves chat_data(prompts=8000, written=N) and chat_data(prompts=12000, written=N)
    import balcony_ext.written_questions as wq

    seen = []
    monkeypatch.setattr(wq, "write_questions", lambda model, n, path, exclude=(), **kw: seen.append(set(exclude)) or [])
    model = tiny_chat_balcony()
    args = dict(heldout=0.2, max_new_tokens=3, batch_size=5, cache_dir=tmp_path / "chat", progress=False, written=5)
    chat_data(model, prompts=6, **args)
    chat_data(model, prompts=9, **args)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == WRITTEN_EXCLUDES

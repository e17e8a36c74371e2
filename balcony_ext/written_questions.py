"""Questions the model writes itself: a source of instructions beyond the templates.

    qs = write_questions(model, 6000, path=cache / "written_questions.jsonl")   # [Instruction], cached

The template instructions (instructions.py) stop growing past ~16k distinct texts: the same
templates over the same topics. The frozen model is asked, in its chat template, to write a short
numbered list of questions about a topic (topics from instructions.TOPICS and TASKS, framings
below: a beginner's questions, a child's, practical ones, "why" questions, ...),
sampled; each list is parsed into separate questions, kept only when they read as a question
about the topic and are new. The outputs are cached one JSON line per writing prompt, so an
interrupted run resumes, and are parsed when read, so the parser may change without regenerating.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from .files import read_jsonl
from .instructions import TASKS, TOPICS, Instruction

FRAMINGS = [
    "Write five different questions a person could ask about {topic}, one per line.",
    "Write five questions people often ask about {topic}, one per line.",
    "Write five questions a beginner might ask about {topic}, one per line.",
    "Write five questions a child might ask about {topic}, one per line.",
    "Write five questions a student might ask a teacher about {topic}, one per line.",
    "Write five practical questions someone might ask an assistant about {topic}, one per line.",
    "Write five questions about {topic} that start with \"Why\", one per line.",
    "Write five questions about {topic} that start with \"How\", one per line.",
    "Write five questions about {topic} that start with \"What\", one per line.",
    "Write five questions about {topic} that start with \"Can\", one per line.",
]
# (asked for requests or tasks instead, the model writes headings, its own capabilities or nothing usable)

_ITEM = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+(.*\S)\s*$")
_STOPWORDS = {"the", "a", "an", "of", "to", "and", "for", "in", "on", "my", "at", "with", "how", "about", "from"}


def writing_prompts(seed: int = 0) -> list:
    """Every (topic, framing index) pair once, in a seeded order: the model's writing assignments."""
    topics = [t for group in TOPICS.values() for t in group] + [f"how to {t}" for t in TASKS]
    pairs = [(t, f) for t in topics for f in range(len(FRAMINGS))]
    random.Random(f"written:{seed}").shuffle(pairs)
    return pairs


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def _mentions(text: str, topic: str) -> bool:
    """Whether the line names the topic: one of its content words (by its first 5 letters, so that
    plurals and other forms count)."""
    words = [w for w in _key(topic).split() if w not in _STOPWORDS and len(w) >= 3]
    line = _key(text)
    return any(w[:5] in line for w in words) if words else True


def parse_questions(text: str, topic: str) -> list:
    """The list items of a written answer that read as a question about the topic: 4-40 words,
    ending in "?", naming the topic."""
    out = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if not m:
            continue
        q = m.group(1).strip().strip('"\u201c\u201d*').strip()
        words = q.split()
        if not 4 <= len(words) <= 40 or not q[0].isalpha() or "{" in q:
            continue
        if not q.endswith("?") or ":" in q:
            continue
        if _mentions(q, topic):
            out.append(q[0].upper() + q[1:])
    return out


def write_questions(model, n: int, path, seed: int = 0, exclude=(), batch_size: int = 16,
                    max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                    generate_missing: bool = True, progress: bool = True) -> list:
    """The first n distinct questions the model writes (fewer, with what the cache holds, when
    generate_missing=False or when every writing prompt is spent). The writing prompts run in
    writing_prompts(seed) order, batch_size at a time at full depth; questions equal (up to case and
    punctuation) to one in `exclude` or already written are dropped. Deterministic in (n, seed) for
    a given model, so the first m of write_questions(n) are write_questions(m)."""
    from tqdm.auto import tqdm

    from .generate import encode_prompt, generate

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of written questions must be an int >= 0, got {n!r}")
    path = Path(path)
    pairs = writing_prompts(seed)
    done = {r["index"]: r for r in read_jsonl(path)} if n else {}
    seen = {_key(t) for t in exclude}
    out: list = []

    def take(k: int) -> None:
        topic, f = pairs[k]
        r = done[k]
        if r["prompt"] != FRAMINGS[f].format(topic=topic):
            raise ValueError(f"the written questions in {path} do not match this version's writing prompts "
                             f"(prompt {k} differs): use another cache_dir")
        for q in parse_questions(r["text"], topic):
            if len(out) < n and _key(q) not in seen:
                seen.add(_key(q))
                out.append(Instruction(q, "written", topic))

    k = 0
    bar = None
    while len(out) < n and k < len(pairs):
        if k not in done:
            if not generate_missing:
                break
            if bar is None:
                bar = tqdm(total=n, initial=len(out), unit="question", desc="writing questions", disable=not progress)
            rows = [j for j in range(k, min(k + batch_size, len(pairs))) if j not in done]
            texts = [FRAMINGS[pairs[j][1]].format(topic=pairs[j][0]) for j in rows]
            ids = [encode_prompt(model.tokenizer, t, chat=True) for t in texts]
            outs = generate(model, ids, exit_layer=model.num_layers, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + 500_000_000 + rows[0],
                            calibration=None)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                for j, t, o in zip(rows, texts, outs):
                    done[j] = dict(index=j, prompt=t, text=o.text)
                    f.write(json.dumps(done[j]) + "\n")
                f.flush()
                os.fsync(f.fileno())
        before = len(out)
        take(k)
        if bar is not None:
            bar.update(len(out) - before)
        k += 1
    if bar is not None:
        bar.close()
    return out

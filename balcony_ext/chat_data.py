"""Chat self-distillation data: everyday instructions answered by the frozen full model.

    chat = chat_data(model, prompts=4000)              # answers generated once, cached, resumable
    chat = chat_data(model, prompts=8000, written=6000)  # and 6,000 questions the model wrote itself
    corpus = chat.corpus()                             # a Corpus whose loss mask covers the answers
    bx.train(model, data="chat")                       # the same, through the data spec
    bx.train(model, data=[("chat", 0.7), ("shakespeare", 0.3)])   # a mixture

The instructions come from `instructions.build_instructions` (templates over topic lists, no
download) and, with written=N, from the model itself (`written_questions`: lists of questions it
writes about those topics, parsed and deduplicated; the templates stop growing past ~16k). Each one
goes through the tokenizer's chat template and the frozen model answers it at full depth with the
project's own batched `generate`: prompts held out for evaluation, and every other training prompt,
greedily; the rest sampled (temperature 0.8, top-p 0.95), so the exits see both the model's most
likely answers and its spread. Records are appended to a JSON-lines file, one per answered prompt,
as each batch finishes: an interrupted run resumes at the first unanswered prompt (a torn last line
is dropped), and a finished cache is read in seconds. samples=K answers each training instruction K
times (the others sampled), first=A leaves out the instructions before A.

The split is by prompt (`data.split_by_document` over the instruction texts): a held-out
instruction is never trained on, whatever the number of prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Corpus, split_by_document
from .files import read_jsonl
from .instructions import build_instructions

ANSWERS_FILE = "answers.jsonl"
WRITTEN_FILE = "written_questions.jsonl"  # the model's lists of questions (written_questions.py)
WRITTEN_ANSWERS_FILE = "written_answers.jsonl"
WRITTEN_EXCLUDES = 30_000  # a written question equal to one of the first this many template instructions is dropped
# (the shipped exits trained on all 30,000: a written question is new to them)
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass
class ChatExample:
    index: int
    prompt: str
    kind: str
    temperature: float
    prompt_ids: list
    answer_ids: list
    finish: str  # "stop" (the model ended its answer) or "length" (cut at max_new_tokens)
    tag: str = ""  # "" for the template instructions, "w" for those the model wrote
    sample: int = 0  # 0: the first answer; 1, 2, ...: further sampled answers (chat_data(samples=...))

    @property
    def name(self) -> str:
        return f"chat-{self.tag}{self.index:06d}" + (f"-{self.sample}" if self.sample else "")


@dataclass
class ChatData:
    """Prompts and the frozen model's answers, with the held-out split by prompt."""

    examples: list
    heldout_prompts: set
    source: str

    @property
    def train_examples(self) -> list:
        return [e for e in self.examples if e.prompt not in self.heldout_prompts]

    @property
    def heldout_examples(self) -> list:
        return [e for e in self.examples if e.prompt in self.heldout_prompts]

    def answer_tokens(self) -> int:
        return sum(len(e.answer_ids) for e in self.examples)

    def corpus(self, learn_prompt: bool = False) -> Corpus:
        """Packs the examples (prompt ids, then answer ids) into token streams with a loss mask: the
        mask is True at the positions whose next token is an answer token (and at every position
        when learn_prompt), so training conditions on the chat-formatted prompt and learns the answer."""
        def stream(examples):
            ids, mask, names = [], [], []
            for e in examples:
                m, n = len(e.prompt_ids), len(e.answer_ids)
                ids += e.prompt_ids + e.answer_ids
                # position t predicts token t + 1: positions m-1 .. m+n-2 predict the answer
                mask += ([learn_prompt] * (m - 1) + [True] * n + [learn_prompt]) if n else [learn_prompt] * m
                names.append(e.name)
            return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), names

        tr_ids, tr_mask, tr_names = stream(self.train_examples)
        ho_ids, ho_mask, ho_names = stream(self.heldout_examples)
        return Corpus(tr_ids, ho_ids, tr_names, ho_names, self.source, train_mask=tr_mask, heldout_mask=ho_mask)

    def describe(self) -> str:
        train = self.train_examples
        prompts = len({(e.tag, e.index) for e in train})
        answers = f" ({len(train)} answers)" if len(train) > prompts else ""
        return (f"{self.source}: {prompts} training prompts{answers}, {len(self.heldout_examples)} held out, "
                f"{self.answer_tokens():,} answer tokens")


def default_cache_dir(model, settings: dict) -> Path:
    from .loading import cache_root

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name)
    return cache_root() / "chat" / f"{name}-{digest}"


def exits_digest(model) -> str:
    """A short sha256 of the model's exits (their weights as float32): which exits answered."""
    from .exits_io import tensors_checksum

    return tensors_checksum({n: t.float() for n, t in model.balconies.state_dict().items()})[:16]


def chat_data(model, prompts: int = 4000, heldout: float = 0.05, seed: int = 0, max_new_tokens: int = 256,
              batch_size: int = 16, temperature: float = 0.8, top_p: float = 0.95, cache_dir=None,
              generate_missing: bool = True, progress: bool = True, answer_exits=None, written: int = 0,
              samples: int = 1, first: int = 0) -> ChatData:
    """The first `prompts` instructions of build_instructions(prompts, seed) and the frozen model's
    answers at full depth (generated now for those not yet in the cache). Held-out prompts (by
    prompt, fraction `heldout`) and every other training prompt are answered greedily, the others
    sampled with `temperature` and `top_p`. generate_missing=False only reads what is cached.

    answer_exits: a list of the model's attached exits that answer instead of the full depth
    (prompt i at answer_exits[i % len]): the exits' own answers, on which training then has the
    full model score every token (on-policy distillation: the exits learn from the contexts their
    own mistakes lead to, e.g. the start of a loop). The cache is tied to those exits' weights.

    written: that many more instructions, written by the model itself at full depth
    (written_questions.py), answered the same way and split by prompt the same way; cached beside
    the template instructions' answers (the same cache serves any number of both).

    samples: answers to each training instruction (held-out ones keep one): the first as above, the
    others sampled with `temperature` and `top_p` (other seeds), each set cached in a file of its own.
    first: leave out the template instructions before this index (e.g. first=8000, prompts=12000: the
    4,000 after those an earlier run trained on); they are neither read nor answered. With written > 0,
    first=prompts leaves out every template instruction: the written questions alone."""
    if model.tokenizer is None:
        raise ValueError("chat data needs the model's tokenizer (the model has none)")
    if not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"prompts must be a positive int, got {prompts!r}")
    if isinstance(written, bool) or not isinstance(written, int) or written < 0:
        raise ValueError(f"written must be an int >= 0, got {written!r}")
    last = prompts if written else prompts - 1  # (first=prompts with written: the written questions only)
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= last:
        raise ValueError(f"first must be an int in [0, {last}] (prompts={prompts}, written={written}), got {first!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples (answers to each training instruction) must be an int >= 1, got {samples!r}")
    settings = dict(format=FORMAT_VERSION, model=model.name, dtype=str(model.dtype).replace("torch.", ""),
                    seed=seed, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, heldout=heldout)
    answerer = ""  # (the full model)
    if answer_exits is not None:
        answer_exits = list(answer_exits)
        bad = [k for k in answer_exits if isinstance(k, bool) or not isinstance(k, int) or k not in model.exits]
        if not answer_exits or bad:
            raise ValueError(f"answer_exits must be a non-empty list of the model's attached exits {model.exits}, "
                             f"got {answer_exits!r}")
        settings["answer_exits"] = answer_exits
        settings["exits_sha256"] = exits_digest(model)
        answerer = f" (exits {answer_exits})"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(model, settings)
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / META_FILE
    if meta_path.exists():
        stored = json.loads(meta_path.read_text())
        if stored != settings:
            diff = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            raise ValueError(f"the chat cache {cache} was made with other settings (cached, now): {diff}; "
                             "use another cache_dir")
    else:
        meta_path.write_text(json.dumps(settings, indent=2))

    instructions = build_instructions(prompts, seed)
    held = split_by_document([i.text for i in instructions], heldout, seed)
    answer = dict(model=model, answer_exits=answer_exits, held=held, seed=seed, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  generate_missing=generate_missing, progress=progress)
    sets = [(instructions, ANSWERS_FILE, "", first)]
    if written:
        from .written_questions import write_questions

        # (the same template instructions are excluded whatever `prompts` is, so that the written
        # questions, and the cache of their answers, do not depend on it)
        templates = build_instructions(WRITTEN_EXCLUDES, seed)
        qs = write_questions(model, written, cache / WRITTEN_FILE, seed=seed, exclude=[i.text for i in templates],
                             batch_size=batch_size, generate_missing=generate_missing, progress=progress)
        held |= split_by_document([q.text for q in qs], heldout, seed)
        sets.append((qs, WRITTEN_ANSWERS_FILE, "w", 0))
    examples = [e for sample in range(samples) for ins, name, tag, start in sets
                for e in _answered(ins, cache / _sample_file(name, sample), tag, sample=sample, first=start, **answer)]
    firsts = [e for e in examples if e.sample == 0]
    if written:
        answerer += f", {sum(e.tag == 'w' for e in firsts)} of them written by the model"
    more = f", {samples} answers to each training instruction" if samples > 1 else ""
    return ChatData(examples, held, f"chat: {model.name}{answerer} answering {len(firsts)} instructions{more}")


def _sample_file(name: str, sample: int) -> str:
    """The answers file of the sample-th answers ("answers.jsonl", "answers.s1.jsonl", ...)."""
    return name if sample == 0 else name.replace(".jsonl", f".s{sample}.jsonl")


def _answered(instructions, path: Path, tag: str, *, model, answer_exits, held, seed, batch_size, max_new_tokens,
              temperature, top_p, generate_missing, progress, sample: int = 0, first: int = 0) -> list:
    """The model's answers to `instructions` (ChatExamples), from the answers file at `path`, the
    missing ones generated and appended batch by batch. tag marks the examples' names ("w": written).
    sample > 0: further answers, all sampled, to the training instructions only. Instructions before
    `first` are left out."""
    from tqdm.auto import tqdm

    from .generate import encode_prompt, generate

    done = {r["index"]: r for r in read_jsonl(path)}
    wanted = [i for i in range(first, len(instructions)) if sample == 0 or instructions[i].text not in held]
    todo = [i for i in wanted if i not in done]
    if todo and generate_missing:
        bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), unit="prompt",
                   desc="answering instructions" + (f" (answer {sample + 1})" if sample else ""), disable=not progress)
        t0, new_tokens = time.perf_counter(), 0
        # (the written questions' sampling seeds differ from the templates', and each sample's from the others')
        salt = (0 if not tag else 700_000_000) + sample * 100_000_007
        with open(path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                rows = todo[start:start + batch_size]
                ins = [instructions[i] for i in rows]
                ids = [encode_prompt(model.tokenizer, x.text, chat=True) for x in ins]
                temps = [temperature if sample else 0.0 if (x.text in held or i % 2 == 0) else temperature
                         for i, x in zip(rows, ins)]
                depth = ([answer_exits[i % len(answer_exits)] for i in rows] if answer_exits
                         else model.num_layers)
                outs = generate(model, ids, exit_layer=depth, max_new_tokens=max_new_tokens,
                                temperature=temps, top_p=[1.0 if t == 0 else top_p for t in temps],
                                seed=seed * 1_000_003 + salt + rows[0], calibration=None)
                for i, x, p, t, out in zip(rows, ins, ids, temps, outs):
                    rec = dict(index=i, prompt=x.text, kind=x.kind, temperature=t, prompt_ids=p,
                               answer_ids=out.tokens, finish=out.finish_reason)
                    done[i] = rec
                    f.write(json.dumps(rec) + "\n")
                    new_tokens += len(out.tokens)
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(rows))
                bar.set_postfix({"answer tok/s": f"{new_tokens / (time.perf_counter() - t0):.0f}"})
        bar.close()
    missing = [i for i in wanted if i not in done]
    if missing and generate_missing:
        raise RuntimeError(f"chat data: {len(missing)} prompts still unanswered in {path.parent}")

    examples = []
    for i, x in enumerate(instructions[first:], first):
        r = done.get(i)
        if r is None:
            continue
        if r["prompt"] != x.text:
            raise ValueError(f"the chat cache {path.parent} does not match the instructions (prompt {i} differs); "
                             "it was made by another version of balcony_ext: use another cache_dir")
        examples.append(ChatExample(i, r["prompt"], r["kind"], r["temperature"], r["prompt_ids"], r["answer_ids"],
                                    r["finish"], tag, sample))
    return examples

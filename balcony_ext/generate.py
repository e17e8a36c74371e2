"""Generation under a compute budget: the public call.

    out = bx.generate(model, "Why is the sky blue?", budget=0.5, max_new_tokens=128)
    out.text, out.exit_layers, out.tokens_per_second, out.time_to_first_token
    for piece in bx.generate(model, prompt, budget=0.3, stream=True): print(piece, end="")
    outs = bx.generate(model, [p1, p2, p3], budget=[0.3, 0.6, 1.0])

A budget in (0, 1] is the fraction of the full model's cost the caller allows; by default it is spent
over the answer's max_new_tokens tokens: an opening at the full depth, then the deepest route that
fits the rest (budgets.plan_opening; full_start=0 prices every token alike). The batch runs on one
Engine (engine.py) over an early-exit KV cache allocated for the call (kv_cache.py);
`Generation._advance` is one token for every sequence.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budgets import OPENING, Budgets, calibration_path, check_calibration, load_calibration
from .checks import check_flag, check_path
from .engine import Engine
from .penalties import Penalties, dry_breakers
from .files import atomic_write

@dataclass
class GenerationOutput:
    text: str
    tokens: list
    exit_layers: list  # the exit that produced each generated token
    tokens_per_second: float  # decode speed after the first token
    time_to_first_token: float  # seconds from the call (validation, cache allocation and prefill included)
    prompt_tokens: int
    finish_reason: str  # "stop" or "length"
    notes: list = field(default_factory=list)
    heads: list = field(default_factory=list)  # per token: 0 the full LM head, n a head of the first n shortlisted tokens
    full_start: int = 0  # the answer's first tokens taken at the full depth as its opening (full_start)

    def __str__(self):
        return self.text


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _prompt_type_error(prompt) -> TypeError:
    return TypeError("a prompt must be a str, a list of str, or token ids (a list of ints, or a list of lists "
                     f"of ints), got {type(prompt).__name__} {reprlib.repr(prompt)}")


def _from_array(prompt):
    """A tensor or array of token ids (1-D: one prompt, 2-D: one per row) as lists of ints."""
    if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
        t = torch.as_tensor(prompt)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() not in (1, 2):
            raise TypeError(f"a tensor of token ids must be 1-D or 2-D of integers, got {t.dim()}-D {t.dtype}")
        return t.tolist()
    return prompt


def check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2**63 <= seed < 2**64):
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {reprlib.repr(seed)}")


def stop_strings(stop) -> list:
    """The stop strings as a list: a string, or a list of non-empty strings."""
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {reprlib.repr(stop)}")
    items = [stop] if isinstance(stop, str) else list(stop or [])
    for s in items:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must be a non-empty string or a list of them, got {reprlib.repr(stop)}")
    return items


def fresh_seed() -> int:
    """A seed from the OS for an unseeded generation (torch.seed() would reseed the global generator)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def encode_prompt(tok, prompt, chat=None) -> list:
    """Token ids of a prompt: a list of ids as is; a string through the chat template when `chat` (default:
    when the tokenizer has one), else plainly tokenised."""
    if _is_token_ids(prompt):
        if chat:
            raise ValueError("chat=True applies the chat template to a text prompt; token ids are used as given")
        return list(prompt)
    if not isinstance(prompt, str):
        raise _prompt_type_error(prompt)
    if not prompt:
        return []  # reported by the caller, which knows the prompt's index
    if tok is None:
        raise ValueError("the model has no tokenizer; pass prompts as lists of token ids")
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt)["input_ids"]


def stop_token_ids(model, stop_tokens=None) -> set:
    """The token ids that end a sequence: `stop_tokens` when given, else the model's end-of-sequence ids."""
    ids = set()
    tok = model.tokenizer
    if stop_tokens is None:
        gen = getattr(model.adapter.hf, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else getattr(tok, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    else:
        if not isinstance(stop_tokens, (list, tuple, set, frozenset)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in stop_tokens):
            raise ValueError(f"stop_tokens must be a list of token ids (ints), got {reprlib.repr(stop_tokens)}")
        ids.update(int(t) for t in stop_tokens)
        V = model.adapter.vocab_size
        outside = sorted(t for t in ids if not 0 <= t < V)
        if outside:
            raise ValueError(f"stop token {outside[0]} is outside the vocabulary (ids 0..{V - 1})")
    return ids


class Sequence:
    """One sequence's generated tokens, the exit of each, its text, and whether it is done: a stop
    token, a stop string (cut from the text) or max_new tokens end it."""

    def __init__(self, tokenizer, max_new: int, stop_ids: set, stop_strings: list):
        self.tokenizer, self.max_new, self.stop_ids, self.stop_strings = tokenizer, max_new, stop_ids, stop_strings
        self.tokens, self.exit_layers, self.heads = [], [], []
        self.text, self.done, self.finish = "", False, "length"

    def add(self, token: int, exit_layer: int, head: int = 0) -> str:
        """Takes the next token; returns the new piece of text (empty while a character is incomplete)."""
        self.tokens.append(token)
        self.exit_layers.append(exit_layer)
        self.heads.append(head)
        tok = self.tokenizer
        text = tok.decode(self.tokens, skip_special_tokens=True) if tok is not None else ""
        piece, self.text = text[len(self.text):], text
        if token in self.stop_ids:
            self.done, self.finish = True, "stop"
        elif any(s in text for s in self.stop_strings):
            cut = min(text.index(s) for s in self.stop_strings if s in text)
            piece = piece[: max(0, len(piece) - (len(text) - cut))]
            self.text = text[:cut]
            self.done, self.finish = True, "stop"
        elif len(self.tokens) >= self.max_new:
            self.done = True
        return piece


class Generation:
    """A running generation: iterate it for text pieces (streaming) or call .run(); change the
    budget at any time with set_budget()."""

    def __init__(self, model, prompts, single, budget=None, exit_layer=None, ms_per_token=None,
                 max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None,
                 stop_tokens=None, chat=None, max_len=None, native=None, calibration="auto",
                 presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, shortlist=None,
                 confidence=0.0, full_start="auto", dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2):
        self.t_start = time.perf_counter()  # the time to first token counts from the call
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int (cache positions per sequence) or None, got {max_len!r}")
        if chat not in (None, True, False):
            raise ValueError(f"chat must be True, False or None (the chat template when the tokenizer has one), "
                             f"got {chat!r}")
        check_flag("native", native, none="the native step where it exists")
        check_calibration(calibration)
        self.model = model
        self.ids = [encode_prompt(model.tokenizer, p, chat) for p in prompts]
        for b, ids in enumerate(self.ids):
            if not ids:
                raise ValueError(f"prompt {b} is empty" if len(prompts) > 1 else "the prompt is empty")
            model.check_token_ids(ids)
        self.single = single
        B = len(self.ids)

        def rows(name, v, dtype, ok, allowed, limit=None):
            v = list(v) if isinstance(v, (list, tuple)) else [v] * B
            if len(v) != B:
                raise ValueError(f"{len(v)} per-sequence {name} values for {B} prompts")
            for x in v:
                if isinstance(x, bool) or not ok(x):
                    raise ValueError(f"{name} must be {allowed}, got {x!r}")
            return torch.tensor(v if limit is None else [min(x, limit) for x in v], dtype=dtype)

        real = lambda x: isinstance(x, numbers.Real)  # noqa: E731
        self.temperature = rows("temperature", temperature, torch.float32,
                                lambda x: real(x) and math.isfinite(x) and x >= 0, "a finite number >= 0 (0: greedy)")
        self.top_k = rows("top_k", top_k, torch.long, lambda x: isinstance(x, numbers.Integral) and x >= 0,
                          "an int >= 0 (0: no top-k cut)", limit=model.adapter.vocab_size)  # (top_k >= V: no cut)
        self.top_p = rows("top_p", top_p, torch.float32, lambda x: real(x) and 0 < x <= 1, "in (0, 1]")
        self.confidence = rows("confidence", confidence, torch.float32, lambda x: real(x) and 0 <= x <= 1,
                               "a number in [0, 1] (0: every token at its exit)")
        auto = isinstance(full_start, str) and full_start == "auto"
        self.full_start = None if auto else rows(  # (None: the budget's plan says, Budgets.openings)
            "full_start", full_start, torch.long, lambda x: isinstance(x, numbers.Integral) and x >= 0,
            "'auto' (a budget spends an opening where it fits), an int >= 0 (answer tokens taken at the full depth "
            "before the budget's route; 0: none) or a per-sequence list of ints").tolist()
        self.penalties = Penalties.of(B, presence_penalty, frequency_penalty, repetition_penalty,
                                      start=[len(i) for i in self.ids], dry=dry_multiplier, dry_base=dry_base,
                                      dry_allowed_length=dry_allowed_length,
                                      breakers=dry_breakers(model, dry_multiplier))
        need = max(len(i) for i in self.ids) + max_new_tokens
        if max_len is not None and need > max_len:
            raise ValueError(f"a prompt of {max(len(i) for i in self.ids)} tokens plus max_new_tokens="
                             f"{max_new_tokens} needs {need} cache positions, past max_len={max_len}")
        stale = []
        cal = load_calibration(model, notes=stale) if calibration == "auto" else calibration
        self.budgets = Budgets(model, B, budget, exit_layer, ms_per_token, cal,  # validates before any allocation
                               shortlist, max_new_tokens=max_new_tokens, opening=OPENING if auto else 0)
        for notes in self.budgets.notes:
            notes.extend(stale)
        # the engine (its cache) is allocated when the generation starts, inside the time to first token
        self.engine, self._engine_args = None, (B, max_len or need, native)
        stop_ids = stop_token_ids(model, stop_tokens)
        stops = stop_strings(stop)
        check_seed(seed)
        self.seqs = [Sequence(model.tokenizer, max_new_tokens, stop_ids, stops) for _ in range(B)]
        self.gen = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
        self.step_index = 0
        self.t_first = None
        self.t_end = None

    def set_budget(self, budget):
        """Changes the budget from the next token on (a number, per-sequence list, schedule or callable).
        A value that does not resolve to exits for the next token raises; the generation is then unchanged."""
        self.budgets.set(budget, self.step_index)

    # per-sequence views (tests and callers read them)
    generated = property(lambda self: [q.tokens for q in self.seqs])
    exit_layers = property(lambda self: [q.exit_layers for q in self.seqs])
    done = property(lambda self: [q.done for q in self.seqs])

    @property
    def openings(self) -> list:
        """Per sequence: the answer tokens taken at the full depth first (full_start, or the budget's plan)."""
        return self.budgets.openings if self.full_start is None else self.full_start

    def _advance(self) -> list:
        """One token for every unfinished row; returns the new text of each row."""
        e = self.engine
        routes = self.budgets.routes(self.step_index)
        L = self.model.num_layers  # a row still in its opening (full start): the full depth and head
        routes = [(L, 0) if self.step_index < start else r for start, r in zip(self.openings, routes)]
        # finished rows stay idle (exit 0: no layer runs for them)
        exits = [0 if self.done[b] else routes[b][0] for b in range(e.B)]
        heads = [routes[b][1] for b in range(e.B)]
        uniform = torch.rand(e.B, generator=self.gen)
        if self.step_index == 0:
            nxt = e.prefill_step(exits, self.temperature, self.top_k, self.top_p, uniform, self.penalties, heads)
        else:
            e.catch_up(exits)
            nxt = e.step(exits, self.temperature, self.top_k, self.top_p, uniform, self.penalties, heads)
        # a token its exit is less sure of than the sequence's confidence: again at the full depth
        for b, token in e.deepen_unsure(exits, self.confidence.tolist(), self.temperature, self.top_k, self.top_p,
                                        uniform, self.penalties).items():
            nxt[b], exits[b], heads[b] = token, e.L, 0
        pieces = [""] * e.B
        for b, q in enumerate(self.seqs):
            if not q.done:
                pieces[b] = q.add(int(nxt[b]), exits[b], heads[b])
                if not q.done:
                    e.append(b, q.tokens[-1])
        if self.step_index == 0:
            self.t_first = time.perf_counter()
        self.step_index += 1
        return pieces

    def prefill(self):
        """Loads the prompts; the first call of _advance runs them through the model."""
        B, max_len, native = self._engine_args
        self.engine = Engine(self.model, B, max_len, native=native)
        self.engine.add_prompts(self.ids)

    def __iter__(self):
        self.prefill()
        while not all(self.done):
            pieces = self._advance()  # the first call also sets t_first
            yield pieces[0] if self.single else pieces
        self.t_end = time.perf_counter()

    def run(self):
        for _ in self:
            pass
        return self.result()

    def result(self):
        end = self.t_end or time.perf_counter()
        outs = []
        for b, q in enumerate(self.seqs):
            decode_s = end - self.t_first if self.t_first else 0.0
            outs.append(GenerationOutput(
                text=q.text, tokens=list(q.tokens), exit_layers=list(q.exit_layers),
                tokens_per_second=(max(self.step_index - 1, 0) / decode_s) if decode_s > 0 else float("nan"),
                time_to_first_token=(self.t_first - self.t_start) if self.t_first else float("nan"),
                prompt_tokens=len(self.ids[b]), finish_reason=q.finish, notes=list(self.budgets.notes[b]),
                heads=list(q.heads), full_start=min(self.openings[b], len(q.tokens))))
        return outs[0] if self.single else outs


@torch.no_grad()
def generate(model, prompt, budget=None, *, exit_layer=None, ms_per_token=None, max_new_tokens: int = 128,
             temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None, stop_tokens=None, chat=None,
             stream: bool = False, max_len=None, native=None, calibration="auto", presence_penalty=0.0,
             frequency_penalty=0.0, repetition_penalty=1.0, shortlist=None, confidence=0.0, full_start="auto",
             dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2):
    """Generates from one prompt (or a list of prompts, as one batch) at the exit the budget buys.
    A prompt is a string or token ids (a list of ints, or a 1-D tensor; a list of prompts or a 2-D
    tensor of ids makes a batch).

    budget: in (0, 1], a number, a per-sequence list, a schedule {from_step: budget} or a callable
    step -> budget (the exit may change from token to token). Or exit_layer=k, or
    ms_per_token=x (needs a calibration). temperature 0 is greedy; top_k, top_p and seed for
    sampling; stop: strings that end a sequence (not included); stop_tokens: ids (default: the
    model's end-of-sequence tokens); chat: wrap a string prompt in the tokenizer's chat template
    (default: when it has one). presence_penalty, frequency_penalty (OpenAI's, in [-2, 2]) and
    repetition_penalty (Hugging Face's, > 0) discourage repeated tokens, and dry_multiplier (> 0: on;
    0.8 is llama.cpp's suggestion), dry_base and dry_allowed_length (llama.cpp's DRY) a token that would
    extend a repeat of an earlier stretch of the answer: what stops an exit's loops at no loss of
    agreement with the full model (docs/results/dry.md; see penalties.py); numbers or per-sequence lists.
    shortlist: with a vocabulary shortlist attached (shortlist.py), None lets a budget below 1 buy a
    cheaper shortlisted head (out.heads says which head produced each token), True only shortlisted
    heads (with exit_layer: the largest), False never, an int n the first n shortlisted tokens at every
    step. confidence: in [0, 1] (a number or per-sequence list); a token
    whose exit gives its most likely token a probability below it is taken again at the full depth
    (the layers past the exit run for it and for the positions they lack, in one pass): answers
    closer to the full model's for a price per token between the exit's and a little over the full
    model's (out.exit_layers shows where each token came from); 0 (the default) never.
    full_start: an int >= 0 (or per-sequence list): the first full_start answer tokens are taken at
    the full depth with the full head, the budget's route after them. An answer's opening sets its
    course, and an exit continues the full model's opening far closer to the full model's answer than
    its own (docs/results/full_start.md); for a long answer the opening costs little. "auto": a budget
    that is a number (or per-sequence list) is spent over the answer's max_new_tokens tokens: the
    longest opening up to budgets.OPENING tokens after which a route fits, then the deepest route that
    fits the rest (budgets.plan_opening; the answer never costs more than budget x max_new_tokens
    full-depth tokens, out.full_start says how many opened it); schedules, callables, exit_layer and
    ms_per_token price every token alike.
    stream=True returns a Generation to iterate for text pieces (its set_budget() changes the budget
    mid-generation); otherwise a GenerationOutput (a list for a list of prompts).
    """
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be True or False, got {stream!r}")
    prompt = _from_array(prompt)
    if not isinstance(prompt, (str, list, tuple)):
        raise _prompt_type_error(prompt)
    if not prompt and not isinstance(prompt, str):
        raise ValueError("no prompts given")
    single = isinstance(prompt, str) or _is_token_ids(prompt)
    prompts = [prompt] if single else list(prompt)
    g = Generation(model, prompts, single, budget=budget, exit_layer=exit_layer, ms_per_token=ms_per_token,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop=stop, stop_tokens=stop_tokens, chat=chat, max_len=max_len, native=native,
                   calibration=calibration, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                   repetition_penalty=repetition_penalty, shortlist=shortlist, confidence=confidence,
                   full_start=full_start, dry_multiplier=dry_multiplier, dry_base=dry_base,
                   dry_allowed_length=dry_allowed_length)
    if stream:
        return g
    return g.run()


@torch.no_grad()
def calibrate(model, tokens: int = 32, context: int = 64, repeats: int = 3, path=None, progress: bool = True) -> dict:
    """Measures each exit's (and the full model's) decode milliseconds per token on this machine at
    batch 1 (with every shortlisted head too, where the model has a shortlist) and saves them (default: the cache directory) for budgets and latency targets."""
    from tqdm.auto import tqdm

    check_flag("progress", progress)
    check_path("path", path, none="the cache directory")
    prompt = list(range(100, 100 + context))
    ms, short_ms = {}, {}
    depths = list(model.exits) + [model.num_layers]
    heads = [0] + (list(model.shortlist_sizes) if getattr(model, "shortlist", None) is not None else [])
    for k, n in tqdm([(k, n) for k in depths for n in heads], desc="calibrating", disable=not progress):
        best = float("inf")
        for _ in range(repeats):
            out = generate(model, prompt, exit_layer=k, max_new_tokens=tokens, stop_tokens=[], calibration=None,
                           shortlist=n)
            best = min(best, 1000.0 / out.tokens_per_second)
        if n:
            short_ms.setdefault(str(k), {})[str(n)] = best
        else:
            ms[str(k)] = best
    cal = dict(model=model.name, ms_per_token=ms, threads=torch.get_num_threads(), context=context,
               measured=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if short_ms:
        cal["shortlist_ms_per_token"] = short_ms
    p = Path(path) if path is not None else calibration_path(model)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(cal, indent=2)))
    return cal

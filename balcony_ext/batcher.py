"""Continuous batching: requests join the running batch at any token boundary and leave when done.

    batcher = Batcher(model, max_batch=8)
    req = batcher.submit(Request(prompt_ids, budget=0.6, max_new_tokens=64, on_piece=print))
    while batcher.busy: batcher.iterate()          # or batcher.start() for a background thread
    req.text, req.exit_layers, req.finish_reason

One `iterate()` is one token boundary: waiting requests take free cache rows; prompts are prefilled in
chunks of at most `prefill_chunk` tokens per iteration, each on its own row (`Engine.row`) as if it
ran alone; then every running sequence decodes one token at its own exit in one batched step
(`Engine.step`, the mixed-exit native step), after the KV catch-up of the rows whose exit moved.
Finished and cancelled requests free their rows at once; the rows in use are kept at the front of
the cache (the last one moves into a freed row), so a step computes only the rows in use. A prompt that fits in one chunk, its first
token and every later token are computed exactly as `bx.generate` computes them for that prompt alone
(greedy and seeded sampling give the same tokens).

The load controller (`slo_ms_per_token`, controller.LoadController): before each step it predicts
the step's time from what it computes (fitted on the steps measured so far) and puts a ceiling on the
exits so that the prediction fits the target; a sequence never goes below its request's
`min_budget` and goes back up to what it asked for when the load falls. With `admission_control`, a waiting request is admitted only if
the step predicted with everyone at their floors fits the target. Every move is exact (catch-up).
"""

from __future__ import annotations

import itertools
import numbers
import reprlib
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from .budgets import OPENING, check_calibration, choose_exit, exit_costs, load_calibration, resolve_plan
from .checks import check_flag
from .controller import LoadController
from .engine import Engine
from .generate import Sequence, check_seed, fresh_seed, stop_strings, stop_token_ids
from .penalties import Penalties, check_penalties, dry_breakers


@dataclass
class Request:
    """One generation request. Give at most one of budget, exit_layer and ms_per_token (none: full
    depth); min_budget is the floor the load controller never goes below (default: the request's
    own exit, i.e. never lowered). shortlist: as generate's (None: the budget may buy a shortlisted
    head; False: never; True: only shortlisted heads; n: the first n shortlisted tokens). confidence:
    as generate's (a token whose exit gives its most likely token a probability below it is taken
    again at the full depth; 0: never). full_start: as generate's (the first full_start answer tokens
    at the full depth with the full head, the request's route after them; "auto": a budget spends an
    opening over max_new_tokens where it fits, budgets.plan_opening)."""

    prompt_ids: list
    max_new_tokens: int = 128
    budget: float | None = None
    exit_layer: int | None = None
    ms_per_token: float | None = None
    min_budget: float | None = None
    shortlist: bool | int | None = None
    confidence: float = 0.0
    full_start: int | str = "auto"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    dry_multiplier: float = 0.0  # DRY (penalties.py): 0 off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    seed: int | None = None
    stop: list = field(default_factory=list)
    stop_tokens: list | None = None
    on_piece: object = None  # called (request, piece, token) from the batcher's thread for every token
    on_done: object = None  # called (request) once the request has finished, been cancelled or failed

    # state, filled in by the batcher
    id: int = -1
    target_exit: int = 0  # the exit the request asked for
    floor_exit: int = 0  # the lowest exit the controller may give it
    exit: int = 0  # the exit its next token is decoded at
    head: int = 0  # its LM head: 0 the full one, n the first n tokens of the model's shortlist (a budget bought it)
    opening: int = 0  # answer tokens at the full depth first (full_start, or what its budget spends on them)
    row: int = -1
    seq: Sequence | None = None
    notes: list = field(default_factory=list)
    state: str = "new"  # new, waiting, prefill, decode, done
    prefilled: int = 0  # prompt tokens in the cache
    cancelled: bool = False
    error: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    _gen: torch.Generator | None = None
    _done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return self.seq.text if self.seq else ""

    @property
    def tokens(self) -> list:
        return self.seq.tokens if self.seq else []

    @property
    def exit_layers(self) -> list:
        return self.seq.exit_layers if self.seq else []

    @property
    def heads(self) -> list:
        """Per generated token: 0 the full LM head, n a head of the first n shortlisted tokens."""
        return self.seq.heads if self.seq else []

    @property
    def finish_reason(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.error:
            return "error"
        return self.seq.finish if self.seq else "length"

    def wait(self, timeout=None) -> bool:
        return self._done_event.wait(timeout)


class Batcher:
    def __init__(self, model, max_batch: int = 8, max_len: int = 2048, prefill_chunk: int = 256,
                 slo_ms_per_token: float | None = None, native: bool | None = None, calibration="auto",
                 admission_control: bool = False):
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in (max_batch, max_len, prefill_chunk)):
            raise ValueError(f"max_batch, max_len and prefill_chunk must be positive ints, got {max_batch!r}, "
                             f"{max_len!r} and {prefill_chunk!r}")
        if slo_ms_per_token is not None and (isinstance(slo_ms_per_token, bool) or not isinstance(
                slo_ms_per_token, numbers.Real) or not (0 < slo_ms_per_token < float("inf"))):
            raise ValueError(f"slo_ms_per_token must be a finite number > 0 (milliseconds per step) or None, "
                             f"got {slo_ms_per_token!r}")
        check_calibration(calibration)
        check_flag("native", native, none="the native step where it exists")
        check_flag("admission_control", admission_control)
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be positive, got {max_batch} and {prefill_chunk}")
        self.model = model
        self.engine = Engine(model, max_batch, max_len, native=native)
        self.cache = self.engine.cache
        self.max_len, self.prefill_chunk = max_len, prefill_chunk
        stale = []
        self.calibration = load_calibration(model, notes=stale) if calibration == "auto" else calibration
        for note in stale:
            warnings.warn(note, stacklevel=2)
        self.ladder = sorted(model.exits) + [model.num_layers]  # exits, cheapest first
        self.slo_s = slo_ms_per_token / 1000.0 if slo_ms_per_token else None
        self.controller = (LoadController(self.ladder, exit_costs(model, self.calibration), self.slo_s)
                           if self.slo_s else None)
        self.admission_control = admission_control and self.controller is not None
        self.waiting: deque = deque()
        self.rows: dict = {}  # row -> Request
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self._ids = itertools.count()
        self._thread = None
        self._stopping = False
        self.draining = False
        # statistics (read by the server's /metrics)
        self.step_ema_s = None
        self.tokens_by_exit = {k: 0 for k in self.ladder}
        self.steps = 0
        self.row_moves = 0  # sequences moved to the front of the cache
        self.held = 0  # iterations in which the controller kept a waiting request out
        self.generated_tokens = 0
        self.moves = self.controller.moves if self.controller else {"down": 0, "up": 0}  # ceiling changes
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # requests, by how they ended

    # -- requests
    def resolve_exit(self, req: Request) -> tuple:
        """(exit, floor exit, notes) of a request, and req.head (a budget may buy a shortlisted head where
        the model has a vocabulary shortlist; req.shortlist as generate's); raises ValueError for a bad
        budget, exit or shortlist option."""
        m = self.model
        given = [x is not None for x in (req.budget, req.exit_layer, req.ms_per_token)]
        if sum(given) > 1:
            raise ValueError("give one of budget, exit_layer and ms_per_token")
        kind, value = (("exit", req.exit_layer) if req.exit_layer is not None else
                       ("latency", req.ms_per_token) if req.ms_per_token is not None else
                       ("budget", 1.0 if req.budget is None else req.budget))
        auto = req.full_start == "auto"
        req.opening, (k, req.head), note = resolve_plan(m, kind, value, self.calibration, req.shortlist,
                                                        req.max_new_tokens, OPENING if auto else 0)
        req.opening = req.opening if auto else req.full_start
        notes = [note] if note else []
        floor = k
        if req.min_budget is not None:
            floor, _ = choose_exit(m, req.min_budget, self.calibration)
            floor = min(floor, k)
        return k, floor, notes

    def submit(self, req: Request) -> Request:
        """Validates the request and queues it; raises ValueError (nothing queued) for a bad one."""
        if isinstance(req.prompt_ids, (str, bytes)) or not isinstance(req.prompt_ids, (list, tuple, torch.Tensor)):
            raise ValueError(f"prompt_ids must be a list of token ids (ints), got {type(req.prompt_ids).__name__}"
                             f" {reprlib.repr(req.prompt_ids)}")
        ids = req.prompt_ids.tolist() if isinstance(req.prompt_ids, torch.Tensor) else list(req.prompt_ids)
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompt_ids must be a list of token ids (ints), got {reprlib.repr(req.prompt_ids)}")
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        self.model.check_token_ids(ids)
        if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {req.max_new_tokens!r}")
        if len(ids) + req.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; with max_tokens={req.max_new_tokens} it needs "
                             f"{len(ids) + req.max_new_tokens} positions, past the context of {self.max_len}")
        real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)  # noqa: E731
        if not (real(req.temperature) and req.temperature >= 0 and req.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {req.temperature!r}")
        if not (real(req.top_p) and 0 < req.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {req.top_p!r}")
        if isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or req.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {req.top_k!r}")
        req.top_k = min(req.top_k, self.model.adapter.vocab_size)  # (top_k >= the vocabulary: no cut)
        check_penalties(req.presence_penalty, req.frequency_penalty, req.repetition_penalty, req.dry_multiplier,
                        req.dry_base, req.dry_allowed_length)
        if not (real(req.confidence) and 0 <= req.confidence <= 1):
            raise ValueError(f"confidence must be a number in [0, 1] (0: every token at its exit), "
                             f"got {req.confidence!r}")
        fs = req.full_start
        if not (isinstance(fs, str) and fs == "auto") and (
                isinstance(fs, bool) or not isinstance(fs, numbers.Integral) or fs < 0):
            raise ValueError(f"full_start must be 'auto' (a budget spends an opening where it fits) or an int >= 0 "
                             f"(answer tokens taken at the full depth before the request's route; 0: none), got "
                             f"{req.full_start!r}")
        req.target_exit, req.floor_exit, req.notes = self.resolve_exit(req)
        req.exit = req.target_exit  # (the controller's ceiling applies when the prompt is admitted)
        req.prompt_ids = ids
        stop_ids = stop_token_ids(self.model, req.stop_tokens)
        check_seed(req.seed)
        req.seq = Sequence(self.model.tokenizer, req.max_new_tokens, stop_ids, stop_strings(req.stop))
        req._gen = torch.Generator().manual_seed(req.seed if req.seed is not None else fresh_seed())
        with self.lock:
            if self.draining:
                raise RuntimeError("the server is shutting down and admits no new requests")
            req.id, req.state, req.t_submit = next(self._ids), "waiting", time.perf_counter()
            self.waiting.append(req)
            self.wake.notify_all()
        return req

    def cancel(self, req: Request):
        """Stops a request; its row is freed at the next token boundary (at once if it is waiting)."""
        with self.lock:
            req.cancelled = True
            if req.state == "waiting":
                self.waiting.remove(req)
                self._finish(req)
            self.wake.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    @property
    def running(self) -> int:
        return len(self.rows)

    # -- one token boundary
    @torch.no_grad()
    def iterate(self) -> bool:
        """Admits, prefills one chunk, decodes one token for every running sequence. Returns whether
        there was anything to do."""
        with self.lock:
            for req in [r for r in self.rows.values() if r.cancelled]:
                self._finish(req)
            while self.waiting and self.cache.rows_in_use < self.cache.B:
                if self.admission_control and self.rows and not self.controller.admits(
                        [(r.target_exit, r.floor_exit, int(self.cache.length[r.row])) for r in self.rows.values()],
                        (self.waiting[0].target_exit, self.waiting[0].floor_exit, len(self.waiting[0].prompt_ids))):
                    self.held += 1
                    break  # the load controller holds it in the queue: the floors could not keep the target
                req = self.waiting.popleft()
                if self.controller:
                    req.exit = self.controller.capped(req.target_exit, req.floor_exit, self.controller.cap)
                req.row = self.cache.alloc()
                self.cache.set_tokens(req.row, req.prompt_ids)
                req.state, self.rows[req.row] = "prefill", req
            if not self.rows:
                return False
        self._prefill()
        self._decode()
        return True

    def _prefill(self):
        budget = self.prefill_chunk
        for req in sorted((r for r in self.rows.values() if r.state == "prefill"), key=lambda r: r.id):
            if budget <= 0:
                break
            e = self.engine.row(req.row)
            n = len(req.prompt_ids)
            k, head = self._route(req)
            if n - req.prefilled > budget:  # a chunk of the prompt, the last token not yet
                upto = min(req.prefilled + budget, n - 1)
                e.catch_up([k], upto=torch.tensor([upto]))
                budget -= upto - req.prefilled
                req.prefilled = upto
                continue
            budget -= n - req.prefilled
            one = lambda x, dt: torch.tensor([x], dtype=dt)  # noqa: E731
            inputs = (one(req.temperature, torch.float32), one(req.top_k, torch.long), one(req.top_p, torch.float32),
                      torch.rand(1, generator=req._gen))
            nxt = e.prefill_step([k], *inputs, self._penalties([req], self.model), [head])
            deep = e.deepen_unsure([k], [req.confidence], *inputs, self._penalties([req], self.model))
            req.prefilled = n
            req.t_first = time.perf_counter()
            req.state = "decode"
            self._take(req, deep.get(0, int(nxt[0])), (self.model.num_layers, 0) if 0 in deep else (k, head))

    def _decode(self):
        # (a row whose first token came from this iteration's prefill takes its second one here)
        reqs = [r for r in self.rows.values() if r.state == "decode"]
        if not reqs:
            return
        n = self.cache.rows_in_use  # the rows in use are 0..n-1 (_finish keeps them at the front)
        lengths = self.cache.length[:n].tolist()
        if self.controller:
            for r, k in zip(reqs, self.controller.choose([(r.target_exit, r.floor_exit, lengths[r.row]) for r in reqs])):
                r.exit = k
        exits, heads = [0] * n, [0] * n
        temperature, top_k, top_p = torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.ones(n)
        uniform = torch.full((n,), 0.5)
        for r in reqs:
            exits[r.row], heads[r.row] = self._route(r)
            temperature[r.row], top_k[r.row], top_p[r.row] = r.temperature, r.top_k, r.top_p
            uniform[r.row] = torch.rand(1, generator=r._gen)[0]
        t0 = time.perf_counter()
        engine = self.engine.prefix(n)
        engine.catch_up(exits)
        t1 = time.perf_counter()
        penalties = self._penalties(reqs, self.model, n)
        nxt = engine.step(exits, temperature, top_k, top_p, uniform, penalties, heads)
        t2 = time.perf_counter()
        confidence = [0.0] * n
        for r in reqs:
            confidence[r.row] = r.confidence
        deep = engine.deepen_unsure(exits, confidence, temperature, top_k, top_p, uniform, penalties)
        self._observe(time.perf_counter() - t0)
        if self.controller:
            self.controller.observe(exits, lengths, t2 - t1)  # (the step alone: catch-ups are rare)
        for r, row in [(r, r.row) for r in reqs]:  # (taking one may move another's row)
            self._take(r, deep.get(row, int(nxt[row])), (self.model.num_layers, 0) if row in deep else
                       (exits[row], heads[row]))
        self.steps += 1

    @staticmethod
    def _penalties(reqs: list, model, n: int | None = None):
        """The repetition penalties of `reqs` on their rows 0..n-1 (n None: one request alone, row 0);
        None when all are off."""
        if all(r.presence_penalty == 0 and r.frequency_penalty == 0 and r.repetition_penalty == 1
               and r.dry_multiplier == 0 for r in reqs):
            return None
        rows = 1 if n is None else n
        pres, freq, rep, start = [0.0] * rows, [0.0] * rows, [1.0] * rows, [0] * rows
        dry, base, allowed = [0.0] * rows, [1.75] * rows, [2] * rows
        for r in reqs:
            b = 0 if n is None else r.row
            pres[b], freq[b], rep[b] = r.presence_penalty, r.frequency_penalty, r.repetition_penalty
            dry[b], base[b], allowed[b] = r.dry_multiplier, r.dry_base, r.dry_allowed_length
            start[b] = len(r.prompt_ids)
        return Penalties.of(rows, pres, freq, rep, start, dry, base, allowed, breakers=dry_breakers(model, dry))

    def _route(self, req: Request) -> tuple:
        """(exit, head) of the request's next token: the full depth and head in its full start, then its own."""
        return (self.model.num_layers, 0) if len(req.seq.tokens) < req.opening else (req.exit, req.head)

    def _take(self, req: Request, token: int, route: tuple):
        """The request's next token, taken at route (exit, head): recorded, streamed, and the row either
        extended or freed."""
        k, head = route
        piece = req.seq.add(token, k, head)
        self.tokens_by_exit[k] += 1
        self.generated_tokens += 1
        if req.on_piece is not None:
            req.on_piece(req, piece, token)
        if req.seq.done:
            with self.lock:
                self._finish(req)
        else:
            self.cache.append(req.row, token)

    def _finish(self, req: Request):
        if req.row >= 0 and self.rows.get(req.row) is req:
            del self.rows[req.row]
            self.cache.free(req.row)
            last = self.cache.rows_in_use  # the rows in use stay 0..n-1: the last one fills the gap
            if req.row < last:
                moved = self.rows.pop(last)
                self.cache.move(last, req.row)
                moved.row, self.rows[req.row] = req.row, moved
                self.row_moves += 1
        req.state, req.t_done = "done", time.perf_counter()
        self.finished[req.finish_reason] += 1
        if req.on_done is not None:
            req.on_done(req)
        req._done_event.set()

    def _observe(self, seconds: float):
        self.step_ema_s = seconds if self.step_ema_s is None else 0.7 * self.step_ema_s + 0.3 * seconds

    # -- the background thread
    def start(self):
        """Runs iterate() in a daemon thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="balcony-batcher", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stopping:
            try:
                worked = self.iterate()
            except Exception as exc:  # a fault fails the running requests, not the server
                self._fail_running(exc)
                worked = True
            if not worked:
                with self.lock:
                    if not self.busy and not self._stopping:
                        self.wake.wait(0.5)

    def _fail_running(self, exc):
        with self.lock:
            for req in list(self.rows.values()):
                req.error = f"{type(exc).__name__}: {exc}"
                self._finish(req)

    def drain(self, timeout: float | None = None) -> bool:
        """Stops admitting new requests and waits until the running and waiting ones finish."""
        with self.lock:
            self.draining = True
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:  # (_finish runs under the lock: a row leaves and its request is done at once)
                if not self.busy:
                    return True
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.01)

    def stop(self):
        self._stopping = True
        with self.lock:
            self.wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

"""What a token may cost: the relative cost of each exit, calibrations, and budgets turned into exits.

A budget in (0, 1] is the fraction of the full model's per-token cost the caller allows; the deepest
exit whose cost fits is taken (1.0 is the full model). With a vocabulary shortlist attached
(shortlist.py) a budget buys a route: a depth and a head, the full head or one of the shortlist's
sizes, which read fewer head rows: the deepest depth that fits, with the largest head that fits
there (so 0.85 buys the full depth with a shortlisted head rather than a shallower exit). A route is
(depth, head): head 0 is the full head, n the first n shortlisted tokens. Costs come from a
calibration (measured milliseconds per token on this machine, `balcony calibrate`), else from the
parameters read per token. `exit_layer=k` picks an exit directly, `ms_per_token=x` the deepest exit
whose calibrated latency fits. plan_opening spends a budget over a whole answer instead: an opening at
the full depth, then a route cheap enough that the answer's average fits (generate's full_start="auto").
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

from torch import nn


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def costs(model) -> dict:
    """Parameters read per token by each method at each depth, and by the full model."""
    a = model.adapter
    layer = [_count(l) for l in a.layers]
    head = a.lm_head.weight.numel()
    norm = _count(a.final_norm)
    exit_params = _count(model.exit_module(model.exits[0])) if model.exits else layer[-1] + norm
    hidden = a.hidden_size
    out = {"full": sum(layer) + norm + head}
    for k in range(1, model.num_layers):
        base = sum(layer[:k]) + head
        out[("balcony", k)] = base + exit_params
        out[("untrained", k)] = base + exit_params
        out[("truncation", k)] = base + norm
        out[("affine", k)] = base + hidden * hidden + hidden + norm
    return out


def head_cost(model, k: int, n: int, c: dict | None = None) -> float:
    """The parameter cost of depth k with a head of the first n shortlisted tokens, relative to that
    depth with the full head (c: costs(model), when the caller has it)."""
    c = costs(model) if c is None else c
    a = model.adapter
    base = c["full"] if k == model.num_layers else c[("balcony", k)]
    return 1.0 - (a.vocab_size - n) * a.hidden_size / base


def head_sizes(model, shortlist=None) -> list:
    """The heads a budget may buy under the `shortlist` option: None the full head and every size the
    model's shortlist offers; False the full head only; True the offered sizes only; an int n that
    head only (0: the full one). Raises for an option the model cannot serve."""
    listed = getattr(model, "shortlist", None)
    if shortlist is not None and not isinstance(shortlist, int):  # (bool is an int)
        raise ValueError(f"shortlist must be None, True, False or a head size (an int), got {shortlist!r}")
    if shortlist is None:
        return [0] + (list(model.shortlist_sizes) if listed is not None else [])
    if shortlist is False or (shortlist is not True and shortlist == 0):
        return [0]
    if listed is None:
        raise ValueError(f"shortlist={shortlist!r}: the model has no vocabulary shortlist (bx.set_shortlist / "
                         "bx.load(shortlist=...))")
    if shortlist is True:
        return list(model.shortlist_sizes)
    if not 0 <= shortlist <= listed.numel():
        raise ValueError(f"shortlist must be None, True, False or a head size in 0..{listed.numel()} (the "
                         f"shortlist's length; 0: the full head), got {shortlist!r}")
    return [shortlist]


def route_costs(model, calibration: dict | None = None, shortlist=None) -> dict:
    """{(depth, head): relative per-token cost} of every route a budget may buy under the `shortlist`
    option (head_sizes). A calibration's measured figure for a route is used where it has one, else
    its full-head figure at that depth scaled by the parameters."""
    full = exit_costs(model, calibration)
    out = {}
    measured = (calibration or {}).get("shortlist_ms_per_token") or {}
    L = model.num_layers
    params = costs(model)
    for n in head_sizes(model, shortlist):
        for k, c in full.items():
            if n == 0:
                out[(k, 0)] = c
            elif str(n) in measured.get(str(k), {}):
                out[(k, n)] = float(measured[str(k)][str(n)]) / float(calibration["ms_per_token"][str(L)])
            else:
                out[(k, n)] = c * head_cost(model, k, n, params)
    return out


def calibration_path(model) -> Path:
    root = Path(os.environ.get("BALCONY_CACHE", Path.home() / ".cache" / "balcony_ext"))
    return root / "calibration" / f"{model.name}.json"


def exit_costs(model, calibration: dict | None = None) -> dict:
    """{depth: relative per-token cost} for every attached exit and the full model (num_layers: 1.0).
    From a calibration's measured ms/token when given, else from parameters read per token
    (layers run + exit + LM head), which is bytes read up to the element size."""
    L = model.num_layers
    if calibration is not None:
        ms = {int(k): float(v) for k, v in calibration["ms_per_token"].items()}
        missing = [k for k in model.exits + [L] if k not in ms]
        if missing:
            raise ValueError(f"the calibration has no figure for exits {missing}; run `balcony calibrate` again")
        return {k: ms[k] / ms[L] for k in model.exits + [L]}
    c = costs(model)
    out = {k: c[("balcony", k)] / c["full"] for k in model.exits}
    out[L] = 1.0
    return out


def load_calibration(model, path=None, notes: list | None = None) -> dict | None:
    """The saved calibration for this model (None if there is none). One saved before the model's
    exits changed (it lacks a figure for an attached exit) is an error when `path` names it, and
    otherwise not used: None, with a note appended to `notes` (costs then come from the parameters)."""
    p = Path(path) if path is not None else calibration_path(model)
    if not p.exists():
        return None
    try:
        cal = json.loads(p.read_text())
        if not isinstance(cal, dict) or cal.get("model") != model.name or "ms_per_token" not in cal:
            return None
        check_calibration(cal)
    except (OSError, ValueError) as exc:  # (json.JSONDecodeError is a ValueError)
        raise ValueError(f"the calibration file {p} is damaged ({exc}); run `balcony calibrate` again") from exc
    missing = [k for k in model.exits + [model.num_layers] if str(k) not in cal["ms_per_token"]]
    if missing:
        why = (f"the calibration {p} has no figure for exits {missing} (it was measured before they were "
               "attached); run `balcony calibrate` again")
        if path is not None:
            raise ValueError(why)
        if notes is not None:
            notes.append(why + "; costs come from the parameters until then")
        return None
    return cal


def check_calibration(calibration) -> None:
    """A calibration option: "auto" (the saved one, if any), None (none) or a calibration dict, whose
    ms_per_token (and shortlist_ms_per_token, where present) map depths to positive milliseconds."""
    if calibration is None or (isinstance(calibration, str) and calibration == "auto"):
        return
    if not isinstance(calibration, dict) or not isinstance(calibration.get("ms_per_token"), dict):
        raise ValueError("calibration must be 'auto', None or a calibration (a dict with 'ms_per_token', as "
                         f"balcony_ext.calibrate returns), got {type(calibration).__name__} {calibration!r:.80}")

    def check(table: dict, where: str):
        for k, v in table.items():
            if not str(k).isdigit():
                raise ValueError(f"calibration {where}: the key {k!r} is not a depth (the number of layers run, "
                                 "as balcony_ext.calibrate writes them)")
            if isinstance(v, dict):
                check(v, f"{where}[{k!r}]")
            elif isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"calibration {where}[{k!r}] must be a positive number of milliseconds, got {v!r}")

    check(calibration["ms_per_token"], "ms_per_token")
    short = calibration.get("shortlist_ms_per_token")
    if short is not None:
        if not isinstance(short, dict):
            raise ValueError(f"calibration shortlist_ms_per_token must be a dict, got {short!r:.80}")
        check(short, "shortlist_ms_per_token")


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a number in (0, 1], got {type(budget).__name__} {budget!r}")
    if not 0.0 < float(budget) <= 1.0 or math.isnan(budget):
        raise ValueError(f"budget must be in (0, 1] (a fraction of the full model's per-token cost), got {budget}")


def choose_route(model, budget: float, calibration: dict | None = None, shortlist=None) -> tuple:
    """((depth, head), note): of the routes whose relative cost fits the budget in (0, 1] (route_costs),
    the deepest, with the largest head that fits there."""
    _check_budget(budget)
    budget = float(budget)  # (a numpy scalar or a Fraction, as a plain number from here on)
    costs = route_costs(model, calibration, shortlist)
    fitting = [r for r, c in costs.items() if c <= budget + 1e-9]
    V = model.adapter.vocab_size
    if fitting:
        return max(fitting, key=lambda r: (r[0], r[1] or V)), None
    r = min(costs, key=costs.get)
    head = f" with a {r[1]}-token head" if r[1] else ""
    return r, f"budget {budget:g} is below the cheapest exit (depth {r[0]}{head}, cost {costs[r]:.3f}); using it"


OPENING = 64  # the longest opening a budget spends at the full depth (full_start="auto")


def plan_opening(model, budget: float, max_new_tokens: int, calibration: dict | None = None, shortlist=None,
                 longest: int = OPENING) -> tuple:
    """(K, (depth, head), note): a budget spent over an answer of max_new_tokens tokens N as an opening
    of K tokens at the full depth with the full head, then a route, so that (K + (N - K) * cost) / N fits
    the budget: the longest opening up to `longest` after which some route fits, then the deepest route
    (with the largest head) that fits what is left. An exit continues the full model's opening far
    closer to the full model's answer than its own (docs/results/full_start.md), so the opening comes
    first. A budget that buys the full depth per token (with a shortlisted head) keeps it: the full
    depth follows its own course. The answer never costs more than budget * N full-depth tokens; one
    that stops early spends less in all (but more per token)."""
    _check_budget(budget)
    b, N = float(budget), max_new_tokens
    costs = route_costs(model, calibration, shortlist)
    V, L = model.adapter.vocab_size, model.num_layers
    plain, note = choose_route(model, budget, calibration, shortlist)
    if plain[0] == L:
        return 0, plain, None
    for K in range(min(longest, N - 1), -1, -1):
        allowed = (b * N - K) / (N - K)
        fitting = [r for r, c in costs.items() if c <= allowed + 1e-9]
        if fitting:
            return K, max(fitting, key=lambda r: (r[0], r[1] or V)), None
    return 0, plain, note


def choose_exit(model, budget: float, calibration: dict | None = None) -> tuple:
    """(exit depth, note): the deepest exit whose relative cost with the full head fits the budget."""
    (k, _), note = choose_route(model, budget, calibration, shortlist=0)
    return k, note


def exit_for_latency(model, ms_per_token: float, calibration: dict | None) -> tuple:
    if (isinstance(ms_per_token, bool) or not isinstance(ms_per_token, numbers.Real)
            or not (math.isfinite(ms_per_token) and ms_per_token > 0)):
        raise ValueError(f"ms_per_token must be a finite number > 0 (milliseconds per token), got {ms_per_token!r}")
    if calibration is None:
        raise ValueError("a latency target needs a calibration of this machine: run `balcony calibrate` "
                         "(or balcony_ext.calibrate(model)) first")
    ms = {int(k): float(v) for k, v in calibration["ms_per_token"].items() if int(k) in model.exits + [model.num_layers]}
    fitting = [k for k, v in ms.items() if v <= ms_per_token]
    if fitting:
        return max(fitting), None
    k = min(ms, key=ms.get)
    return k, f"{ms_per_token:g} ms/token is below the fastest exit (depth {k}, {ms[k]:.2f} ms/token); using it"


def resolve_route(model, kind: str, value, calibration: dict | None, shortlist=None) -> tuple:
    """((depth, head), note or None) for one sequence's `value` of kind "budget", "exit" (exit_layer)
    or "latency" (ms_per_token); exit_layer and ms_per_token take the largest head the shortlist
    option allows (the full one by default). Raises for a bad value or option."""
    sizes = head_sizes(model, shortlist)
    head = 0 if 0 in sizes else max(sizes)
    if kind == "exit":
        model.check_exit(value, "exit_layer")
        return (value, head), None
    if kind == "latency":
        k, note = exit_for_latency(model, value, calibration)
        return (k, head), note
    return choose_route(model, value, calibration, shortlist)


def resolve_plan(model, kind: str, value, calibration: dict | None, shortlist=None, max_new_tokens=None,
                 opening: int = 0) -> tuple:
    """(K, (depth, head), note) for one sequence: with opening > 0 a budget is spent over max_new_tokens
    (plan_opening, K tokens at the full depth first); otherwise, and for exit_layer and ms_per_token,
    the route resolve_route gives every token (K = 0)."""
    if kind == "budget" and opening > 0:
        return plan_opening(model, value, max_new_tokens, calibration, shortlist, opening)
    return (0, *resolve_route(model, kind, value, calibration, shortlist))


class Budgets:
    """Turns budget / exit_layer / ms_per_token (numbers, per-sequence lists, schedules or
    callables of the step) into the exit of every row at every step. With `opening` > 0 (and
    max_new_tokens), a budget that is a number (or per-sequence list of numbers) is spent over the answer
    (plan_opening): `openings[b]` tokens at the full depth first, then the route returned by routes();
    schedules, callables, exit_layer and ms_per_token price every token alike (openings 0)."""

    def __init__(self, model, B, budget, exit_layer, ms_per_token, calibration, shortlist=None,
                 max_new_tokens=None, opening=0):
        given = [x is not None for x in (budget, exit_layer, ms_per_token)]
        if sum(given) > 1:
            raise ValueError("give one of budget, exit_layer and ms_per_token")
        if not any(given):
            budget = 1.0
        head_sizes(model, shortlist)  # (validates the option before anything else)
        self.model, self.B, self.cal, self.shortlist = model, B, calibration, shortlist
        self.max_new, self.opening = max_new_tokens, opening
        self.kind = "budget" if budget is not None else "exit" if exit_layer is not None else "latency"
        self.notes = [[] for _ in range(B)]
        self.set(budget if budget is not None else exit_layer if exit_layer is not None else ms_per_token, 0)

    def set(self, value, step: int):
        """Uses `value` from `step` on. It is resolved for that step first: a bad value raises and changes
        nothing (the resolution is kept for that step, so a callable is still called once per step; a
        number or a per-sequence list resolves the same at every step and is kept for all). A number
        set mid-answer makes the plan it would have made from the start: what is left of its opening
        (answer tokens before openings[b]) at the full depth, then its route."""
        fixed = not callable(value) and not isinstance(value, dict)
        if fixed:  # (a number or per-sequence list: spent over the answer where openings are on)
            plans = [resolve_plan(self.model, self.kind, v, self.cal, self.shortlist, self.max_new, self.opening)
                     for v in self._rows(value)]
            openings, resolved = [K for K, _, _ in plans], [(route, note) for _, route, note in plans]
        else:
            openings, resolved = [0] * self.B, self._resolve(value, step)
        self.value, self._resolved, self._fixed, self.openings = value, (step, resolved), fixed, openings

    def _one(self, v, b):
        """((depth, head), note or None) for one row's value (resolve_route)."""
        return resolve_route(self.model, self.kind, v, self.cal, self.shortlist)

    def _rows(self, v) -> list:
        """One value per row from a number or a per-sequence list."""
        if isinstance(v, (list, tuple)):
            if len(v) != self.B:
                raise ValueError(f"{len(v)} per-sequence values for {self.B} prompts")
            return list(v)
        return [v] * self.B

    def _resolve(self, v, step: int) -> list:
        """[((exit, head), note or None)] of every row at `step` for the value v; raises for a bad value."""
        if callable(v):
            v = v(step)
        elif isinstance(v, dict):  # schedule {from_step: value}
            bad = [k for k in v if isinstance(k, bool) or not isinstance(k, int) or k < 0]
            if bad:
                raise ValueError(f"a budget schedule maps steps (ints >= 0) to budgets, got the key {bad[0]!r} "
                                 f"in {v!r:.80}")
            keys = sorted(k for k in v if k <= step)
            if not keys:
                raise ValueError(f"the budget schedule {v} has no entry for step {step} (start it at 0)")
            v = v[keys[-1]]
        return [self._one(x, b) for b, x in enumerate(self._rows(v))]

    def routes(self, step: int) -> list:
        """[(exit depth, head)] of every row at `step` (head: 0 the full one, n the first n shortlisted
        tokens); a row still in its opening (openings) is at the full depth whatever this says."""
        at, resolved = self._resolved
        out = []
        for b, (route, note) in enumerate(resolved if at == step or self._fixed else self._resolve(self.value, step)):
            if note and note not in self.notes[b]:
                self.notes[b].append(note)
            out.append(route)
        return out

    def exits(self, step: int) -> list:
        return [k for k, _ in self.routes(step)]

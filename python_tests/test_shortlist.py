"""The vocabulary shortlist: building, files, the shortlisted head in every engine path, budgets'
routes, generation, batching and the evaluations."""

import json

import pytest
import torch

import balcony_ext as bx
from balcony_ext.batcher import Batcher, Request
from balcony_ext.budgets import choose_route, route_costs
from balcony_ext.engine import Engine
from balcony_ext.model import attach
from balcony_ext.shortlist import (ShortlistFileError, build_shortlist, check_shortlist, coverage, load_shortlist,
                                   save_shortlist, set_shortlist)
from tiny_models import tiny_balcony

L = 6
EXITS = [2, 4]
V = 256


def _model(dtype=torch.float32, shortlist=True):
    m = tiny_balcony("llama", seed=0, layers=L, initializer_range=0.2)
    attach(m, EXITS, init="random", seed=1)
    m = m.to(dtype)
    if shortlist:
        set_shortlist(m, _ids())
    return m


def _ids():
    """Every third token and the end-of-sequence token (2): 86 of 256."""
    return sorted(set(range(0, V, 3)) | {2})


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (4 + 3 * i,), generator=g).tolist() for i in range(n)]


def _off(ids=None):
    off = torch.ones(V, dtype=torch.bool)
    off[torch.tensor(ids or _ids())] = False
    return off


# -- the list and its file
def test_check_shortlist_names_each_problem():
    m = _model(shortlist=False)
    for bad, words in [([], "empty"), ([[1, 2]], "1-D"), ([2, 5, 300], "outside the vocabulary"),
                       ([2, 5, 5], "repeats token 5"), (list(range(V)), "whole vocabulary"), ([3, 4], "lacks end"),
                       (torch.tensor([2.0, 3.0]), "token ids")]:
        with pytest.raises(ValueError, match=words):
            check_shortlist(m, bad)
    t = check_shortlist(m, [9, 2, 5])
    assert t.tolist() == [2, 5, 9] and t.dtype == torch.long


def test_build_shortlist_ranks_by_weighted_frequency_and_keeps_the_stop_token():
    m = _model(shortlist=False)
    a = [[10, 10, 10, 11, 11, 12], [10, 13]]
    b = [torch.tensor([50, 50, 50, 50, 51])]
    assert build_shortlist(m, [a], size=3).tolist() == [2, 10, 11]  # the stop token is kept beyond the size
    # b at a small weight only orders what a never used: 12 and 13 (1/8 each) beat 50 (0.01 * 4/5)
    assert build_shortlist(m, [a, b], size=6, weights=[1.0, 0.01]).tolist() == [2, 10, 11, 12, 13, 50]
    # at an equal weight 50 (4/5) beats everything
    assert build_shortlist(m, [a, b], size=3, weights=[1.0, 1.0]).tolist() == [2, 10, 50]
    assert build_shortlist(m, [[[7]]], size=4).tolist() == [0, 1, 2, 7]  # ties: lower ids first
    with pytest.raises(ValueError, match="size"):
        build_shortlist(m, [a], size=V)
    with pytest.raises(ValueError, match="weights"):
        build_shortlist(m, [a], size=4, weights=[0.0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_shortlist(m, [[[V + 5]]], size=4)
    assert coverage([2, 10], [10, 10, 11, 2]) == 0.75


def test_shortlist_file_round_trip_and_refusals(tmp_path):
    m = _model()
    p = save_shortlist(m, tmp_path / "s.safetensors", extra={"note": "x"})
    other = _model(shortlist=False)
    load_shortlist(other, p)
    assert torch.equal(other.shortlist, m.shortlist)
    # another vocabulary
    small = tiny_balcony("llama", seed=0, layers=2, vocab=128)
    with pytest.raises(ShortlistFileError, match="another vocabulary"):
        load_shortlist(small, p)
    assert small.shortlist is None
    # damaged and foreign files
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ShortlistFileError, match="damaged or truncated"):
        load_shortlist(other, bad)
    bx.save_exits(m, tmp_path / "exits.safetensors")
    with pytest.raises(ShortlistFileError, match="not a balcony shortlist"):
        load_shortlist(other, tmp_path / "exits.safetensors")
    with pytest.raises(FileNotFoundError):
        load_shortlist(other, tmp_path / "missing.safetensors")


# -- the engine
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "composed"])
def test_shortlisted_rows_get_the_full_logits_masked_to_the_list(dtype, native, cpu_capability):
    m = _model(dtype)
    prompts = _prompts(3)
    exits = [2, L, 4]
    off = _off()
    full, listed, mixed = (Engine(m, 3, 40, native=native) for _ in range(3))
    for e in (full, listed, mixed):
        e.add_prompts(prompts)
    greedy = (torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.rand(3))
    tol = 2e-4 if dtype == torch.float32 else 2e-3
    for step in range(4):
        outs = []
        for e, short in ((full, None), (listed, [True] * 3), (mixed, [True, False, True])):
            if step == 0:
                outs.append(e.prefill_step(exits, *greedy, short=short))
            else:
                e.catch_up(exits)
                outs.append(e.step(exits, *greedy, short=short))
        want = full.logits.masked_fill(off, float("-inf"))
        torch.testing.assert_close(listed.logits, want, atol=tol, rtol=tol)  # the compact head: only listed rows
        torch.testing.assert_close(mixed.logits[[0, 2]], want[[0, 2]], atol=tol, rtol=tol)
        torch.testing.assert_close(mixed.logits[1], full.logits[1], atol=tol, rtol=tol)
        assert torch.equal(outs[1], want.argmax(-1))
        assert all(int(t) in set(_ids()) for t in outs[1])
        assert torch.equal(outs[2][[0, 2]], outs[1][[0, 2]]) and int(outs[2][1]) == int(outs[0][1])
        for e, nxt in zip((full, listed, mixed), (outs[0], outs[0], outs[0])):  # one token stream for all
            for b in range(3):
                e.append(b, int(nxt[b]))


def test_shortlisted_composed_step_has_no_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    from test_generate import COMPOSED_STEP_OPS, SYNCS

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(f"{func.namespace}.{func._opname}")
            return func(*args, **(kwargs or {}))

    m = _model()
    for short in ([True, True, True, True], [True, False, True, True]):  # compact head; masked rows
        e = Engine(m, 4, 32, native=False)
        e.add_prompts(_prompts(4))
        exits = [2, 4, L, 0]
        e.catch_up(exits)
        pos = (e.cache.length - 1).clamp(min=0)
        last = e.cache.tokens[torch.arange(4), pos]
        rows, compact = e._short_rows(exits, short)
        assert compact == all(short)
        sampling = (torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.rand(4))
        with Record() as rec:
            e._composed_step(last, pos, torch.tensor(exits), *sampling, exits=exits, short_rows=rows, compact=compact)
        assert not SYNCS & set(rec.ops), sorted(SYNCS & set(rec.ops))
        allowed = COMPOSED_STEP_OPS | {"aten.index_copy_", "aten.masked_fill"}
        assert set(rec.ops) <= allowed, sorted(set(rec.ops) - allowed)


def test_engine_refuses_a_shortlisted_row_without_a_shortlist():
    m = _model(shortlist=False)
    e = Engine(m, 1, 16)
    e.add_prompts(_prompts(1))
    with pytest.raises(ValueError, match="no shortlist"):
        e.prefill_step([L], torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.rand(1),
                       short=[True])


# -- budgets and generation
def test_budgets_buy_the_deepest_route_that_fits():
    m = _model()
    costs = route_costs(m)
    assert set(costs) == {(k, s) for k in EXITS + [L] for s in (False, True)}
    for k in EXITS + [L]:
        assert costs[(k, True)] < costs[(k, False)]
    assert costs[(L, False)] == 1.0
    assert choose_route(m, 1.0) == ((L, False), None)
    assert choose_route(m, costs[(L, True)]) == ((L, True), None)
    # between the shortlisted full depth and the full-head exit 4: the deeper route
    assert choose_route(m, costs[(L, True)] - 1e-3)[0] == ((4, False) if costs[(4, False)] < costs[(L, True)]
                                                          else (4, True))
    assert choose_route(m, costs[(2, True)])[0] == (2, True)
    assert choose_route(m, 0.01)[0] == (2, True) and "below the cheapest" in choose_route(m, 0.01)[1]
    assert choose_route(m, costs[(L, True)], shortlist=False)[0][1] is False
    assert choose_route(m, 1.0, shortlist=True)[0] == (L, True)
    # a calibration's measured figures for the shortlisted head win over the parameter estimate
    cal = dict(ms_per_token={"2": 1.0, "4": 2.0, str(L): 4.0}, shortlist_ms_per_token={"2": 0.5, "4": 1.0, str(L): 3.8})
    assert route_costs(m, cal)[(L, True)] == pytest.approx(0.95) and route_costs(m, cal)[(2, True)] == 0.125
    assert choose_route(m, 0.96, cal)[0] == (L, True)


def test_generate_with_the_shortlist():
    m = _model()
    listed = set(_ids())
    p = _prompts(1)[0]
    out = bx.generate(m, p, exit_layer=L, shortlist=True, max_new_tokens=12, stop_tokens=[], calibration=None)
    assert set(out.tokens) <= listed and out.shortlisted == [True] * 12 and out.exit_layers == [L] * 12
    full = bx.generate(m, p, budget=1.0, max_new_tokens=12, stop_tokens=[], calibration=None)
    assert full.shortlisted == [False] * 12
    cheap = route_costs(m)[(L, True)]
    auto = bx.generate(m, p, budget=cheap, max_new_tokens=12, stop_tokens=[], calibration=None)
    assert auto.tokens == out.tokens and all(auto.shortlisted)
    never = bx.generate(m, p, budget=cheap, shortlist=False, max_new_tokens=4, stop_tokens=[], calibration=None)
    assert not any(never.shortlisted) and never.exit_layers[0] < L
    # sampled: the same seed gives the same tokens whatever the batch around the row
    kw = dict(exit_layer=4, shortlist=True, max_new_tokens=10, stop_tokens=[], calibration=None, temperature=1.0,
              top_p=0.9, seed=7)
    alone = bx.generate(m, p, **kw)
    assert set(alone.tokens) <= listed
    with pytest.raises(ValueError, match="shortlist must be"):
        bx.generate(m, p, shortlist="yes", max_new_tokens=2, calibration=None)
    with pytest.raises(ValueError, match="no vocabulary shortlist"):
        bx.generate(_model(shortlist=False), p, shortlist=True, max_new_tokens=2, calibration=None)


def test_batcher_serves_shortlisted_budgets_as_generate_does(cpu_capability):
    m = _model()
    cheap = route_costs(m)[(L, True)]
    b = Batcher(m, max_batch=3, max_len=64, prefill_chunk=64, calibration=None)
    reqs = [b.submit(Request(ids, max_new_tokens=6, stop_tokens=[], budget=budget))
            for ids, budget in zip(_prompts(3, seed=3), (cheap, 1.0, 0.3))]
    while b.busy:
        b.iterate()
    for r in reqs:
        alone = bx.generate(m, r.prompt_ids, budget=r.budget, max_new_tokens=6, stop_tokens=[], calibration=None)
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers
        assert r.seq.shortlisted == alone.shortlisted
    assert reqs[0].seq.shortlisted == [True] * 6 and reqs[1].seq.shortlisted == [False] * 6


# -- the evaluations
def test_evaluations_report_the_shortlisted_routes(tmp_path):
    from balcony_ext.chat_eval import evaluate_chat
    from tiny_models import ChatByteTokenizer

    m = _model()
    m.tokenizer = ChatByteTokenizer()
    set_shortlist(m, sorted(set(range(0, V, 3)) | {2, 255}))
    prompts = ["hello there", "why is it so", "tell me more"]
    rows = evaluate_chat(m, prompts=prompts, max_new_tokens=8, progress=False)
    for k in EXITS + [L]:
        r = rows[("shortlist", k)]
        assert 0 <= r["chat_top1"] <= 1 and r["chat_kl"] is None and "chat_f1" in r
    # the shortlisted full depth agrees with the full model exactly where the answer's token is listed
    answers = [t for p in prompts for t in bx.generate(m, p, max_new_tokens=8, calibration=None).tokens]
    assert rows[("shortlist", L)]["chat_top1"] == pytest.approx(coverage(m.shortlist, answers))
    # a shortlist holding every token the full model's answers use: the shortlisted full depth is it
    used = set(answers)
    set_shortlist(m, sorted(set(range(V)) - {min(set(range(3, V)) - used)}))
    rows = evaluate_chat(m, prompts=prompts, max_new_tokens=8, progress=False)
    assert rows[("shortlist", L)]["chat_top1"] == 1.0 and rows[("shortlist", L)]["chat_f1"] == 1.0

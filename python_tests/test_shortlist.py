"""The vocabulary shortlist: building, files, shortlisted heads in every engine path, budgets'
routes, generation, batching and the evaluations."""

import json

import pytest
import torch

import balcony_ext as bx
from balcony_ext.batcher import Batcher, Request
from balcony_ext.budgets import choose_route, plan_opening, route_costs
from balcony_ext.engine import Engine
from balcony_ext.model import attach
from balcony_ext.shortlist import (ShortlistFileError, build_shortlist, check_shortlist, coverage, load_shortlist,
                                   save_shortlist, set_shortlist)
from step_checks import RecordOps
from tiny_models import tiny_balcony

L = 6
EXITS = [2, 4]
V = 256


SIZES = [86, 40]


def _model(dtype=torch.float32, shortlist=True):
    m = tiny_balcony("llama", seed=0, layers=L, initializer_range=0.2)
    attach(m, EXITS, init="random", seed=1)
    m = m.to(dtype)
    if shortlist:
        set_shortlist(m, _ids(), sizes=SIZES)
    return m


def _ids():
    """A ranking of 86 of the 256 tokens: the end-of-sequence token (2), then every third token from
    the top down (heads: the first 86 and the first 40)."""
    return [2] + list(range(255, 0, -3))[:85]


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (4 + 3 * i,), generator=g).tolist() for i in range(n)]


def _off(n):
    off = torch.ones(V, dtype=torch.bool)
    off[torch.tensor(_ids()[:n])] = False
    return off


# -- the list and its file
def test_check_shortlist_names_each_problem():
    m = _model(shortlist=False)
    for bad, words in [([], "empty"), ([[1, 2]], "1-D"), ([2, 5, 300], "outside the vocabulary"),
                       ([2, 5, 5], "repeats token 5"), (list(range(V)), "whole vocabulary"), ([3, 4], "lack end"),
                       (torch.tensor([2.0, 3.0]), "token ids")]:
        with pytest.raises(ValueError, match=words):
            check_shortlist(m, bad)
    t, sizes = check_shortlist(m, [9, 2, 5])
    assert t.tolist() == [9, 2, 5] and t.dtype == torch.long and sizes == [3]  # the rank order is kept
    with pytest.raises(ValueError, match="first 1 tokens of the shortlist lack"):  # every head must hold it
        check_shortlist(m, [9, 2, 5], sizes=[3, 1])
    with pytest.raises(ValueError, match="sizes must be ints in 1..3"):
        check_shortlist(m, [9, 2, 5], sizes=[4])
    from balcony_ext.shortlist import default_sizes
    assert default_sizes(32768) == [32768, 16384, 8192, 4096, 2048] and default_sizes(3000) == [3000]


def test_build_shortlist_ranks_by_weighted_frequency_and_keeps_the_stop_token():
    m = _model(shortlist=False)
    a = [[10, 10, 10, 11, 11, 12], [10, 13]]
    b = [torch.tensor([50, 50, 50, 50, 51])]
    assert build_shortlist(m, [a], size=3).tolist() == [2, 10, 11]  # the stop token ranks first
    # b at a small weight only orders what a never used: 12 and 13 (1/8 each) beat 50 (0.01 * 4/5)
    assert build_shortlist(m, [a, b], size=6, weights=[1.0, 0.01]).tolist() == [2, 10, 11, 12, 13, 50]
    # at an equal weight 50 (4/5) beats everything
    assert build_shortlist(m, [a, b], size=3, weights=[1.0, 1.0]).tolist() == [2, 50, 10]
    assert build_shortlist(m, [[[7]]], size=4).tolist() == [2, 7, 0, 1]  # ties: lower ids first
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
    assert torch.equal(other.shortlist, m.shortlist) and other.shortlist_sizes == SIZES
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
    full, listed, mixed = (Engine(m, 3, 40, native=native) for _ in range(3))
    for e in (full, listed, mixed):
        e.add_prompts(prompts)
    greedy = (torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.rand(3))
    tol = 2e-4 if dtype == torch.float32 else 2e-3
    # listed: every row shortlisted (the compact head: 86 rows computed, the 40-token row masked further);
    # mixed: one row with the full head (the full head computed, the others masked)
    for step in range(4):
        outs = []
        for e, heads in ((full, None), (listed, [86, 40, 86]), (mixed, [40, 0, 86])):
            if step == 0:
                outs.append(e.prefill_step(exits, *greedy, heads=heads))
            else:
                e.catch_up(exits)
                outs.append(e.step(exits, *greedy, heads=heads))
        want = {n: full.logits.masked_fill(_off(n), float("-inf")) for n in SIZES}
        for row, n in enumerate([86, 40, 86]):
            torch.testing.assert_close(listed.logits[row], want[n][row], atol=tol, rtol=tol)
            assert int(outs[1][row]) == int(want[n][row].argmax()) and int(outs[1][row]) in _ids()[:n]
        for row, n in enumerate([40, 0, 86]):
            torch.testing.assert_close(mixed.logits[row], want[n][row] if n else full.logits[row], atol=tol, rtol=tol)
        assert int(outs[2][0]) == int(want[40][0].argmax()) and int(outs[2][1]) == int(outs[0][1])
        assert int(outs[2][2]) == int(outs[1][2])
        for e in (full, listed, mixed):  # one token stream for all
            for b in range(3):
                e.append(b, int(outs[0][b]))


def test_shortlisted_composed_step_has_no_host_sync():
    from test_generate import COMPOSED_STEP_OPS, SYNCS

    m = _model()
    for heads in ([86, 40, 86, 0], [86, 0, 40, 40]):  # compact head (the idle row aside); masked rows
        e = Engine(m, 4, 32, native=False)
        e.add_prompts(_prompts(4))
        exits = [2, 4, L, 0]
        e.catch_up(exits)
        pos = (e.cache.length - 1).clamp(min=0)
        last = e.cache.tokens[torch.arange(4), pos]
        plan = e._head_plan(exits, heads)
        assert plan[1] == (86 if heads[1] else 0)
        e._shortlisted(plan)  # (the first call caches each size's mask; later steps only read them)
        sampling = (torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.rand(4))
        with RecordOps() as rec:
            e._composed_step(last, pos, torch.tensor(exits), *sampling, exits=exits, plan=plan)
        assert not SYNCS & set(rec.ops), sorted(SYNCS & set(rec.ops))
        allowed = COMPOSED_STEP_OPS | {"aten.index_copy_", "aten.masked_fill"}
        assert set(rec.ops) <= allowed, sorted(set(rec.ops) - allowed)


def test_engine_refuses_a_shortlisted_row_without_a_shortlist():
    m = _model(shortlist=False)
    e = Engine(m, 1, 16)
    e.add_prompts(_prompts(1))
    with pytest.raises(ValueError, match="no shortlist"):
        e.prefill_step([L], torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.rand(1),
                       heads=[40])
    e = Engine(_model(), 1, 16)
    e.add_prompts(_prompts(1))
    with pytest.raises(ValueError, match="a head of 87 shortlisted tokens; the shortlist has 86"):
        e.prefill_step([L], torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.rand(1),
                       heads=[87])


# -- budgets and generation
def test_budgets_buy_the_deepest_route_that_fits():
    m = _model()
    costs = route_costs(m)
    assert set(costs) == {(k, n) for k in EXITS + [L] for n in [0] + SIZES}
    for k in EXITS + [L]:
        assert costs[(k, 40)] < costs[(k, 86)] < costs[(k, 0)]
    assert costs[(L, 0)] == 1.0
    assert choose_route(m, 1.0) == ((L, 0), None)
    assert choose_route(m, costs[(L, 86)]) == ((L, 86), None)
    assert choose_route(m, costs[(L, 40)]) == ((L, 40), None)  # the full depth before a shallower exit
    below = choose_route(m, costs[(L, 40)] - 1e-4)[0]
    assert below[0] == 4 and costs[below] <= costs[(L, 40)] - 1e-4
    assert choose_route(m, costs[(2, 40)])[0] == (2, 40)
    assert choose_route(m, 0.01)[0] == (2, 40) and "below the cheapest" in choose_route(m, 0.01)[1]
    assert choose_route(m, costs[(L, 86)], shortlist=False)[0][1] == 0
    assert choose_route(m, 1.0, shortlist=True)[0] == (L, 86)
    assert choose_route(m, 1.0, shortlist=10)[0] == (L, 10)  # any leading part, on request
    # spent over an answer: a budget that buys the full depth keeps it; below, an opening and an exit
    assert plan_opening(m, costs[(L, 40)], 100) == (0, (L, 40), None)
    K, route, _ = plan_opening(m, costs[(L, 40)] - 1e-4, 100)
    assert K > 0 and route[0] < L and (K + (100 - K) * costs[route]) / 100 <= costs[(L, 40)] - 1e-4 + 1e-9
    # a calibration's measured figures for shortlisted heads win over the parameter estimate
    cal = dict(ms_per_token={"2": 1.0, "4": 2.0, str(L): 4.0},
               shortlist_ms_per_token={"2": {"86": 0.5}, str(L): {"86": 3.8, "40": 3.6}})
    rc = route_costs(m, cal)
    assert rc[(L, 86)] == pytest.approx(0.95) and rc[(2, 86)] == 0.125 and rc[(L, 40)] == pytest.approx(0.9)
    assert rc[(4, 86)] == pytest.approx(0.5 * costs[(4, 86)] / costs[(4, 0)])  # unmeasured: scaled
    assert choose_route(m, 0.96, cal)[0] == (L, 86)
    for bad in ("yes", 87, -1, 2.5):
        with pytest.raises(ValueError, match="shortlist must be"):
            route_costs(m, shortlist=bad)


def test_generate_with_the_shortlist():
    m = _model()
    p = _prompts(1)[0]
    out = bx.generate(m, p, exit_layer=L, shortlist=True, max_new_tokens=12, stop_tokens=[], calibration=None)
    assert set(out.tokens) <= set(_ids()) and out.heads == [86] * 12 and out.exit_layers == [L] * 12
    small = bx.generate(m, p, exit_layer=L, shortlist=40, max_new_tokens=12, stop_tokens=[], calibration=None)
    assert set(small.tokens) <= set(_ids()[:40]) and small.heads == [40] * 12
    full = bx.generate(m, p, budget=1.0, max_new_tokens=12, stop_tokens=[], calibration=None)
    assert full.heads == [0] * 12
    cheap = route_costs(m)[(L, 86)]
    # (full_start=0 in this test: every token at the route the budget buys, no opening at the full head)
    auto = bx.generate(m, p, budget=cheap, max_new_tokens=12, stop_tokens=[], calibration=None, full_start=0)
    assert auto.tokens == out.tokens and auto.heads == [86] * 12
    never = bx.generate(m, p, budget=cheap, shortlist=False, max_new_tokens=4, stop_tokens=[], calibration=None,
                        full_start=0)
    assert never.heads == [0] * 4 and never.exit_layers[0] < L
    # per-sequence budgets: rows with different heads in one batch, each as generated alone
    budgets = [cheap, 1.0, route_costs(m)[(4, 40)]]
    kw = dict(max_new_tokens=8, stop_tokens=[], calibration=None, temperature=0.8, seed=3, full_start=0)
    batch = bx.generate(m, _prompts(3), budget=budgets, **kw)
    assert [o.heads[0] for o in batch] == [86, 0, 40]
    for o, q, b in zip(batch, _prompts(3), budgets):
        assert set(o.tokens) <= (set(_ids()[:o.heads[0]]) if o.heads[0] else set(range(V)))
        assert bx.generate(m, q, budget=b, **{**kw, "seed": None}, ).heads == o.heads  # the route, whatever the batch
    with pytest.raises(ValueError, match="shortlist must be"):
        bx.generate(m, p, shortlist="yes", max_new_tokens=2, calibration=None)
    with pytest.raises(ValueError, match="no vocabulary shortlist"):
        bx.generate(_model(shortlist=False), p, shortlist=True, max_new_tokens=2, calibration=None)


def test_batcher_serves_shortlisted_budgets_as_generate_does(cpu_capability):
    m = _model()
    costs = route_costs(m)
    b = Batcher(m, max_batch=4, max_len=64, prefill_chunk=64, calibration=None)
    budgets = (costs[(L, 86)], 1.0, costs[(4, 40)], 0.3)
    reqs = [b.submit(Request(ids, max_new_tokens=6, stop_tokens=[], budget=budget, full_start=start))
            for ids, budget, start in zip(_prompts(4, seed=3), budgets, (0, 0, 0, "auto"))]
    while b.busy:
        b.iterate()
    for r in reqs:
        alone = bx.generate(m, r.prompt_ids, budget=r.budget, max_new_tokens=6, stop_tokens=[], calibration=None,
                            full_start=r.full_start)
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers
        assert r.seq.heads == alone.heads
    assert [r.seq.heads[0] for r in reqs] == [86, 0, 40, 40]


# -- the evaluations
def test_evaluations_report_the_shortlisted_routes(tmp_path):
    from balcony_ext.chat_eval import evaluate_chat
    from tiny_models import ChatByteTokenizer

    m = _model()
    m.tokenizer = ChatByteTokenizer()
    set_shortlist(m, [2, 255] + list(range(0, 255, 3)), sizes=[87, 40])
    prompts = ["hello there", "why is it so", "tell me more"]
    rows = evaluate_chat(m, prompts=prompts, max_new_tokens=8, progress=False)
    for name in ("short87", "short40"):
        for k in EXITS + [L]:
            r = rows[(name, k)]
            assert 0 <= r["chat_top1"] <= 1 and r["chat_kl"] is None and "chat_f1" in r
    # the shortlisted full depth agrees with the full model exactly where the answer's token is on its head
    answers = [t for p in prompts for t in bx.generate(m, p, max_new_tokens=8, calibration=None).tokens]
    assert rows[("short87", L)]["chat_top1"] == pytest.approx(coverage(m.shortlist[:87], answers))
    assert rows[("short40", L)]["chat_top1"] == pytest.approx(coverage(m.shortlist[:40], answers))
    # a head holding every token the full model's answers use: the shortlisted full depth is the full model
    unused = min(set(range(3, 255)) - set(answers))
    set_shortlist(m, [2, 255] + sorted(set(range(V)) - {2, 255, unused}))
    rows = evaluate_chat(m, prompts=prompts, max_new_tokens=8, progress=False)
    assert rows[("short255", L)]["chat_top1"] == 1.0 and rows[("short255", L)]["chat_f1"] == 1.0


def test_evaluate_reports_each_shortlisted_head(tmp_path):
    import torch.nn.functional as F

    from balcony_ext.data import Corpus
    from balcony_ext.evaluate import evaluate

    m = _model()
    g = torch.Generator().manual_seed(0)
    corpus = Corpus(torch.randint(0, V, (3000,), generator=g), torch.randint(0, V, (96,), generator=g), ["a"], ["b"],
                    "random tokens")
    rep = evaluate(m, data=corpus, seq_len=32, baselines=(), progress=False, json_path=tmp_path / "e.json",
                   plot_path=tmp_path / "e.png")
    blocks = corpus.heldout_blocks(32)
    with torch.no_grad():
        out = m(blocks, exits=EXITS + [L])
    top = out[L][:, :-1].argmax(-1)
    for n, name in ((86, "short86"), (40, "short40")):
        for k in EXITS + [L]:
            r = rep.row(name, k)
            want = out[k][:, :-1].masked_fill(_off(n), float("-inf")).argmax(-1)
            assert r["top1"] == pytest.approx((want == top).float().mean().item())
            assert r["perplexity"] is None and r["kl"] is None and r["head"] == n
            assert r["rel_cost"] == pytest.approx(route_costs(m)[(k, n)])
    assert "short40" in str(rep) and (tmp_path / "e.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "e.json").read_text())
    assert len(saved["rows"]) == 1 + len(EXITS) + 2 * (len(EXITS) + 1)


def test_batcher_requests_take_the_shortlist_option_as_generate_does():
    m = _model()
    b = Batcher(m, max_batch=2, max_len=64, prefill_chunk=64, calibration=None)
    p = _prompts(1, seed=4)[0]
    r = b.submit(Request(p, max_new_tokens=5, stop_tokens=[], exit_layer=4, shortlist=40))
    q = b.submit(Request(p, max_new_tokens=5, stop_tokens=[], budget=route_costs(m)[(L, 86)], shortlist=False,
                         full_start=0))
    while b.busy:
        b.iterate()
    alone = bx.generate(m, p, exit_layer=4, shortlist=40, max_new_tokens=5, stop_tokens=[], calibration=None)
    assert r.tokens == alone.tokens and r.heads == [40] * 5
    assert q.heads == [0] * 5 and q.exit_layers[0] < L
    for bad, words in ((True, "no vocabulary shortlist"), ("yes", "shortlist must be")):
        plain = Batcher(_model(shortlist=False), max_batch=1, max_len=32, calibration=None)
        with pytest.raises(ValueError, match=words):
            plain.submit(Request(p, max_new_tokens=2, shortlist=bad))


def test_shortlist_paths_and_extra_named(tmp_path):
    m = _model()
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike \(a file path\), got NoneType None"):
        save_shortlist(m, None)  # (pathlib's TypeError, naming no argument, before)
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike \(a file path\), got NoneType None"):
        load_shortlist(_model(shortlist=False), None)
    with pytest.raises(ValueError, match=r"extra must be a dict \(saved as JSON metadata\) or None, got str"):
        save_shortlist(m, tmp_path / "s.safetensors", extra="note")
    assert not (tmp_path / "s.safetensors").exists()

"""Continuous batching (balcony_ext.batcher): exactness against generate() alone, chunked prefill,
cancellation, the load controller and bad requests."""

import time

import pytest
import torch

import balcony_ext as bx
from balcony_ext.batcher import Batcher, Request
from balcony_ext.engine import Engine
from balcony_ext.model import attach
from tiny_models import tiny_balcony

L = 6
EXITS = [2, 4]


def _model():
    m = tiny_balcony("llama", seed=0, layers=L, initializer_range=0.2)
    attach(m, EXITS, init="random", seed=1)
    return m


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g).tolist()


def _alone(m, req):
    return bx.generate(m, req.prompt_ids, exit_layer=req.target_exit, max_new_tokens=req.max_new_tokens,
                       temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop_tokens=[],
                       calibration=None, confidence=req.confidence, full_start=req.opening)


def test_continuous_batching_equals_each_request_alone(cpu_capability):
    m = _model()
    b = Batcher(m, max_batch=5, max_len=64, prefill_chunk=64, calibration=None)
    specs = []
    for i in range(18):
        kw = [dict(budget=1.0), dict(exit_layer=2), dict(exit_layer=4), dict(budget=0.3)][i % 4]
        kw |= dict(confidence=0.6) if i % 5 == 1 else {}  # (tokens its exit is unsure of: at the full depth)
        kw |= dict(full_start=2 + i % 4) if i % 6 == 5 else {}  # (its opening at the full depth)
        kw = dict(budget=0.9) if i % 7 == 3 else kw  # (the budget spends an opening: full_start "auto")
        sampled = dict(temperature=0.9, top_k=20, top_p=0.9, seed=100 + i) if i % 3 == 2 else {}
        specs.append(Request(_ids(3 + (7 * i) % 13, seed=i), max_new_tokens=4 + (5 * i) % 9, stop_tokens=[],
                             **kw, **sampled))
    reqs, arrivals = [], {0: 6, 2: 4, 3: 3, 7: 5}  # iteration -> requests arriving then
    it = 0
    while len(reqs) < len(specs) or b.busy:
        for _ in range(arrivals.get(it, 0)):
            reqs.append(b.submit(specs[len(reqs)]))
        b.iterate()
        it += 1
        assert b.running <= 5
    assert b.cache.rows_in_use == 0
    assert b.row_moves > 0  # sequences that finished early left gaps the last row moved into
    for r in reqs:
        alone = _alone(m, r)
        assert r.tokens == alone.tokens, f"request {r.id}"
        assert r.exit_layers == alone.exit_layers
        assert r.finish_reason == "length"
    deep = [x for r in reqs if r.confidence for x in r.exit_layers]
    assert L in deep and len(set(deep)) > 1  # some tokens were taken again at the full depth, not all
    started = [r for r in reqs if r.opening and r.target_exit != L]
    assert started and all(r.exit_layers[:r.opening] == [L] * r.opening for r in started)
    assert any(set(r.exit_layers[r.opening:]) == {r.target_exit} for r in started)
    planned = [r for r in reqs if r.budget == 0.9]
    assert len(planned) == 3 and all(r.opening > 0 and r.target_exit == 2 for r in planned)
    for r in planned:  # as generate's plan for the request alone
        alone = bx.generate(m, r.prompt_ids, budget=0.9, full_start="auto", max_new_tokens=r.max_new_tokens,
                            stop_tokens=[], calibration=None, temperature=r.temperature, top_k=r.top_k,
                            top_p=r.top_p, seed=r.seed)
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers and r.opening == alone.full_start


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps():
    m = _model()
    b = Batcher(m, max_batch=3, max_len=96, prefill_chunk=8, calibration=None)
    short = b.submit(Request(_ids(4, 1), max_new_tokens=20, stop_tokens=[]))
    b.iterate()  # the short request is running
    long_ = b.submit(Request(_ids(40, 2), max_new_tokens=5, stop_tokens=[]))
    steps_before_first = 0
    while long_.t_first is None:
        b.iterate()
        steps_before_first += 1
        assert len(short.tokens) == 2 + steps_before_first  # the short one never stalls
    assert steps_before_first == 5  # 40 tokens in chunks of 8
    while b.busy:
        b.iterate()
    assert short.tokens == _alone(m, short).tokens
    # chunks attend over the cache instead of one causal pass: the same tokens (and logits to rounding)
    assert long_.tokens == _alone(m, long_).tokens


def test_full_start_of_a_prompt_prefilled_in_chunks():
    m = _model()
    b = Batcher(m, max_batch=2, max_len=96, prefill_chunk=8, calibration=None)
    reqs = [b.submit(Request(_ids(30, 5), max_new_tokens=7, stop_tokens=[], exit_layer=2, full_start=3)),
            b.submit(Request(_ids(6, 6), max_new_tokens=9, stop_tokens=[], exit_layer=4, full_start=1))]
    while b.busy:
        b.iterate()
    for r in reqs:
        alone = _alone(m, r)
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers
    assert reqs[0].exit_layers == [L] * 3 + [2] * 4 and reqs[1].exit_layers == [L] + [4] * 8
    assert b.tokens_by_exit[L] == 4


def test_cancel_frees_the_row_and_the_next_request_is_served():
    m = _model()
    b = Batcher(m, max_batch=1, max_len=64, calibration=None)
    done = []
    a = b.submit(Request(_ids(5, 3), max_new_tokens=50, stop_tokens=[], on_done=done.append))
    nxt = b.submit(Request(_ids(6, 4), max_new_tokens=3, stop_tokens=[]))
    for _ in range(3):
        b.iterate()
    assert b.cache.rows_in_use == 1 and nxt.state == "waiting"
    b.cancel(a)
    b.iterate()
    assert done == [a] and a.finish_reason == "cancelled" and a.wait(0)
    while b.busy:
        b.iterate()
    assert nxt.tokens == _alone(m, nxt).tokens
    assert b.cache.rows_in_use == 0 and not b.rows
    waiting = b.submit(Request(_ids(4, 5), max_new_tokens=3, stop_tokens=[]))
    b.cancel(waiting)  # still waiting: done at once
    assert waiting.state == "done" and not b.busy


def test_load_controller_lowers_exits_under_load_and_restores_them(monkeypatch):
    m = _model()
    b = Batcher(m, max_batch=2, max_len=200, slo_ms_per_token=20, calibration=None)
    slow = {"on": True}
    step = b.engine.step

    def slowed(*args, **kwargs):
        if slow["on"]:
            time.sleep(0.04)  # twice the target
        return step(*args, **kwargs)

    monkeypatch.setattr(b.engine, "step", slowed)
    floor = b.submit(Request(_ids(5, 6), max_new_tokens=150, stop_tokens=[], budget=1.0, min_budget=0.01))
    fixed = b.submit(Request(_ids(7, 7), max_new_tokens=150, stop_tokens=[], budget=1.0))  # no floor: never lowered
    for _ in range(30):
        b.iterate()
    # every step takes 40 ms whatever the exits: the ceiling goes to the lowest rung, down to the floor
    assert floor.exit == 2 and fixed.exit == L and b.controller.cap == 2
    assert floor.exit_layers[0] == L and floor.exit_layers[-1] == 2
    slow["on"] = False
    for _ in range(40):
        b.iterate()
    assert floor.exit == L and b.controller.cap == L and b.moves["down"] >= 1 and b.moves["up"] >= 1
    while b.busy:
        b.iterate()
    # every move was exact: the tokens are those of generate() with the same exit per step
    alone = bx.generate(m, floor.prompt_ids, exit_layer=lambda s: floor.exit_layers[s], max_new_tokens=150,
                        stop_tokens=[], calibration=None)
    assert floor.tokens == alone.tokens


def test_load_controller_holds_requests_the_floors_cannot_serve(monkeypatch):
    m = _model()
    b = Batcher(m, max_batch=3, max_len=200, slo_ms_per_token=20, calibration=None, admission_control=True)
    step = Engine.step

    def slowed(self, *args, **kwargs):
        time.sleep(0.03)  # every step is over the target, whatever the exits
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", slowed)
    first = b.submit(Request(_ids(5, 6), max_new_tokens=20, stop_tokens=[], budget=1.0, min_budget=0.01))
    for _ in range(6):  # steps measured at full depth, then at the floor: >= 30 ms wherever it goes
        b.iterate()
    assert first.exit == 2
    second = b.submit(Request(_ids(7, 7), max_new_tokens=6, stop_tokens=[], budget=1.0, min_budget=0.01))
    while b.busy:
        b.iterate()
    assert b.held > 0 and second.t_first > first.t_done  # it waited for the first to finish
    assert first.finish_reason == second.finish_reason == "length"


@pytest.mark.parametrize("kw,match", [
    (dict(prompt_ids=[]), "empty"),
    (dict(max_new_tokens=0), "max_tokens"),
    (dict(max_new_tokens=60), "past the context"),
    (dict(budget=1.5), r"\(0, 1\]"),
    (dict(budget=0.0), r"\(0, 1\]"),
    (dict(exit_layer=3), "not attached"),
    (dict(budget=0.5, exit_layer=2), "one of"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(prompt_ids=[5, 10_000]), "vocabulary"),
    (dict(ms_per_token=5.0), "calibrat"),
    (dict(temperature=True), "temperature must be a finite number >= 0, got True"),
    (dict(temperature="hot"), "temperature must be a finite number >= 0, got 'hot'"),
    (dict(top_p="0.5"), r"top_p must be in \(0, 1\], got '0.5'"),
    (dict(top_p=True), r"top_p must be in \(0, 1\], got True"),
    (dict(prompt_ids="hello"), r"prompt_ids must be a list of token ids \(ints\), got str"),
    (dict(prompt_ids=[1.0, 2.0]), r"prompt_ids must be a list of token ids \(ints\)"),
    (dict(prompt_ids=5), r"prompt_ids must be a list of token ids \(ints\), got int"),
    (dict(stop=5), "stop must be a non-empty string or a list of them"),
    (dict(stop_tokens=2), "stop_tokens must be a list of token ids"),
    (dict(confidence=1.5), r"confidence must be a number in \[0, 1\]"),
    (dict(confidence="high"), r"confidence must be a number in \[0, 1\]"),
    (dict(full_start=-2), r"full_start must be 'auto' .* or an int >= 0 .*got -2"),
    (dict(full_start=1.5), r"full_start must be 'auto' .* or an int >= 0 .*got 1.5"),
    (dict(full_start=True), r"full_start must be 'auto' .* or an int >= 0 .*got True"),
    (dict(full_start="Auto"), r"full_start must be 'auto' .* or an int >= 0 .*got 'Auto'"),
    (dict(full_start="auto", budget=1.5), r"budget must be in \(0, 1\]"),
])
def test_bad_requests_are_refused_and_nothing_is_queued(kw, match):
    m = _model()
    b = Batcher(m, max_batch=2, max_len=32, calibration=None)
    args = dict(prompt_ids=_ids(5, 0), max_new_tokens=4) | kw
    with pytest.raises(ValueError, match=match):
        b.submit(Request(**args))
    assert not b.busy


def test_background_thread_and_drain():
    m = _model()
    b = Batcher(m, max_batch=2, max_len=64, calibration=None).start()
    try:
        reqs = [b.submit(Request(_ids(4 + i, i), max_new_tokens=6, stop_tokens=[], budget=[1.0, 0.3][i % 2]))
                for i in range(5)]
        assert b.drain(timeout=60)
        assert all(r.wait(0) for r in reqs)
        with pytest.raises(RuntimeError, match="shutting down"):
            b.submit(Request(_ids(4, 9), max_new_tokens=2))
    finally:
        b.stop()
    for r in reqs:
        assert r.tokens == _alone(m, r).tokens


def test_drain_returns_only_once_every_request_is_done():
    # a slow on_done widens the moment between a row leaving and its request being marked done
    m = _model()
    b = Batcher(m, max_batch=2, max_len=64, calibration=None).start()
    try:
        reqs = [b.submit(Request(_ids(4 + i, i), max_new_tokens=3, stop_tokens=[],
                                 on_done=lambda r: time.sleep(0.2))) for i in range(3)]
        assert b.drain(timeout=60)
        assert [r.wait(0) for r in reqs] == [True] * 3
    finally:
        b.stop()


def test_cache_move_carries_a_sequence_to_another_row():
    from balcony_ext.engine import Engine

    m = _model()
    e = Engine(m, 3, 24)
    e.add_prompts([_ids(5, 1), _ids(7, 2), _ids(4, 3)])
    e.catch_up([L, 2, 4])
    before = [t[2].clone() for t in e.cache.k], e.cache.kv_len[:, 2].clone(), e.cache.tokens[2, :4].clone()
    e.cache.free(0)
    e.cache.move(2, 0)
    assert e.cache.in_use == [True, True, False] and int(e.cache.length[0]) == 4 and int(e.cache.length[2]) == 0
    assert torch.equal(e.cache.kv_len[:, 0], before[1]) and not e.cache.kv_len[:, 2].any()
    assert torch.equal(e.cache.tokens[0, :4], before[2])
    for t, old in zip(e.cache.k, before[0]):
        assert torch.equal(t[0, :, :4], old[:, :4])
    with pytest.raises(RuntimeError, match="must be in use and the target free"):
        e.cache.move(2, 1)
    # the moved sequence decodes on from its new row (exactness under moves: the batching test above)
    e.append(0, 11)
    e.catch_up([4, 2, 0])
    e.step([4, 2, 0], torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.rand(3))


def test_unseeded_sampling_leaves_the_global_generator_alone():
    m = _model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bx.generate(m, _ids(4, 0), max_new_tokens=3, temperature=0.8, stop_tokens=[], calibration=None)
    b = Batcher(m, max_batch=1, max_len=32, calibration=None)
    b.submit(Request(_ids(4, 0), max_new_tokens=3, temperature=0.8, stop_tokens=[]))
    while b.busy:
        b.iterate()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kw,match", [
    (dict(max_batch=0), "max_batch, max_len and prefill_chunk must be positive ints"),
    (dict(max_len=None), "max_batch, max_len and prefill_chunk must be positive ints"),
    (dict(prefill_chunk=2.5), "max_batch, max_len and prefill_chunk must be positive ints"),
    (dict(slo_ms_per_token=-5), r"slo_ms_per_token must be a finite number > 0 .*got -5"),
    (dict(slo_ms_per_token=float("nan")), r"slo_ms_per_token must be a finite number > 0 .*got nan"),
    (dict(calibration="junk"), "calibration must be 'auto', None or a calibration"),
    (dict(native="no"), r"native must be True, False or None \(the native step where it exists\), got str 'no'"),
    (dict(admission_control="no"), "admission_control must be True or False, got str 'no'"),
])
def test_bad_batcher_settings_named(kw, match):
    with pytest.raises(ValueError, match=match):
        Batcher(_model(), **{"max_batch": 2, "max_len": 32, "calibration": None, **kw})


def test_top_k_past_the_vocabulary_is_no_cut():
    m = _model()
    b = Batcher(m, max_batch=2, max_len=32, calibration=None)
    req = b.submit(Request(_ids(5, 0), max_new_tokens=3, temperature=1.0, top_k=2**70, seed=1, stop_tokens=[]))
    while b.busy:
        b.iterate()  # (an overflow inside the step before)
    alone = bx.generate(m, _ids(5, 0), max_new_tokens=3, temperature=1.0, top_k=0, seed=1, stop_tokens=[],
                        calibration=None)
    assert req.finish_reason == "length" and req.tokens == alone.tokens

"""The load controller: its step-time model and the ceiling it puts on the exits."""

import numpy as np
import pytest

from balcony_ext.controller import LoadController

LADDER = [8, 15, 22, 30]
COSTS = {8: 0.4, 15: 0.6, 22: 0.8, 30: 1.0}


def machine(exits, lengths):
    """A synthetic machine: weights read once per step, per-row compute, attention over the cache."""
    used = [(k, n) for k, n in zip(exits, lengths) if k]
    return (0.002 + 0.010 * max(COSTS[k] for k, _ in used) + 0.001 * sum(COSTS[k] for k, _ in used)
            + 0.0004 * sum(n * k / 30 for k, n in used) / 1000)


def run(ctl, rows, steps):
    for _ in range(steps):
        exits = ctl.choose(rows)
        lengths = [n for _, _, n in rows]
        ctl.observe(exits, lengths, machine(exits, lengths))
    return exits


def test_the_model_learns_the_machine():
    ctl = LoadController(LADDER, COSTS, slo_s=1.0)
    rng = np.random.default_rng(0)
    for _ in range(60):
        exits = list(rng.choice(LADDER + [0], size=6))
        if not any(exits):
            continue
        lengths = list(rng.integers(10, 2000, size=6))
        ctl.observe(exits, lengths, machine(exits, lengths))
    for exits, lengths in [([30, 8, 0], [100, 1500, 3]), ([15] * 8, [700] * 8), ([22], [5])]:
        assert ctl.predict(exits, lengths) == pytest.approx(machine(exits, lengths), rel=0.02)


def test_the_ceiling_is_the_highest_rung_that_fits_and_respects_floors():
    # 8 rows at full depth: 2 + 10 + 8 = 20 ms; the target, 17 ms, fits exit 22 (2 + 8 + 6.4 = 16.4 ms)
    ctl = LoadController(LADDER, COSTS, slo_s=0.017 / 0.9, margin=0.9, raise_margin=0.75)
    rows = [(30, 8, 100)] * 8
    assert run(ctl, rows, 40) == [22] * 8 and ctl.cap == 22
    # one of them may not go below the full model: the weights of the full depth stay in every step,
    # so the others must give more (exit 15: 2 + 10 + 5.2 = 17.2 ms, over; exit 8: 15.8 ms)
    exits = run(ctl, rows[:7] + [(30, 30, 100)], 40)
    assert exits == [8] * 7 + [30] and machine(exits, [100] * 8) <= 0.017
    # load falls: the ceiling goes back up, to what the requests asked for
    assert run(ctl, rows[:2], 20) == [30, 30] and ctl.cap == 30
    assert ctl.moves["down"] >= 2 and ctl.moves["up"] >= 1
    # a request that asked for less keeps it
    assert run(ctl, [(15, 8, 100), (30, 8, 100)], 5) == [15, 30]


def test_nothing_fits_the_lowest_rung():
    ctl = LoadController(LADDER, COSTS, slo_s=0.001)
    assert run(ctl, [(30, 8, 10), (22, 15, 10)], 10) == [8, 15] and ctl.cap == 8
    with pytest.raises(ValueError, match="positive"):
        LoadController(LADDER, COSTS, slo_s=0)


def test_admission_only_when_the_floors_keep_the_target():
    ctl = LoadController(LADDER, COSTS, slo_s=0.009)
    assert ctl.admits([(30, 8, 10)] * 5, (30, 8, 10))  # nothing measured yet: admitted
    for n in (1, 3, 4, 2, 5, 3):  # sequences come and go
        run(ctl, [(30, 8, 100)] * n, 5)
    # at their floors (exit 8): 2 + 4 + 0.4 per row ms: 7 rows fit 9 ms, 12 rows do not
    assert ctl.admits([(30, 8, 100)] * 6, (30, 8, 100))
    assert not ctl.admits([(30, 8, 100)] * 11, (30, 8, 100))
    # a newcomer whose floor is the full model weighs the whole depth
    assert not ctl.admits([(30, 8, 100)] * 2, (30, 30, 100))

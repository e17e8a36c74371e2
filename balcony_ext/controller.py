"""The load controller of the batcher: under load, sequences that allow it move to cheaper exits.

The time of one batched decode step is predicted from what the step computes:

    seconds ~ t0 + t_weights * deepest + t_rows * sum(cost of each row's exit) + t_attn * kv_positions

`deepest` is the relative per-token cost (`budgets.exit_costs`) of the deepest exit in the step: the
weights read once for every row (on a CPU, at batch 1..8, the step is bound by these bytes); the row
sum is the per-row compute; `kv_positions` the cache entries attended (thousands: every row's length
times the share of the layers it runs). The coefficients (none negative) are refitted after every
step by ridge least squares over the recent steps, the older ones weighing less (`decay` per step),
so the model follows the machine (threads, other load).

Before each step the controller chooses a ceiling on the exits: every running sequence decodes at
min(the exit it asked for, the ceiling), never below its floor (its request's `min_budget`). The
ceiling is the highest rung of the ladder whose predicted step time fits `margin` x the target (to go
up a rung: `raise_margin` x the target, so that it does not flap); if none fits, the lowest. A new
request so starts at the ceiling instead of pushing a full step past the target first.

Admission (the batcher's `admission_control`, off by default): a waiting request joins the running ones only if the step predicted with every sequence at
its floor, the newcomer included, fits the target; otherwise it waits in the queue (its time to first
token grows instead of everyone's time per token). A request is always admitted when none is running.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def _nonnegative_ridge(X, y, w, lam, prior):
    """argmin over theta >= 0 of sum w (X theta - y)^2 + lam |theta - prior|^2, by trying every set of
    coefficients held at zero (4 coefficients: 16 small solves). Without the sign constraint a few
    collinear observations (one sequence: its exit's cost is both the deepest and the row sum) can fit a
    negative per-row cost, which would predict that more sequences make a step faster."""
    n = X.shape[1]
    best, best_loss = np.zeros(n), np.inf
    for mask in range(1 << n):
        free = [i for i in range(n) if mask >> i & 1]
        theta = np.zeros(n)
        if free:
            A = X[:, free]
            Aw = A * w[:, None]
            theta[free] = np.linalg.solve(Aw.T @ A + lam * np.eye(len(free)), Aw.T @ y + lam * prior[free])
        if (theta < 0).any():
            continue
        loss = float(w @ (X @ theta - y) ** 2 + lam * ((theta - prior) ** 2).sum())
        if loss < best_loss:
            best, best_loss = theta, loss
    return best


class LoadController:
    def __init__(self, ladder: list, costs: dict, slo_s: float, window: int = 64, decay: float = 0.9,
                 margin: float = 0.95, raise_margin: float = 0.85, ridge: float = 1e-4):
        if not slo_s > 0:
            raise ValueError(f"the step-time target must be positive, got {slo_s * 1000:g} ms")
        self.ladder = sorted(ladder)  # exits, cheapest first; the last is the full model
        self.costs = costs  # exit -> relative cost per token
        self.L = self.ladder[-1]
        self.slo_s, self.margin, self.raise_margin, self.ridge, self.decay = slo_s, margin, raise_margin, ridge, decay
        self.obs = deque(maxlen=window)  # (features, seconds)
        self.theta = None
        self.cap = self.L
        self.moves = {"down": 0, "up": 0}

    def features(self, exits: list, lengths: list) -> np.ndarray:
        """exits[b] (0: an idle row) and lengths[b] (cache positions) of the rows of one step."""
        used = [(k, n) for k, n in zip(exits, lengths) if k > 0]
        deepest = max((self.costs[k] for k, _ in used), default=0.0)
        rows = sum(self.costs[k] for k, _ in used)
        attn = sum(n * min(k, self.L) / self.L for k, n in used) / 1000.0
        return np.array([1.0, deepest, rows, attn])

    def observe(self, exits: list, lengths: list, seconds: float):
        """Records the measured time of a step and refits the coefficients."""
        x = self.features(exits, lengths)
        if x[1] == 0:
            return
        self.obs.append((x, seconds))
        X = np.stack([o[0] for o in self.obs])
        y = np.array([o[1] for o in self.obs])
        w = self.decay ** np.arange(len(X))[::-1]  # the latest step weighs 1, older ones fade
        # prior: all of the time is the weights' (t_weights = the latest step's time over its cost)
        prior = np.zeros(4)
        prior[1] = seconds / x[1]
        lam = self.ridge * max(1.0, float((w[:, None] * X * X).sum() / w.sum()))
        self.theta = _nonnegative_ridge(X, y, w, lam, prior)

    def predict(self, exits: list, lengths: list) -> float:
        return float(self.features(exits, lengths) @ self.theta)

    def admits(self, rows: list, new: tuple) -> bool:
        """Whether a new sequence (target, floor, length) may join `rows` (those running): only if,
        with everyone at their floors, the predicted step still fits the target. (The caller always
        admits a request when nothing runs, so the queue moves.)"""
        if self.theta is None:
            return True
        everyone = list(rows) + [new]
        return self.predict([f for _, f, _ in everyone], [n for _, _, n in everyone]) <= self.slo_s

    @staticmethod
    def capped(target: int, floor: int, cap: int) -> int:
        return max(floor, min(target, cap))

    def choose(self, rows: list) -> list:
        """rows: (target exit, floor exit, length) of each running sequence -> the exit of each."""
        if self.theta is None or not rows:
            return [self.capped(t, f, self.cap) for t, f, _ in rows]
        lengths = [n for _, _, n in rows]
        new = self.ladder[0]
        for cap in reversed(self.ladder):
            limit = (self.raise_margin if cap > self.cap else self.margin) * self.slo_s
            if self.predict([self.capped(t, f, cap) for t, f, _ in rows], lengths) <= limit:
                new = cap
                break
        if new != self.cap:
            before = [self.capped(t, f, self.cap) for t, f, _ in rows]
            after = [self.capped(t, f, new) for t, f, _ in rows]
            if before != after:
                self.moves["down" if new < self.cap else "up"] += 1
            self.cap = new
        return [self.capped(t, f, self.cap) for t, f, _ in rows]

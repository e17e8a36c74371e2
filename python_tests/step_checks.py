"""Shared checks: the native decode step and the composed step side by side on the same prompts, and
the ops a step dispatches."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from balcony_ext.engine import Engine


def assert_native_matches_composed(model, prompts, exits, steps, tol, max_len=32, same_tokens=False):
    """Runs both engines for `steps` greedy steps at `exits` (per row), feeding both the composed
    step's tokens; asserts equal logits within tol at every step (and equal greedy tokens with
    same_tokens) and returns the two engines."""
    B = len(prompts)
    engines = [Engine(model, B, max_len, native=True), Engine(model, B, max_len, native=False)]
    for e in engines:
        e.add_prompts(prompts)
    for _ in range(steps):
        nxt = []
        for e in engines:
            e.catch_up(exits)
            nxt.append(e.step(exits, torch.zeros(B), torch.zeros(B, dtype=torch.long), torch.ones(B), torch.rand(B)))
        torch.testing.assert_close(engines[0].logits, engines[1].logits, atol=tol, rtol=tol)
        assert not same_tokens or torch.equal(nxt[0], nxt[1])
        for e in engines:
            for b in range(B):
                e.append(b, int(nxt[1][b]))
    return engines


class RecordOps(TorchDispatchMode):
    """Records the name ("namespace.op") of every op dispatched inside the `with` block, in .ops."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))

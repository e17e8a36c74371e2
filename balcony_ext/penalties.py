"""Repetition penalties on the next-token logits, per sequence.

- presence_penalty p and frequency_penalty f (OpenAI's): every token already generated in the
  sequence loses f x (its count) + p (once it occurs) from its logit; in [-2, 2], 0 is off.
- repetition_penalty r (Hugging Face's and vLLM's, from CTRL): every token of the prompt or the
  answer so far has a positive logit divided by r and a negative one multiplied by r; r > 0, 1 is off.

The counts come from the tokens in the cache (`KVCache.tokens`, positions start[b] .. length[b] - 1
are row b's generated tokens), so there is no state to keep when rows are allocated, freed or moved.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def check_penalties(presence, frequency, repetition) -> None:
    """Raises ValueError naming the first value out of range (each a number or a per-row list)."""
    def each(v):
        return list(v) if isinstance(v, (list, tuple)) else [v]

    real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        for x in each(v):
            if not (real(x) and -2 <= x <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2] (0: off), got {x!r}")
    for x in each(repetition):
        if not (real(x) and x > 0):
            raise ValueError(f"repetition_penalty must be a number > 0 (1: off), got {x!r}")


@dataclass
class Penalties:
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32
    start: torch.Tensor  # [B] int64: where each row's generated tokens begin in the cache
    # (all four on the host; apply() moves them to the logits' device)

    @staticmethod
    def of(B: int, presence=0.0, frequency=0.0, repetition=1.0, start=0) -> Penalties | None:
        """Per-row penalties (numbers or lists of B), or None when every one is off."""
        check_penalties(presence, frequency, repetition)

        def rows(v, dtype):
            t = torch.as_tensor(v, dtype=dtype)
            if t.dim() and t.numel() != B:
                raise ValueError(f"{t.numel()} per-sequence penalty values for {B} sequences")
            return t.expand(B).clone()

        p = Penalties(rows(presence, torch.float32), rows(frequency, torch.float32),
                      rows(repetition, torch.float32), rows(start, torch.long))
        return p if p.active else None

    def rows(self, idx: torch.Tensor) -> Penalties:
        """The penalties of the rows idx (host long tensor), in that order."""
        return Penalties(self.presence[idx], self.frequency[idx], self.repetition[idx], self.start[idx])

    @property
    def active(self) -> bool:
        return bool((self.presence != 0).any() or (self.frequency != 0).any() or (self.repetition != 1).any())

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor, length: torch.Tensor) -> None:
        """Penalises logits [B, V] in place, given each row's tokens [B, S] and length [B]."""
        B, V = logits.shape
        dev = logits.device
        S = max(int(length.max()), 1)
        toks = tokens[:, :S].to(dev)
        pos = torch.arange(S, device=dev)
        # which penalties are on is read from the host tensors (on a GPU, no synchronisation)
        counted = bool((self.presence != 0).any() or (self.frequency != 0).any())
        repeated = bool((self.repetition != 1).any())
        length, start = length.to(dev).unsqueeze(1), self.start.to(dev).unsqueeze(1)
        pres, freq, rep = (t.to(dev).unsqueeze(1) for t in (self.presence, self.frequency, self.repetition))
        if counted:
            generated = ((pos >= start) & (pos < length)).float()
            counts = torch.zeros(B, V, device=dev).scatter_add_(1, toks, generated)
            logits -= counts * freq + (counts > 0).float() * pres
        if repeated:
            seen = torch.zeros(B, V, device=dev).scatter_add_(1, toks, (pos < length).float()) > 0
            logits.copy_(torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits))

"""Repetition penalties on the next-token logits, per sequence.

- presence_penalty p and frequency_penalty f (OpenAI's): every token already generated in the
  sequence loses f x (its count) + p (once it occurs) from its logit; in [-2, 2], 0 is off.
- repetition_penalty r (Hugging Face's and vLLM's, from CTRL): every token of the prompt or the
  answer so far has a positive logit divided by r and a negative one multiplied by r; r > 0, 1 is off.
- DRY ("don't repeat yourself", llama.cpp's and text-generation-webui's dry_multiplier, dry_base,
  dry_allowed_length): a token that would extend a repeat of an earlier stretch of the answer loses
  multiplier x base ** (n - allowed_length) from its logit, where n >= allowed_length is the length of
  the longest such repeat (the answer's last n tokens occurred before, followed by that token). A
  repeat does not run across a sequence breaker (a token whose text holds a newline, ':', '"' or '*'),
  so list markers and headings may recur. multiplier >= 0 (0: off), base >= 1, allowed_length >= 1.
  Loops are what an early exit falls into (docs/results/dry.md); frequency_penalty lowers every
  repeated word alike, DRY only the repeats.

The counts come from the tokens in the cache (`KVCache.tokens`, positions start[b] .. length[b] - 1
are row b's generated tokens), so there is no state to keep when rows are allocated, freed or moved.
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass

import torch


BREAKERS = ("\n", ":", '"', "*")  # a DRY repeat does not run across a token holding one of these (llama.cpp's)
DRY_CAP = 1e4  # the largest DRY penalty (a logit lowered this much is never chosen); longer repeats add nothing
DRY_LONGEST = 64  # repeats are measured up to this many tokens


def check_penalties(presence, frequency, repetition, dry=0.0, dry_base=1.75, dry_allowed_length=2) -> None:
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
    for x in each(dry):
        if not (real(x) and x >= 0):
            raise ValueError(f"dry_multiplier must be a number >= 0 (0: off), got {x!r}")
    for x in each(dry_base):
        if not (real(x) and 1 <= x <= 16):
            raise ValueError(f"dry_base must be a number in [1, 16], got {x!r}")
    for x in each(dry_allowed_length):
        if not (isinstance(x, numbers.Integral) and not isinstance(x, bool) and 1 <= x <= DRY_LONGEST):
            raise ValueError(f"dry_allowed_length must be an int in [1, {DRY_LONGEST}], got {x!r}")


_breakers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sequence_breakers(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the tokens whose text holds a DRY sequence breaker (BREAKERS); none without a
    tokenizer. Decoded once per tokenizer."""
    if tokenizer is None:
        return torch.zeros(vocab_size, dtype=torch.bool)
    mask = _breakers.get(tokenizer)
    if mask is None or mask.numel() != vocab_size:
        ids = [[i] for i in range(vocab_size)]
        batch = getattr(tokenizer, "batch_decode", None)
        texts = batch(ids) if batch is not None else [tokenizer.decode(i) for i in ids]
        mask = torch.tensor([any(b in t for b in BREAKERS) for t in texts], dtype=torch.bool)
        _breakers[tokenizer] = mask
    return mask


def dry_breakers(model, dry) -> torch.Tensor | None:
    """The model's sequence-breaker mask where some sequence has DRY on (dry: a number or per-row list)."""
    on = any(x != 0 for x in (dry if isinstance(dry, (list, tuple)) else [dry]) if isinstance(x, numbers.Real))
    return sequence_breakers(model.tokenizer, model.adapter.vocab_size) if on else None


@dataclass
class Penalties:
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32
    start: torch.Tensor  # [B] int64: where each row's generated tokens begin in the cache
    dry: torch.Tensor  # [B] float32: DRY's multiplier (0: off)
    dry_base: torch.Tensor  # [B] float32
    dry_allowed: torch.Tensor  # [B] int64: DRY's allowed_length
    breakers: torch.Tensor  # [V] bool: DRY's sequence breakers (sequence_breakers)
    # (all on the host; apply() moves them to the logits' device)

    @staticmethod
    def of(B: int, presence=0.0, frequency=0.0, repetition=1.0, start=0, dry=0.0, dry_base=1.75,
           dry_allowed_length=2, breakers=None) -> Penalties | None:
        """Per-row penalties (numbers or lists of B), or None when every one is off. breakers: the [V] bool
        mask of DRY's sequence breakers (None: no token breaks a repeat)."""
        check_penalties(presence, frequency, repetition, dry, dry_base, dry_allowed_length)

        def rows(v, dtype):
            t = torch.as_tensor(v, dtype=dtype)
            if t.dim() and t.numel() != B:
                raise ValueError(f"{t.numel()} per-sequence penalty values for {B} sequences")
            return t.expand(B).clone()

        p = Penalties(rows(presence, torch.float32), rows(frequency, torch.float32),
                      rows(repetition, torch.float32), rows(start, torch.long), rows(dry, torch.float32),
                      rows(dry_base, torch.float32), rows(dry_allowed_length, torch.long),
                      breakers if breakers is not None else torch.zeros(0, dtype=torch.bool))
        return p if p.active else None

    def rows(self, idx: torch.Tensor) -> Penalties:
        """The penalties of the rows idx (host long tensor), in that order."""
        return Penalties(self.presence[idx], self.frequency[idx], self.repetition[idx], self.start[idx],
                         self.dry[idx], self.dry_base[idx], self.dry_allowed[idx], self.breakers)

    @property
    def active(self) -> bool:
        return bool((self.presence != 0).any() or (self.frequency != 0).any() or (self.repetition != 1).any()
                    or (self.dry != 0).any())

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
        if bool((self.dry != 0).any()):
            logits -= self._dry(toks, length, start, V)

    def _dry(self, toks: torch.Tensor, length: torch.Tensor, start: torch.Tensor, V: int) -> torch.Tensor:
        """[B, V] DRY penalties. A candidate is every earlier answer position j (start < j < length): the
        token there would repeat what followed the stretch ending at j - 1, and n(j) is how many of the
        answer's last tokens equal the tokens before j (walked back one step at a time, all positions at
        once, until no stretch still matches, no further than a breaker, the answer's start or DRY_LONGEST)."""
        B, S = toks.shape
        dev = toks.device
        pos = torch.arange(S, device=dev)
        mult, base, allowed = (t.to(dev).unsqueeze(1) for t in (self.dry, self.dry_base, self.dry_allowed))
        breaker = (self.breakers.to(dev)[toks] if self.breakers.numel()
                   else torch.zeros_like(toks, dtype=torch.bool))
        alive = (pos > start) & (pos < length) & (mult > 0)  # [B, S]
        n = torch.zeros(B, S, dtype=torch.long, device=dev)
        # (beyond this many steps every penalty is at DRY_CAP: longer repeats change nothing)
        hi = self.dry_allowed.float() + torch.log(DRY_CAP / self.dry.clamp(min=1e-30)) / torch.log(
            self.dry_base.clamp(min=1 + 1e-6))
        steps = min(DRY_LONGEST, S, int(math.ceil(float(hi[self.dry > 0].max()))) + 1)
        for i in range(steps):
            q = (length - 1 - i).clamp(min=0)  # [B, 1]: the answer's i-th token from the end
            last = toks.gather(1, q)
            last_ok = (length - 1 - i >= start) & ~breaker.gather(1, q)
            src = pos - 1 - i  # the i-th token before each candidate
            before = toks.gather(1, src.clamp(min=0).expand(B, S))
            alive &= (src >= start) & (before == last) & last_ok
            if not bool(alive.any()):
                break
            n += alive
        pen = (mult * base ** (n - allowed).clamp(min=0).float()).clamp(max=DRY_CAP)
        pen = torch.where(n >= allowed, pen, torch.zeros_like(pen))
        return torch.zeros(B, V, device=dev).scatter_reduce_(1, toks, pen, "amax")

"""Decoder layers run through the model's own modules, for the families the native step does not run
(adapters.Family.native False): the engine's multi-token pass (`Engine._span`) for one layer slot, over
the same early-exit KV cache as the native path. Decode steps are such passes of one position
(Engine.step), so every family gets prefill, catch-up and decoding from these few lines."""

from __future__ import annotations

import torch

from .adapters import FULL, SLIDING, Context


def span_modules(w, cache, slot: int, x, starts, counts, outputs: str):
    """Engine._span through the family's own decoder-layer module (w: weights.ModuleWeights, cache: the
    engine's KVCache): its attention stores this pass's keys and values in the slot's cache (through
    _SlotCache) and attends under a mask built here from the positions (causal, the padding of short
    rows, the sliding window of sliding layers)."""
    B, T, _ = x.shape
    dev = x.device
    t = torch.arange(T, device=dev)
    valid = t.unsqueeze(0) < counts.to(dev).unsqueeze(1)
    pos = torch.where(valid, starts.to(dev).unsqueeze(1) + t, torch.full_like(valid, -1, dtype=torch.long))
    P = max(int((starts + counts).max()), 1)
    layer, kind = w.modules[slot], w.types[slot]
    j = torch.arange(P, device=dev).view(1, 1, P)
    allowed = j <= pos.unsqueeze(-1)  # [B, T, P]
    if kind == SLIDING and w.window:
        allowed &= j > pos.unsqueeze(-1) - w.window
    allowed[..., 0] |= ~valid  # padding rows attend to something (their output is discarded)
    mask = allowed.unsqueeze(1)
    if not w.sdpa:  # eager attention adds the mask
        mask = torch.zeros(mask.shape, dtype=w.dtype, device=dev).masked_fill(~mask, torch.finfo(w.dtype).min)
    ids = pos.clamp(min=0)
    a = w.adapter
    h = x.to(w.dtype)
    rotary = a.rotary_emb(h, ids, kind) if a.family.rotary_per_layer_type else a.rotary_emb(h, position_ids=ids)
    ctx = Context(ids, rotary, {FULL: mask, SLIDING: mask},
                  _SlotCache(cache.k[slot], cache.v[slot], pos, P))
    y = a.run_layer(layer, h, ctx, kind).float()
    if outputs == "none":
        return None
    if outputs == "last":
        rows = torch.arange(B, device=dev)
        return y[rows, (counts.to(dev) - 1).clamp(min=0), None]
    return y


class _SlotCache:
    """What a Hugging Face attention module calls to store a pass's keys and values (`update`): they
    are written into an engine cache slot ([B, Hkv, S, D] float32) at the pass's positions pos [B, T]
    (-1: padding, not written), and the slot's first P positions come back for the attention."""

    def __init__(self, k, v, pos, P: int):
        self.k, self.v, self.pos, self.P = k, v, pos, P

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        b, t = (self.pos >= 0).nonzero(as_tuple=True)
        p = self.pos[b, t]
        self.k[b, :, p] = key_states[b, :, t].float()
        self.v[b, :, p] = value_states[b, :, t].float()
        dt = key_states.dtype
        return self.k[:, :, :self.P].to(dt), self.v[:, :, :self.P].to(dt)

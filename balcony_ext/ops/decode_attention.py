"""Split-KV decode attention over a static KV cache (torch.ops.balcony.decode_attention)."""

import math

import torch

from .. import _native


def reference_decode_attention(query, key_cache, value_cache, seq_lens, scale, window: int = 0, softcap: float = 0.0):
    """The specification: per sequence b, softmax(q k^T * scale) v over cache entries [0, len_b),
    query [B,Hq,D], caches [B,Hkv,S,D] (GQA: query head i uses kv head i // (Hq/Hkv)).
    window > 0: over the last `window` entries only, [max(0, len_b - window), len_b); softcap > 0: the
    scores become softcap * tanh(score / softcap) before the softmax.
    Float32 math, rounded once to query's dtype; a zero length gives zeros."""
    B, Hq, D = query.shape
    group = Hq // key_cache.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=query.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        lo = max(0, n - window) if window > 0 else 0
        k = key_cache[b, :, lo:n].float().repeat_interleave(group, dim=0)  # [Hq, n - lo, D]
        v = value_cache[b, :, lo:n].float().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hnd->hn", query[b].float(), k) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(dim=-1), v)
    return out.to(query.dtype)


def decode_attention(query, key_cache, value_cache, seq_lens, scale=None, num_splits: int = 0, window: int = 0,
                     softcap: float = 0.0):
    """One query token per sequence: query [B,Hq,D], caches [B,Hkv,S,D], seq_lens [B] (int32/int64).
    scale defaults to 1/sqrt(D); num_splits 0 lets the kernel choose. window > 0: each sequence attends
    to its last `window` entries only (a sliding-window layer); softcap > 0: soft-capped scores,
    softcap * tanh(score / softcap) (Gemma 2). Returns [B,Hq,D].
    A length outside [0, S] raises on CPU; the CUDA kernel clamps it (lengths stay on the GPU).
    CUDA needs D a multiple of 16 bytes' worth of elements and at most 256."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return torch.ops.balcony.decode_attention(query, key_cache, value_cache, seq_lens, float(scale), int(num_splits),
                                              int(window), float(softcap))


if _native.available():

    @torch.library.register_fake("balcony::decode_attention")
    def _(query, key_cache, value_cache, seq_lens, scale, num_splits=0, window=0, softcap=0.0):
        torch._check(query.dim() == 3, lambda: "decode_attention: query must be [B, Hq, D]")
        torch._check(key_cache.dim() == 4, lambda: "decode_attention: key_cache must be [B, Hkv, S, D]")
        return query.new_empty(query.shape)

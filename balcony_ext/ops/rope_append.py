"""Rotary embedding + KV-cache append for decode and prefill (torch.ops.balcony.rope_append)."""

import torch

from .. import _native


def reference_rope_append(query, key, value, key_cache, value_cache, positions, cos, sin):
    """The specification, in place like the op: query rotated; key rotated and value written into
    the caches [B, Hkv, S, D] at slot positions[b, t]; negative positions are skipped.

    Rotate-half (Hugging Face) over the first R = 2 * cos.shape[1] dimensions of each head (R = D: all
    of them; R < D: partial rotary, as Phi-4-mini or Pythia): for i < R/2 with c = cos[p, i], s = sin[p, i]
        out[i] = x[i] c - x[i + R/2] s,   out[i + R/2] = x[i + R/2] c + x[i] s
    in float32, rounded once to the tensor's dtype; dimensions R..D-1 pass unchanged."""
    B, T = positions.shape
    half = cos.shape[1]

    def rotate(x, c, s):  # x [H, D] -> float32 [H, D]
        xf = x.float()
        x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)

    for b in range(B):
        for t in range(T):
            p = int(positions[b, t])
            if p < 0:
                continue
            c, s = cos[p].float(), sin[p].float()
            query[b, t] = rotate(query[b, t], c, s).to(query.dtype)
            key_cache[b, :, p] = rotate(key[b, t], c, s).to(key_cache.dtype)
            value_cache[b, :, p] = value[b, t]


def rope_append(query, key, value, key_cache, value_cache, positions, cos, sin) -> None:
    """In place: rotates query [B,T,Hq,D]; writes rotated key and value [B,T,Hkv,D] into
    key_cache/value_cache [B,Hkv,S,D] at positions [B,T] (int64, negative = padding).
    cos/sin: float32 [P, R/2] (the first half of Hugging Face's duplicated tables): the first R <= D
    dimensions of each head are rotated, the rest pass unchanged (partial rotary when R < D).
    query/key/value may be strided views (e.g. of a fused QKV output) with a contiguous last dim.
    A position >= S or >= P raises on CPU (before anything is written); on CUDA, where positions
    are not copied to the host, the kernel skips such a token like padding."""
    torch.ops.balcony.rope_append(query, key, value, key_cache, value_cache, positions, cos, sin)


def rope_tables(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0):
    """cos/sin tables [max_positions, D/2] float32 from a rotary embedding's inv_freq [D/2]."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


if _native.available():

    @torch.library.register_fake("balcony::rope_append")
    def _(query, key, value, key_cache, value_cache, positions, cos, sin):
        torch._check(query.dim() == 4 and key.dim() == 4, lambda: "rope_append: query and key must be 4-D")
        torch._check(key_cache.dim() == 4, lambda: "rope_append: key_cache must be [B, Hkv, S, D]")
        return None

"""Next-token sampling: greedy, temperature, top-k, top-p (torch.ops.balcony.sample_tokens).

Per row: temperature <= 0 -> argmax (lowest index on ties). Otherwise p = softmax(logits / T);
keep the top_k most likely (0 = all; entries tied with the k-th are kept too), then the smallest
set of the most likely of those whose mass reaches top_p of the kept mass (ties at that threshold
kept too), and pick by inverse CDF in vocabulary order: the first kept token whose cumulative
kept mass exceeds uniform * (kept mass). uniform is clamped to [0, 1) (NaN reads as 0); top_k <= 0
or >= V keeps all, top_p >= 1 keeps all, top_p <= 0 keeps only the most likely token(s).
"""

import torch

from .. import _native


def _as_rows(value, batch, dtype, device):
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(batch).contiguous() if t.dim() == 0 else t


def reference_sample_tokens(logits, temperature, top_k, top_p, uniform):
    """The specification, one row at a time with torch.sort, in float32."""
    out = []
    for b in range(logits.shape[0]):
        x = logits[b].float()
        temp = float(temperature[b])
        if not temp > 0:
            out.append(int(torch.argmax(x)))  # the first maximal index
            continue
        probs = torch.softmax(x / temp, -1)
        ordered = torch.sort(probs, descending=True).values
        k = int(top_k[b])
        tau = ordered[k - 1] if 0 < k < x.numel() else ordered.new_zeros(())
        kept = probs >= tau
        p = float(top_p[b])
        if p < 1:
            ranked = ordered[ordered >= tau]
            cum = torch.cumsum(ranked.double(), 0)
            need = p * probs[kept].double().sum()
            hit = torch.nonzero(cum >= need)
            tau = ranked[int(hit[0]) if hit.numel() else ranked.numel() - 1]
            kept = probs >= tau
        weights = torch.where(kept, probs, torch.zeros_like(probs))
        cum = torch.cumsum(weights.double(), 0)
        u = float(uniform[b])
        u = min(max(u, 0.0), 1.0 - 2**-24) if u == u else 0.0
        idx = int(torch.searchsorted(cum, u * cum[-1], right=True))
        last_kept = int(torch.nonzero(kept)[-1])
        out.append(min(idx, last_kept))
    return torch.tensor(out, dtype=torch.int64, device=logits.device)


def sample_tokens(logits: torch.Tensor, temperature=0.0, top_k=0, top_p=1.0, uniform=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, V]. temperature, top_k, top_p, uniform: scalars or [B]
    tensors; uniform None draws torch.rand(B) (with `generator`). Returns int64 [B]."""
    batch, device = logits.shape[0], logits.device
    if uniform is None:
        uniform = torch.rand(batch, generator=generator, device=device if generator is None else generator.device)
        uniform = uniform.to(device)
    return torch.ops.balcony.sample_tokens(
        logits, _as_rows(temperature, batch, torch.float32, device), _as_rows(top_k, batch, torch.int64, device),
        _as_rows(top_p, batch, torch.float32, device), _as_rows(uniform, batch, torch.float32, device))


if _native.available():

    @torch.library.register_fake("balcony::sample_tokens")
    def _(logits, temperature, top_k, top_p, uniform):
        torch._check(logits.dim() == 2, lambda: "sample_tokens: logits must be [B, V]")
        return logits.new_empty((logits.shape[0],), dtype=torch.int64)

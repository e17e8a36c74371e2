"""The engine: a token's path through an early-exit model, over the KV cache (kv_cache.KVCache).

Every prompt is prefilled in batched multi-token passes; every later token is one call of the native
step (ops.decode_step) for the whole sub-model and the next-token choice (`Engine._composed_step`, the
same step composed of the separate ops, is its reference and the path on devices without it). A
sequence that exits at depth k leaves layers past k without its token's keys; when it later moves deeper (or to another exit), the
missing entries are first filled exactly from the kept hidden states in one batched pass over the
missing positions (`catch_up`), so its caches are those a fresh prefill at the new exit would have
built.

    e = Engine(model, batch=2, max_len=64)
    e.add_prompts([ids_a, ids_b])
    nxt = e.prefill_step(exits, temperature, top_k, top_p, uniform)     # the first new tokens
    e.append(b, token) ...; e.catch_up(exits); nxt = e.step(exits, ...) # each later token
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .kv_cache import KVCache
from .module_layers import span_modules
from .weights import engine_weights


def _rms(x, w, eps):
    return ops.rms_norm(x.contiguous(), w, eps)


def _norm(x, w, eps):
    """A layer's norm where it has one (layer_layout.h: an absent norm is the identity)."""
    return _rms(x, w, eps) if w.numel() else x


def _act_and_mul(gu, activation: str):
    """The MLP's activation(gate) * up on gu = [gate | up] (ops.silu_and_mul for SiLU)."""
    if activation == "silu":
        return ops.silu_and_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _qk_norm(t, w, eps):
    """q or k [..., heads, D] normed per head (D entries) or over all heads (heads x D entries)."""
    if not w.numel():
        return t
    if w.numel() == t.shape[-1]:
        return _rms(t, w, eps)
    return _rms(t.flatten(-2), w, eps).view(t.shape)


# Rows from which a multi-token pass with bfloat16 weights uses a bfloat16 GEMM (as Hugging Face does)
# instead of linear_rows, which reads the weight once but is built for the few rows of a decode step.
BF16_GEMM_ROWS = 32


# float32 GEMMs of the prefill through oneDNN where torch has it: on the CPUs measured (Zen 5) it runs
# 20-35% faster than the default float32 path (MKL) at prefill shapes (64-512 rows, K = 576-1536).
_ONEDNN_LINEAR = [torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")]


def _linear_f32(x, w, b):
    if _ONEDNN_LINEAR[0] and x.device.type == "cpu" and x.numel() // x.shape[-1] >= BF16_GEMM_ROWS:
        try:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        except RuntimeError:
            _ONEDNN_LINEAR[0] = False  # not built for this CPU or torch: the default path from now on
    return F.linear(x, w, b)


def _linear(x, w, b=None):
    """x [..., K] float32 times w [N, K] transposed (+ b): linear_rows for the few rows of a step or
    a short catch-up on a CPU (it reads the weight once: 2-3x faster than a float32 GEMM at 1-8 rows),
    a GEMM from BF16_GEMM_ROWS rows on (and off the CPU)."""
    b = b if b is not None and b.numel() else None
    if x.numel() // x.shape[-1] < BF16_GEMM_ROWS and x.device.type == "cpu":
        shape = x.shape
        return ops.linear_rows(x.reshape(-1, shape[-1]).contiguous(), w, b).view(*shape[:-1], w.shape[0])
    if ops.is_blocks(w):
        w = ops.weight_matrix(w)  # Q8/Q4 blocks: a multi-token pass runs a float32 GEMM on the values they hold
    if w.dtype == torch.float32:
        return _linear_f32(x, w, b)
    y = F.linear(x.to(w.dtype), w).float()
    return y + b if b is not None else y


class Engine:
    """The computation over an early-exit KV cache (kv_cache.KVCache) of B rows of at most S tokens:
    multi-token passes (prefill, catch-up) and the one-token decode step."""

    def __init__(self, model, batch: int, max_len: int, native: bool | None = None, cache: KVCache | None = None):
        self.model = model
        self.w = w = engine_weights(model)
        if max_len > w.max_positions:
            raise ValueError(f"prompt plus max_new_tokens needs {max_len} positions, past the model's "
                             f"{w.max_positions} (max_position_embeddings)")
        dev = model.device
        if native is None:
            native = dev.type == "cpu" and hasattr(torch.ops.balcony, "decode_step") and w.native
        if native and not w.native:
            raise NotImplementedError(f"native=True: the native step does not run {model.adapter.model_type}; "
                                      "its layers run through the model's own modules (native=None or False)")
        self.native = native and w.native
        self.B, self.S, self.L = batch, max_len, w.L
        self.exits = list(w.exits)
        self.cache = cache if cache is not None else KVCache(w, batch, max_len, dev)
        self.cos, self.sin = w.rope(max_len) if w.native else (None, None)
        self.logits = torch.empty(batch, w.V, dtype=torch.float32, device=dev)
        # a shortlisted head's logits (shortlist.py), then scattered into self.logits (-inf elsewhere);
        # the rank of every token in the shortlist (its length for the tokens off it)
        self._short_buf, self._rank, self._off = None, None, {}
        if w.short_ids is not None:
            N = w.short_ids.numel()
            self._short_buf = torch.empty(batch * N, dtype=torch.float32, device=dev)
            self._rank = torch.full((w.V,), N, dtype=torch.long, device=dev)
            self._rank[w.short_ids] = torch.arange(N, device=dev)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.workspace = None
        if native:
            size = ops.decode_step_workspace(batch, w.H, w.Hq, w.Hkv, w.D, w.I, w.V)
            self.workspace = torch.empty(size, dtype=torch.float32, device=dev)
        self.catch_up_tokens = 0  # positions x layers filled by catch-up (for tests and stats)

    def row(self, b: int) -> "Engine":
        """An engine for row b alone, over a view of this engine's cache (a prefill runs on it exactly
        as it would for that sequence generated alone)."""
        return Engine(self.model, 1, self.S, native=self.native, cache=self.cache.row(b))

    def prefix(self, n: int) -> "Engine":
        """An engine for the first n rows, over a view of this engine's cache (kept for reuse): a step
        computes only the rows in use when they are kept at the front."""
        if n == self.B:
            return self
        cached = self.__dict__.setdefault("_prefixes", {})
        if n not in cached:
            cached[n] = Engine(self.model, n, self.S, native=self.native, cache=self.cache.rows(0, n))
        return cached[n]

    @property
    def kv_len(self) -> torch.Tensor:
        return self.cache.kv_len

    # -- multi-token passes (prefill and catch-up), the reference for the native step
    def _span(self, slot: int, x, starts, counts, outputs: str = "all"):
        """One layer over x [B,T,H] holding, for row b, positions starts[b] .. starts[b]+counts[b]-1
        (rows with fewer tokens are padded): writes their keys/values into the slot's cache and
        attends causally over the cache. Returns the layer's output [B,T,H] ("all"), only that of
        each row's last position [B,1,H] ("last"), or nothing ("none": the cache entries only)."""
        if not self.w.native:
            return span_modules(self.w, self.cache, slot, x, starts, counts, outputs)
        w = self.w
        B, T, H = x.shape
        lw = w.gemm_layer(slot) if B * T >= BF16_GEMM_ROWS else w.layer(slot)
        t = torch.arange(T, device=x.device)
        valid = t.unsqueeze(0) < counts.to(x.device).unsqueeze(1)
        pos = torch.where(valid, starts.to(x.device).unsqueeze(1) + t, torch.full_like(valid, -1, dtype=torch.long))
        # many rows with bfloat16 weights: the GEMMs run in bfloat16 (as Hugging Face's do), each
        # activation converted once; otherwise linear_rows (which rounds the activations to bfloat16 itself)
        low = lw.q_proj.dtype if lw.q_proj.dtype == torch.bfloat16 and B * T >= BF16_GEMM_ROWS else None

        def lin(a, wt, bias=None, widen=True):
            if low is None:
                return _linear(a, wt, bias)
            y = F.linear(a, wt)
            y = y.float() if widen else y  # (added to the float32 residual, a bfloat16 y is widened there)
            return y + bias if bias is not None and bias.numel() else y

        def to_low(a):
            return a.to(low) if low is not None else a

        xn = to_low(_norm(x, lw.input_norm, w.eps))
        q = _qk_norm(lin(xn, lw.q_proj, lw.q_bias).view(B, T, w.Hq, w.D), lw.q_norm, w.eps).contiguous()
        k = _qk_norm(lin(xn, lw.k_proj, lw.k_bias).view(B, T, w.Hkv, w.D), lw.k_norm, w.eps).contiguous()
        v = lin(xn, lw.v_proj, lw.v_bias).view(B, T, w.Hkv, w.D).contiguous()
        r = w.rope_of(slot)
        ops.rope_append(q, k, v, self.cache.k[slot], self.cache.v[slot], pos, self.cos[r], self.sin[r])
        if outputs == "none":
            return None
        P = int((starts + counts).max())
        window = w.slot_window[slot] if w.slot_window else 0
        # a plain causal prefill (within the window, where the layer has one)
        causal = (outputs == "all" and P == T and bool((counts == T).all()) and (not window or P <= window)
                  and not w.attn_softcap)
        if outputs == "last":  # the rest of the layer for each row's last position only
            rows = torch.arange(B, device=x.device)
            end = (counts.to(x.device) - 1).clamp(min=0)
            q, x, pos, valid = q[rows, end, None], x[rows, end, None], pos[rows, end, None], valid[rows, end, None]
            T = 1
            low = low if B >= BF16_GEMM_ROWS else None
            lw = lw if B >= BF16_GEMM_ROWS else w.layer(slot)  # (a few rows: the decode step's weights)
        if causal:
            att = F.scaled_dot_product_attention(q.transpose(1, 2), self.cache.k[slot][:, :, :P],
                                                 self.cache.v[slot][:, :, :P], is_causal=True, scale=w.scale,
                                                 enable_gqa=w.Hq != w.Hkv)
        else:
            keys = self.cache.k[slot][:, :, :P].repeat_interleave(w.Hq // w.Hkv, dim=1)
            vals = self.cache.v[slot][:, :, :P].repeat_interleave(w.Hq // w.Hkv, dim=1)
            j = torch.arange(P, device=x.device)
            mask = j.view(1, 1, P) <= pos.unsqueeze(-1)  # [B,T,P]
            if window:  # a sliding-window layer: the last `window` positions up to each query's
                mask &= j.view(1, 1, P) > pos.unsqueeze(-1) - window
            mask[..., 0] |= ~valid  # padding rows attend to something (their output is discarded)
            if w.attn_softcap:  # soft-capped scores (Gemma 2): written out
                cap = w.attn_softcap
                scores = torch.tanh(q.transpose(1, 2) @ keys.transpose(-1, -2) * (w.scale / cap)) * cap
                att = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1) @ vals
            else:
                att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask.unsqueeze(1),
                                                     scale=w.scale)
        h = lin(to_low(att.transpose(1, 2).reshape(B, T, w.Hq * w.D)), lw.o_proj)
        x = x + _norm(h, lw.attn_out_norm, w.eps)
        xn = to_low(_norm(x, lw.post_norm, w.eps))
        gu = torch.cat([lin(xn, lw.gate_proj, widen=False), lin(xn, lw.up_proj, widen=False)], dim=-1)
        return x + _norm(lin(_act_and_mul(gu, w.activation), lw.down_proj), lw.mlp_out_norm, w.eps)

    def _grid(self, starts, counts):
        """Row and position indices [B,T] of the positions starts[b] .. starts[b]+counts[b]-1 (past a
        row's count: clamped filler, masked out by `valid`), T = the largest count."""
        T = max(int(counts.max()), 1)
        t = torch.arange(T)
        valid = t.unsqueeze(0) < counts.unsqueeze(1)
        pos = (starts.unsqueeze(1) + t).clamp(max=self.S - 1)
        rows = torch.arange(self.B).unsqueeze(1).expand_as(pos)
        return rows, pos, valid

    def catch_up(self, targets: list, upto=None, last=None):
        """Brings every cache slot that row b's exit targets[b] reads up to upto[b] (default: the
        row's length minus one, i.e. every token before the one about to be decoded), computing
        the missing entries layer by layer from the kept hidden states (or the embeddings).

        With `last` (a float32 [B, H] tensor), the output at position upto[b] - 1 of each row's
        exit, after the exit's norm, is written into last[b] (every row must compute that position
        in this pass: the prefill, which so gives the first token as Hugging Face's does)."""
        if upto is None:
            upto = (self.cache.length - 1).clamp(min=0)
        upto = upto.clone()
        if not bool(((self.kv_len < upto) & self.cache.slot_mask(targets)).any()):
            return  # every slot the rows read is complete (the common case: no exit change)
        dev = self.model.device
        B, L = self.B, self.L
        deepest = max(targets)
        if deepest == 0:
            return
        tgt = torch.tensor(targets)

        # the output of the last base layer and of the exits' layers: needed for the first token only
        tail = "last" if last is not None else "none"

        def take_last(y, counts, rows, depth):
            if last is None or not bool(rows.any()):
                return
            if bool((counts[rows] == 0).any()):
                raise RuntimeError("catch_up(last=...): a row's last position was computed before this pass")
            idx = rows.nonzero()[:, 0]
            last[idx] = self._exit_norm(depth, y[idx, 0])

        cur = None  # [B, S, H] hidden states entering the current layer, where computed this pass
        prev_start = upto.clone()  # where the previous layer's catch-up started, per row
        for i in range(deepest):
            need = tgt > i
            starts = self.kv_len[i].clone()
            counts = torch.where(need, (upto - starts).clamp(min=0), torch.zeros_like(upto))
            if int(counts.sum()) == 0:
                prev_start = torch.where(need, upto, prev_start)
                continue
            if cur is None:
                cur = torch.zeros(B, self.S, self.w.H, dtype=torch.float32, device=dev)
            rows, pos, valid = self._grid(starts, counts)
            if i == 0:
                r, p = rows[valid], pos[valid]
                cur[r, p] = self._embed(self.cache.tokens[r, p].to(dev))
            else:
                # positions that passed layer i-1 before this pass left at exit i: kept
                old = valid & (pos < prev_start.unsqueeze(1))
                if bool(old.any()):
                    if i not in self.exits:
                        b = int(old.any(1).nonzero()[0])
                        raise RuntimeError(f"KV cache bookkeeping: layer {i} lacks positions {int(starts[b])}.."
                                           f"{int(prev_start[b]) - 1} of row {b} that no exit kept")
                    r, p = rows[old], pos[old]
                    cur[r, p] = self.cache.kept[self.exits.index(i)][r, p]
            # the same positions in every row (a prefill of equal lengths): slices, not gathers
            s0, T = int(starts[0]), pos.shape[1]
            dense = bool((starts == s0).all()) and bool((counts == T).all())
            x = cur[:, s0:s0 + T] if dense else cur[rows, pos]
            y = self._span(i, x, starts, counts, "all" if i + 1 < L else tail)
            self.catch_up_tokens += int(counts.sum())
            if i + 1 < L:
                keep = self.cache.kept[self.exits.index(i + 1)] if i + 1 in self.exits else None
                if dense:
                    cur[:, s0:s0 + T] = y
                    if keep is not None:
                        keep[:, s0:s0 + T] = y
                else:
                    r, p = rows[valid], pos[valid]
                    cur[r, p] = y[valid]
                    if keep is not None:
                        keep[r, p] = y[valid]
            else:
                take_last(y, counts, tgt == L, L)
            self.kv_len[i] = torch.where(counts > 0, upto, self.kv_len[i])
            prev_start = torch.where(need, starts, prev_start)
        # the exits' own layers, from the hidden state kept at their depth
        for k in sorted(set(targets)):
            if k in (0, L):
                continue
            slot, e = self.cache.exit_slot(k), self.exits.index(k)
            sel = tgt == k
            starts = self.kv_len[slot].clone()
            counts = torch.where(sel, (upto - starts).clamp(min=0), torch.zeros_like(upto))
            if int(counts.sum()) == 0:
                continue
            rows, pos, _ = self._grid(starts, counts)
            y = self._span(slot, self.cache.kept[e][rows, pos], starts, counts, tail)
            take_last(y, counts, sel, k)
            self.catch_up_tokens += int(counts.sum())
            self.kv_len[slot] = torch.where(counts > 0, upto, self.kv_len[slot])

    # -- the prefill
    def prefill_step(self, exits: list, temperature, top_k, top_p, uniform, penalties=None,
                     heads=None) -> torch.Tensor:
        """Every prompt token, the last included, through the layers each row's exit reads in one
        batched pass; the first new token comes from the last position (no separate decode step).
        Leaves the caches as catch_up + step would; returns the next tokens [B]. heads: per row, its
        head (see step)."""
        if bool((self.kv_len > 0).any()) or 0 in exits:
            self.catch_up(exits)
            return self.step(exits, temperature, top_k, top_p, uniform, penalties, heads)
        w = self.w
        fin = torch.zeros(self.B, w.H, dtype=torch.float32, device=self.model.device)
        self.catch_up(exits, upto=self.cache.length, last=fin)
        self._head(fin, self._head_plan(exits, heads))
        if penalties is not None:
            penalties.apply(self.logits, self.cache.tokens, self.cache.length)
        return ops.sample_tokens(self.logits, temperature, top_k, top_p, uniform).cpu()

    # -- one decode step
    def step(self, exits: list, temperature, top_k, top_p, uniform, penalties=None, heads=None) -> torch.Tensor:
        """Decodes the last token of every row at its exit; returns the next tokens [B] and leaves
        the logits in self.logits. Rows' caches for their exits must be complete (catch_up).
        penalties (penalties.Penalties): applied to the logits, and the token chosen again.
        heads: per row, 0 for the full LM head or n for the first n tokens of the model's shortlist (its
        logits are the head's on those tokens and -inf elsewhere); when every running row has a
        shortlisted head, only the head rows of the largest of them are read."""
        B = self.B
        plan = self._head_plan(exits, heads)
        pos = (self.cache.length - 1).clamp(min=0)
        last = self.cache.tokens[torch.arange(B), pos]
        ex = torch.tensor(exits, dtype=torch.long)
        mask = self.cache.slot_mask(exits)
        bad = (mask & (self.kv_len != pos)).any(0)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise RuntimeError(f"KV cache bookkeeping: row {b} at exit {exits[b]} lacks cache entries "
                               f"before position {int(pos[b])}; call catch_up first")
        if not self.w.native:  # the model's own modules: the last position through each row's layers
            fin = torch.zeros(B, self.w.H, dtype=torch.float32, device=self.model.device)
            self.catch_up(exits, upto=self.cache.length, last=fin)
            self._head(fin, plan)
            nxt = ops.sample_tokens(self.logits, *self._device_inputs(last, pos, ex, temperature, top_k, top_p,
                                                                     uniform)[3:])
        elif self.native:
            w = self.w
            head, out = self._head_out(plan)
            ops.decode_step(
                last, pos, ex, self.exits, w.embed, w.base, w.exit, w.final_norm, head, self.cache.k, self.cache.v,
                self.cache.kept, self.cos, self.sin, w.slot_rope, w.slot_window, w.eps, w.scale, w.embed_scale,
                w.activation, w.attn_softcap, w.logit_softcap, self.workspace, out, temperature, top_k, top_p, uniform,
                self.next_tokens)
            self._shortlisted(plan)
            nxt = ops.sample_tokens(self.logits, temperature, top_k, top_p, uniform) if plan[0] else self.next_tokens
        else:
            nxt = self._composed_step(*self._device_inputs(last, pos, ex, temperature, top_k, top_p, uniform),
                                      exits=exits, plan=plan)
        if penalties is not None:  # (the step's own choice, from the logits before them, is dropped)
            penalties.apply(self.logits, self.cache.tokens, self.cache.length)
            nxt = ops.sample_tokens(self.logits, temperature, top_k, top_p, uniform)
        self.kv_len.copy_(torch.where(mask, pos + 1, self.kv_len))
        return nxt.cpu()  # (on a GPU: the step's one synchronisation, reading the next tokens)

    # -- a token again at the full depth (confidence-based early exit)
    def deepen_unsure(self, exits: list, confidence: list, temperature, top_k, top_p, uniform,
                      penalties=None) -> dict:
        """After a step (or the prefill) at `exits`: {row: its next token taken again at the full depth}
        for every row at an exit (0 < exit < L) whose logits give their most likely token a probability
        below confidence[row] (0: never)."""
        rows = [b for b in range(self.B) if 0 < exits[b] < self.L and confidence[b] > 0]
        if rows:
            top = self.logits[rows].softmax(-1).amax(-1).tolist()
            rows = [b for b, p in zip(rows, top) if p < confidence[b]]
        if not rows:
            return {}
        return dict(zip(rows, self.deepen(rows, temperature, top_k, top_p, uniform, penalties).tolist()))

    def deepen(self, rows: list, temperature, top_k, top_p, uniform, penalties=None) -> torch.Tensor:
        """After a step (or the prefill) at shallower exits: the last token of each row in `rows`
        again at the full depth. The base layers past its exit run over the positions they lack,
        the last one included, in one batched pass from the kept hidden states (catch_up), then the
        final norm and the full head. Returns those rows' next tokens [len(rows)] (temperature,
        top_k, top_p, uniform and penalties are the step's, for all B rows); their full-depth logits
        replace theirs in self.logits."""
        B, L, dev = self.B, self.L, self.model.device
        if not rows:
            return torch.zeros(0, dtype=torch.long)
        if len(set(rows)) != len(rows) or not all(0 <= b < B for b in rows):
            raise ValueError(f"deepen: rows must be distinct row indices in 0..{B - 1}, got {rows}")
        fin = torch.zeros(B, self.w.H, dtype=torch.float32, device=dev)
        self.catch_up([L if b in rows else 0 for b in range(B)], upto=self.cache.length, last=fin)
        idx = torch.tensor(rows, dtype=torch.long)
        x, w = fin[idx.to(dev)], self.w
        if not w.native:
            logits = w.adapter.logits(x.to(w.dtype)).float()
        else:
            logits = _linear(x, w.head)
            if w.logit_softcap:
                logits = torch.tanh(logits / w.logit_softcap) * w.logit_softcap
        if penalties is not None:
            penalties.rows(idx).apply(logits, self.cache.tokens[idx], self.cache.length[idx])
        self.logits[idx.to(dev)] = logits
        pick = lambda t: t[idx.to(t.device)] if torch.is_tensor(t) and t.dim() else t  # noqa: E731
        return ops.sample_tokens(logits, pick(temperature), pick(top_k), pick(top_p), pick(uniform)).cpu()

    def _device_inputs(self, last, pos, ex, temperature, top_k, top_p, uniform) -> tuple:
        """The step's per-row inputs (host tensors or numbers) on the model's device. On a GPU: two
        copies from pinned host buffers, which do not wait for the device (a copy from ordinary host
        memory would). The buffers are reused: the previous step's copies ended with its .cpu()."""
        dev, B = self.model.device, self.B
        if dev.type == "cpu":
            return last, pos, ex, temperature, top_k, top_p, uniform
        if getattr(self, "_pinned", None) is None:
            self._pinned = (torch.empty(4, B, dtype=torch.long).pin_memory(), torch.empty(3, B).pin_memory())
        ints, floats = self._pinned
        for i, t in enumerate((last, pos, ex, top_k)):
            ints[i].copy_(torch.as_tensor(t).expand(B))
        for i, t in enumerate((temperature, top_p, uniform)):
            floats[i].copy_(torch.as_tensor(t, dtype=torch.float32).expand(B))
        di, df = ints.to(dev, non_blocking=True), floats.to(dev, non_blocking=True)
        return di[0], di[1], di[2], df[0], di[3], df[1], df[2]

    def _composed_step(self, last, pos, ex, temperature, top_k, top_p, uniform, exits: list, plan=({}, 0)):
        """The decode step composed of the balcony ops, for any device (the path off the CPU, and
        native=False): every row runs every layer up to the deepest exit in use; masks built on the
        device (a position of -1: no cache write, no attention) keep each row to the layers of its
        own exit. The row inputs are device tensors (ex: each row's exit); which layers run is decided on
        the host from the same exits as a list; nothing reads the device."""
        w, L, B, dev = self.w, self.L, self.B, last.device
        rows = torch.arange(B, device=dev)
        x = self._embed(last)  # [B, H]
        fin = torch.zeros(B, w.H, dtype=torch.float32, device=dev)
        for i in range(max(exits)):
            x = self._decode_layer(i, x, torch.where(ex > i, pos, -1))
            k = i + 1
            if k in self.exits and max(exits) >= k:
                e = self.exits.index(k)
                kept = self.cache.kept[e]
                kept[rows, pos] = torch.where((ex >= k).unsqueeze(1), x, kept[rows, pos])
                if k in exits:
                    y = self._decode_layer(self.cache.exit_slot(k), x, torch.where(ex == k, pos, -1))
                    fin = torch.where((ex == k).unsqueeze(1), _rms(y, w.exit_norms[e], w.eps), fin)
        if L in exits:
            fin = torch.where((ex == L).unsqueeze(1), _rms(x, w.final_norm, w.eps), fin)
        head, out = self._head_out(plan)
        out.copy_(_linear(fin, head))
        if w.logit_softcap:
            out.copy_(torch.tanh(out / w.logit_softcap) * w.logit_softcap)
        self._shortlisted(plan)
        return ops.sample_tokens(self.logits, temperature, top_k, top_p, uniform)

    def _decode_layer(self, slot: int, x, pos):
        """One decoder layer (cache slot `slot`) for one token per row, x [B, H] float32 at positions
        pos [B] (-1: the row writes no cache entry and attends to nothing; its output is unused)."""
        w, lw, B = self.w, self.w.layer(slot), x.shape[0]
        xn = _norm(x, lw.input_norm, w.eps)
        q = _qk_norm(_linear(xn, lw.q_proj, lw.q_bias).view(B, 1, w.Hq, w.D), lw.q_norm, w.eps).contiguous()
        k = _qk_norm(_linear(xn, lw.k_proj, lw.k_bias).view(B, 1, w.Hkv, w.D), lw.k_norm, w.eps)
        v = _linear(xn, lw.v_proj, lw.v_bias).view(B, 1, w.Hkv, w.D)
        r = w.rope_of(slot)
        ops.rope_append(q, k.contiguous(), v.contiguous(), self.cache.k[slot], self.cache.v[slot], pos.view(B, 1),
                        self.cos[r], self.sin[r])
        att = ops.decode_attention(q.view(B, w.Hq, w.D), self.cache.k[slot], self.cache.v[slot], pos + 1, w.scale,
                                   window=w.slot_window[slot] if w.slot_window else 0, softcap=w.attn_softcap or 0.0)
        h = _norm(_linear(att.reshape(B, w.Hq * w.D), lw.o_proj), lw.attn_out_norm, w.eps)
        if lw.post_norm.numel():
            x = x.clone()
            ops.fused_add_rms_norm(h, x, lw.post_norm, w.eps)  # x += attention output; h = post-norm(x)
        else:  # (OLMo 2: no norm before the MLP)
            x = h = x + h
        gu = torch.cat([_linear(h, lw.gate_proj), _linear(h, lw.up_proj)], dim=-1)
        return x + _norm(_linear(_act_and_mul(gu, w.activation), lw.down_proj), lw.mlp_out_norm, w.eps)

    # -- the pieces that differ between the native weights and the model's own modules
    def _embed(self, ids):
        w = self.w
        if not w.native:
            return w.adapter.embed_tokens(ids).float()
        x = w.embed[ids].float()
        return x * w.embed_scale if w.embed_scale != 1.0 else x

    def _exit_norm(self, k: int, y):
        """The norm after exit k's layer (the final norm for k == L) on float32 rows y."""
        w = self.w
        if w.native:
            return _rms(y, w.exit_norm(k), w.eps)
        return w.norms[k](y.to(w.dtype)).float()

    def _head(self, fin, plan=({}, 0)):
        """self.logits = the LM head on the normed rows fin [B, H] (soft-capped where the family caps),
        shortlisted as `plan` (_head_plan) says."""
        w = self.w
        if not w.native:
            self.logits.copy_(w.adapter.logits(fin.to(w.dtype)).float())
        else:
            head, out = self._head_out(plan)
            if fin.device.type == "cpu":
                ops.linear_rows(fin, head, out=out)
            else:
                out.copy_(_linear(fin, head))
            if w.logit_softcap:
                out.copy_(torch.tanh(out / w.logit_softcap) * w.logit_softcap)
        self._shortlisted(plan)

    # -- shortlisted heads (shortlist.py)
    def _head_plan(self, exits: list, heads) -> tuple:
        """({n: the running rows whose head is the first n shortlisted tokens}, compact): compact is
        the largest n when every running row has a shortlisted head (then only those head rows are
        computed), else 0 (the full head for every row, masked for theirs). The module path always
        computes the full head."""
        if heads is None or not any(heads):
            return {}, 0
        if len(heads) != self.B:
            raise ValueError(f"heads has {len(heads)} entries for {self.B} rows")
        if self.w.short_ids is None:
            raise ValueError("a row asks for a shortlisted head, but the model has no shortlist (set_shortlist)")
        N = self.w.short_ids.numel()
        rows = {}
        for b, n in enumerate(heads):
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= N:
                raise ValueError(f"row {b}: a head of {n!r} shortlisted tokens; the shortlist has {N} (0: the full head)")
            if n and exits[b] != 0:
                rows.setdefault(n, []).append(b)
        running = [b for b in range(self.B) if exits[b] != 0]
        compact = max(rows) if rows and self.w.native and all(heads[b] for b in running) else 0
        return rows, compact

    def _head_out(self, plan) -> tuple:
        """(the head's weight, the logits it writes) for a plan: the first n shortlisted rows into a
        [B, n] buffer when compact, else the full head into self.logits."""
        n = plan[1]
        if not n:
            return self.w.head, self.logits
        return self.w.head_short[:n], self._short_buf[:self.B * n].view(self.B, n)

    def _shortlisted(self, plan):
        """After the head: the compact logits scattered into self.logits (-inf elsewhere), and every
        shortlisted row's logits masked to its own head's tokens."""
        rows, n = plan
        if n:
            self.logits.fill_(float("-inf"))
            self.logits.index_copy_(1, self.w.short_ids[:n], self._short_buf[:self.B * n].view(self.B, n))
        for size, idx in rows.items():
            if size == n:
                continue  # (those rows are exactly the compact head's)
            if size not in self._off:
                self._off[size] = self._rank >= size  # True for the tokens off the first `size`
            idx = torch.tensor(idx, device=self.logits.device)
            self.logits[idx] = self.logits[idx].masked_fill(self._off[size], float("-inf"))

    # -- prompts
    def add_prompts(self, prompts: list):
        for b, ids in enumerate(prompts):
            self.cache.set_tokens(b, ids)

    def append(self, b: int, token: int):
        self.cache.append(b, token)


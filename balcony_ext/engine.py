"""Generation under a compute budget, with an early-exit KV cache.

    out = bx.generate(model, "Why is the sky blue?", budget=0.5, max_new_tokens=128)
    out.text, out.exit_layers, out.tokens_per_second, out.time_to_first_token
    for piece in bx.generate(model, prompt, budget=0.3, stream=True): print(piece, end="")
    outs = bx.generate(model, [p1, p2, p3], budget=[0.3, 0.6, 1.0])

A budget in (0, 1] is the fraction of the full model's per-token cost the caller allows; the
engine takes the deepest exit whose cost fits (1.0 is the full model). Costs come from a
calibration (`calibrate()` / `balcony calibrate`: measured milliseconds per token of each exit on
this machine), else from the bytes of weights read per token. `exit_layer=k` picks an exit
directly, `ms_per_token=x` the deepest exit whose calibrated latency fits.

The engine (`Engine`): a static cache, allocated once per call, holding float32 keys and values
[B, Hkv, S, D] for every base layer and every exit, the number of valid cache entries per layer
slot and sequence, and the hidden state after each exit depth for every token (`kept`). The
prompt is prefilled in batched passes; every later token is one native call
(torch.ops.balcony.decode_step) for the whole sub-model and the next-token choice. A sequence
that exits at depth k leaves layers past k without its token's keys; when it later moves deeper
(or to another exit), the missing entries are first filled exactly from the kept hidden states
in one batched pass over the missing positions ("KV catch-up"), so its caches are those a fresh
prefill at the new exit would have built.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops

PER_LAYER = 14  # tensors per decoder layer handed to the native step (see csrc/torch_bindings.cpp)


# ---- costs and budgets ------------------------------------------------------------------------
def calibration_path(model) -> Path:
    root = Path(os.environ.get("BALCONY_CACHE", Path.home() / ".cache" / "balcony_ext"))
    return root / "calibration" / f"{model.name}.json"


def exit_costs(model, calibration: dict | None = None) -> dict:
    """{depth: relative per-token cost} for every attached exit and the full model (num_layers: 1.0).
    From a calibration's measured ms/token when given, else from parameters read per token
    (layers run + exit + LM head), which is bytes read up to the element size."""
    from .evaluate import costs

    L = model.num_layers
    if calibration is not None:
        ms = {int(k): float(v) for k, v in calibration["ms_per_token"].items()}
        missing = [k for k in model.exits + [L] if k not in ms]
        if missing:
            raise ValueError(f"the calibration has no figure for exits {missing}; run `balcony calibrate` again")
        return {k: ms[k] / ms[L] for k in model.exits + [L]}
    c = costs(model)
    out = {k: c[("balcony", k)] / c["full"] for k in model.exits}
    out[L] = 1.0
    return out


def load_calibration(model, path=None) -> dict | None:
    """The saved calibration for this model (None if there is none)."""
    p = Path(path) if path is not None else calibration_path(model)
    if not p.exists():
        return None
    try:
        cal = json.loads(p.read_text())
        if cal.get("model") != model.name or "ms_per_token" not in cal:
            return None
        return cal
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"the calibration file {p} is damaged ({exc}); run `balcony calibrate` again") from exc


def choose_exit(model, budget: float, calibration: dict | None = None) -> tuple:
    """(exit depth, note): the deepest exit whose relative cost fits the budget in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number in (0, 1], got {type(budget).__name__} {budget!r}")
    if not 0.0 < float(budget) <= 1.0 or math.isnan(budget):
        raise ValueError(f"budget must be in (0, 1] (a fraction of the full model's per-token cost), got {budget}")
    costs = exit_costs(model, calibration)
    fitting = [k for k, c in costs.items() if c <= budget + 1e-9]
    if fitting:
        return max(fitting), None
    k = min(costs, key=costs.get)
    return k, f"budget {budget:g} is below the cheapest exit (depth {k}, cost {costs[k]:.3f}); using it"


def exit_for_latency(model, ms_per_token: float, calibration: dict | None) -> tuple:
    if calibration is None:
        raise ValueError("a latency target needs a calibration of this machine: run `balcony calibrate` "
                         "(or balcony_ext.calibrate(model)) first")
    if not ms_per_token > 0:
        raise ValueError(f"ms_per_token must be positive, got {ms_per_token}")
    ms = {int(k): float(v) for k, v in calibration["ms_per_token"].items() if int(k) in model.exits + [model.num_layers]}
    fitting = [k for k, v in ms.items() if v <= ms_per_token]
    if fitting:
        return max(fitting), None
    k = min(ms, key=ms.get)
    return k, f"{ms_per_token:g} ms/token is below the fastest exit (depth {k}, {ms[k]:.2f} ms/token); using it"


# ---- the model's weights, as the native step takes them ------------------------------------------
def _vec(t):
    return t.detach().float().contiguous() if t is not None else torch.empty(0)


def _mat(t):
    return t.detach().contiguous()


def _layer_tensors(layer) -> list:
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn.o_proj, "bias", None) is not None or any(
            getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise NotImplementedError("generate(): output-projection and MLP biases are not supported by the decode step")
    act = getattr(mlp, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise NotImplementedError(f"generate(): the MLP activation {type(act).__name__} is not SiLU")
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return [
        _vec(layer.input_layernorm.weight),
        _mat(attn.q_proj.weight), _vec(attn.q_proj.bias),
        _mat(attn.k_proj.weight), _vec(attn.k_proj.bias),
        _mat(attn.v_proj.weight), _vec(attn.v_proj.bias),
        _vec(qn.weight if qn is not None else None), _vec(kn.weight if kn is not None else None),
        _mat(attn.o_proj.weight),
        _vec(layer.post_attention_layernorm.weight),
        _mat(mlp.gate_proj.weight), _mat(mlp.up_proj.weight), _mat(mlp.down_proj.weight),
    ]


class NativeWeights:
    """Views of the model's weights in the order the native step reads them (matrices are the
    model's own tensors; norms and biases are small float32 copies)."""

    def __init__(self, model):
        a = model.adapter
        c = a.config
        self.L = model.num_layers
        self.exits = list(model.exits)
        self.base = [t for layer in a.layers for t in _layer_tensors(layer)]
        self.exit = []
        for k in self.exits:
            ex = model.exit_module(k)
            self.exit += _layer_tensors(ex.layer) + [_vec(ex.norm.weight)]
        self.embed = a.embed_tokens.weight.detach()
        self.head = _mat(a.lm_head.weight)
        self.final_norm = _vec(a.final_norm.weight)
        self.eps = a.rms_norm_eps
        self.H = a.hidden_size
        self.Hq = int(c.num_attention_heads)
        self.Hkv = int(getattr(c, "num_key_value_heads", None) or self.Hq)
        self.D = int(getattr(c, "head_dim", None) or self.H // self.Hq)
        self.I = int(c.intermediate_size)
        self.V = a.vocab_size
        self.scale = float(getattr(a.layers[0].self_attn, "scaling", self.D ** -0.5))
        self.max_positions = int(getattr(c, "max_position_embeddings", 1 << 20))
        self.sliding = getattr(c, "sliding_window", None) if any(
            a.layer_type(i) != "full_attention" for i in range(self.L)) else None
        self.rotary = a.rotary_emb
        self._tables = None

    def layer(self, slot: int) -> list:
        if slot < self.L:
            return self.base[slot * PER_LAYER:(slot + 1) * PER_LAYER]
        e = slot - self.L
        return self.exit[e * (PER_LAYER + 1):(e + 1) * (PER_LAYER + 1)]

    def rope(self, positions: int):
        """cos/sin [P, D/2] float32 from the model's own rotary embedding (its scaling included)."""
        if self._tables is None or self._tables[0].shape[0] < positions:
            ids = torch.arange(positions, device=self.embed.device).unsqueeze(0)
            probe = torch.zeros(1, positions, self.D, device=self.embed.device)
            cos, sin = self.rotary(probe, ids)
            half = self.D // 2
            self._tables = (cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous())
        return self._tables


def native_weights(model) -> NativeWeights:
    """Cached per model and exit set (rebuilt when exits are attached, loaded or trained)."""
    key = (tuple(model.exits), model.tokens_trained, id(model.balconies), model.dtype,
           tuple(p.data_ptr() for p in model.balcony_parameters()[:1]))
    cached = getattr(model, "_native_weights", None)
    if cached is None or cached[0] != key:
        cached = (key, NativeWeights(model))
        model._native_weights = cached
    return cached[1]


# ---- the engine ------------------------------------------------------------------------------
def _rms(x, w, eps):
    return ops.rms_norm(x.contiguous(), w, eps)


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
    if w.dtype == torch.float32:
        return _linear_f32(x, w, b if b is not None and b.numel() else None)
    if x.numel() // x.shape[-1] >= BF16_GEMM_ROWS:
        y = F.linear(x.to(w.dtype), w).float()
        return y + b if b is not None and b.numel() else y
    shape = x.shape
    y = ops.linear_rows(x.reshape(-1, shape[-1]).contiguous(), w, b if b is not None and b.numel() else None)
    return y.view(*shape[:-1], w.shape[0])


class Engine:
    """Static early-exit KV cache and the decode loop for a batch of B sequences of at most S tokens."""

    def __init__(self, model, batch: int, max_len: int, native: bool | None = None):
        self.model = model
        self.w = w = native_weights(model)
        if w.sliding is not None and max_len > w.sliding:
            raise NotImplementedError(f"generate(): this model uses sliding-window attention ({w.sliding} tokens); "
                                      f"sequences up to that length are supported, asked for {max_len}")
        if max_len > w.max_positions:
            raise ValueError(f"prompt plus max_new_tokens needs {max_len} positions, past the model's "
                             f"{w.max_positions} (max_position_embeddings)")
        dev = model.device
        if native is None:
            native = dev.type == "cpu" and hasattr(torch.ops.balcony, "decode_step")
        self.native = native
        self.B, self.S, self.L = batch, max_len, w.L
        self.exits = list(w.exits)
        slots = self.L + len(self.exits)
        f32 = dict(dtype=torch.float32, device=dev)
        self.k_cache = [torch.zeros(batch, w.Hkv, max_len, w.D, **f32) for _ in range(slots)]
        self.v_cache = [torch.zeros(batch, w.Hkv, max_len, w.D, **f32) for _ in range(slots)]
        self.kept = [torch.zeros(batch, max_len, w.H, **f32) for _ in self.exits]
        self.kv_len = torch.zeros(slots, batch, dtype=torch.long)  # valid entries per slot and row
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long)
        self.length = torch.zeros(batch, dtype=torch.long)  # tokens in each sequence
        self.cos, self.sin = w.rope(max_len)
        self.logits = torch.empty(batch, w.V, **f32)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.workspace = None
        if native:
            size = torch.ops.balcony.decode_step_workspace(batch, w.H, w.Hq, w.Hkv, w.D, w.I, w.V)
            self.workspace = torch.empty(size, **f32)
        self.catch_up_tokens = 0  # positions x layers filled by catch-up (for tests and stats)
        self._masks = {}

    # -- slots
    def exit_slot(self, k: int) -> int | None:
        return None if k == self.L else self.L + self.exits.index(k)

    def slots_for(self, k: int) -> list:
        """Cache slots a token decoded at exit k reads and writes (k == 0: an idle row, none)."""
        if k == 0:
            return []
        return list(range(k)) + ([self.exit_slot(k)] if k != self.L else [])

    def slot_mask(self, exits: list) -> torch.Tensor:
        """bool [slots, B]: the cache slots each row reads at its exit (cached per exit tuple)."""
        key = tuple(exits)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(self.kv_len.shape, dtype=torch.bool)
            for b, k in enumerate(exits):
                m[self.slots_for(k), b] = True
            self._masks[key] = m
        return m

    def check_exit(self, k: int):
        if k != self.L and k not in self.exits:
            raise ValueError(f"exit {k} is not attached to the model (exits: {self.exits}; "
                             f"{self.L} is the full model)")

    # -- multi-token passes (prefill and catch-up), the reference for the native step
    def _span(self, slot: int, x, starts, counts, outputs: str = "all"):
        """One layer over x [B,T,H] holding, for row b, positions starts[b] .. starts[b]+counts[b]-1
        (rows with fewer tokens are padded): writes their keys/values into the slot's cache and
        attends causally over the cache. Returns the layer's output [B,T,H] ("all"), only that of
        each row's last position [B,1,H] ("last"), or nothing ("none": the cache entries only)."""
        w = self.w
        lw = self.w.layer(slot)
        B, T, H = x.shape
        t = torch.arange(T, device=x.device)
        valid = t.unsqueeze(0) < counts.to(x.device).unsqueeze(1)
        pos = torch.where(valid, starts.to(x.device).unsqueeze(1) + t, torch.full_like(valid, -1, dtype=torch.long))
        # many rows with bfloat16 weights: the GEMMs run in bfloat16 (as Hugging Face's do), each
        # activation converted once; otherwise float32 activations (linear_rows widens the weights)
        low = lw[1].dtype if lw[1].dtype != torch.float32 and B * T >= BF16_GEMM_ROWS else None

        def lin(a, wt, bias=None, widen=True):
            if low is None:
                return _linear(a, wt, bias)
            y = F.linear(a, wt)
            y = y.float() if widen else y  # (added to the float32 residual, a bfloat16 y is widened there)
            return y + bias if bias is not None and bias.numel() else y

        def to_low(a):
            return a.to(low) if low is not None else a

        xn = to_low(_rms(x, lw[0], w.eps))
        q = lin(xn, lw[1], lw[2]).view(B, T, w.Hq, w.D)
        k = lin(xn, lw[3], lw[4]).view(B, T, w.Hkv, w.D)
        v = lin(xn, lw[5], lw[6]).view(B, T, w.Hkv, w.D).contiguous()
        if lw[7].numel():
            q = _rms(q, lw[7], w.eps).view(B, T, w.Hq, w.D)
        if lw[8].numel():
            k = _rms(k, lw[8], w.eps).view(B, T, w.Hkv, w.D)
        q, k = q.contiguous(), k.contiguous()
        ops.rope_append(q, k, v, self.k_cache[slot], self.v_cache[slot], pos, self.cos, self.sin)
        if outputs == "none":
            return None
        P = int((starts + counts).max())
        causal = outputs == "all" and P == T and bool((counts == T).all())  # a plain causal prefill
        if outputs == "last":  # the rest of the layer for each row's last position only
            rows = torch.arange(B, device=x.device)
            end = (counts.to(x.device) - 1).clamp(min=0)
            q, x, pos, valid = q[rows, end, None], x[rows, end, None], pos[rows, end, None], valid[rows, end, None]
            T = 1
            low = low if B >= BF16_GEMM_ROWS else None
        if causal:
            att = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache[slot][:, :, :P],
                                                 self.v_cache[slot][:, :, :P], is_causal=True, scale=w.scale,
                                                 enable_gqa=w.Hq != w.Hkv)
        else:
            keys = self.k_cache[slot][:, :, :P].repeat_interleave(w.Hq // w.Hkv, dim=1)
            vals = self.v_cache[slot][:, :, :P].repeat_interleave(w.Hq // w.Hkv, dim=1)
            j = torch.arange(P, device=x.device)
            mask = j.view(1, 1, P) <= pos.unsqueeze(-1)  # [B,T,P]
            mask[..., 0] |= ~valid  # padding rows attend to something (their output is discarded)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask.unsqueeze(1),
                                                 scale=w.scale)
        x = x + lin(to_low(att.transpose(1, 2).reshape(B, T, w.Hq * w.D)), lw[9], widen=False)
        xn = to_low(_rms(x, lw[10], w.eps))
        gu = torch.cat([lin(xn, lw[11], widen=False), lin(xn, lw[12], widen=False)], dim=-1)
        return x + lin(ops.silu_and_mul(gu), lw[13], widen=False)

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
            upto = (self.length - 1).clamp(min=0)
        upto = upto.clone()
        if not bool(((self.kv_len < upto) & self.slot_mask(targets)).any()):
            return  # every slot the rows read is complete (the common case: no exit change)
        dev = self.model.device
        B, L = self.B, self.L
        deepest = max(targets)
        if deepest == 0:
            return
        tgt = torch.tensor(targets)

        # the output of the last base layer and of the exits' layers: needed for the first token only
        tail = "last" if last is not None else "none"

        def take_last(y, counts, rows, norm):
            if last is None or not bool(rows.any()):
                return
            if bool((counts[rows] == 0).any()):
                raise RuntimeError("catch_up(last=...): a row's last position was computed before this pass")
            idx = rows.nonzero()[:, 0]
            last[idx] = _rms(y[idx, 0], norm, self.w.eps)

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
                cur[r, p] = self.w.embed[self.tokens[r, p].to(dev)].float()
            else:
                # positions that passed layer i-1 before this pass left at exit i: kept
                old = valid & (pos < prev_start.unsqueeze(1))
                if bool(old.any()):
                    if i not in self.exits:
                        b = int(old.any(1).nonzero()[0])
                        raise RuntimeError(f"KV cache bookkeeping: layer {i} lacks positions {int(starts[b])}.."
                                           f"{int(prev_start[b]) - 1} of row {b} that no exit kept")
                    r, p = rows[old], pos[old]
                    cur[r, p] = self.kept[self.exits.index(i)][r, p]
            # the same positions in every row (a prefill of equal lengths): slices, not gathers
            s0, T = int(starts[0]), pos.shape[1]
            dense = bool((starts == s0).all()) and bool((counts == T).all())
            x = cur[:, s0:s0 + T] if dense else cur[rows, pos]
            y = self._span(i, x, starts, counts, "all" if i + 1 < L else tail)
            self.catch_up_tokens += int(counts.sum())
            if i + 1 < L:
                keep = self.kept[self.exits.index(i + 1)] if i + 1 in self.exits else None
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
                take_last(y, counts, tgt == L, self.w.final_norm)
            self.kv_len[i] = torch.where(counts > 0, upto, self.kv_len[i])
            prev_start = torch.where(need, starts, prev_start)
        # the exits' own layers, from the hidden state kept at their depth
        for k in sorted(set(targets)):
            if k in (0, L):
                continue
            slot, e = self.exit_slot(k), self.exits.index(k)
            sel = tgt == k
            starts = self.kv_len[slot].clone()
            counts = torch.where(sel, (upto - starts).clamp(min=0), torch.zeros_like(upto))
            if int(counts.sum()) == 0:
                continue
            rows, pos, _ = self._grid(starts, counts)
            y = self._span(slot, self.kept[e][rows, pos], starts, counts, tail)
            take_last(y, counts, sel, self.w.exit[e * (PER_LAYER + 1) + PER_LAYER])
            self.catch_up_tokens += int(counts.sum())
            self.kv_len[slot] = torch.where(counts > 0, upto, self.kv_len[slot])

    # -- the prefill
    def prefill_step(self, exits: list, temperature, top_k, top_p, uniform) -> torch.Tensor:
        """Every prompt token, the last included, through the layers each row's exit reads in one
        batched pass; the first new token comes from the last position (no separate decode step).
        Leaves the caches as catch_up + step would; returns the next tokens [B]."""
        if bool((self.kv_len > 0).any()) or 0 in exits:
            self.catch_up(exits)
            return self.step(exits, temperature, top_k, top_p, uniform)
        w = self.w
        fin = torch.zeros(self.B, w.H, dtype=torch.float32, device=self.model.device)
        self.catch_up(exits, upto=self.length, last=fin)
        if fin.device.type == "cpu":
            ops.linear_rows(fin, w.head, out=self.logits)
        else:
            self.logits.copy_(_linear(fin, w.head))
        return ops.sample_tokens(self.logits, temperature, top_k, top_p, uniform).cpu()

    # -- one decode step
    def step(self, exits: list, temperature, top_k, top_p, uniform) -> torch.Tensor:
        """Decodes the last token of every row at its exit; returns the next tokens [B] and leaves
        the logits in self.logits. Rows' caches for their exits must be complete (catch_up)."""
        B, L = self.B, self.L
        pos = (self.length - 1).clamp(min=0)
        last = self.tokens[torch.arange(B), pos]
        ex = torch.tensor(exits, dtype=torch.long)
        mask = self.slot_mask(exits)
        bad = (mask & (self.kv_len != pos)).any(0)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise RuntimeError(f"KV cache bookkeeping: row {b} at exit {exits[b]} lacks cache entries "
                               f"before position {int(pos[b])}; call catch_up first")
        dev = self.model.device
        if self.native:
            w = self.w
            torch.ops.balcony.decode_step(
                last, pos, ex, self.exits, w.embed, w.base, w.exit, w.final_norm, w.head, self.k_cache,
                self.v_cache, self.kept, self.cos, self.sin, w.eps, w.scale, self.workspace, self.logits,
                temperature, top_k, top_p, uniform, self.next_tokens)
            nxt = self.next_tokens
        else:
            nxt = self._python_step(last.to(dev), pos.to(dev), exits, temperature, top_k, top_p, uniform)
        self.kv_len = torch.where(mask, pos + 1, self.kv_len)
        return nxt.cpu()

    def _python_step(self, last, pos, exits, temperature, top_k, top_p, uniform):
        """The decode step in plain PyTorch, layer by layer (the native step's reference, and the
        path on devices without the native step)."""
        B, L, w = self.B, self.L, self.w
        x = w.embed[last].float().unsqueeze(1)  # [B,1,H]
        fin = torch.zeros(B, w.H, dtype=torch.float32, device=x.device)
        ex = torch.tensor(exits)
        for i in range(max(exits)):
            counts = (ex > i).long()
            x = self._span(i, x, pos.cpu(), counts)
            k = i + 1
            if k in self.exits:
                e = self.exits.index(k)
                for b in range(B):
                    if exits[b] >= k:
                        self.kept[e][b, int(pos[b])] = x[b, 0]
                rows = (ex == k).long()
                if int(rows.sum()):
                    y = self._span(self.exit_slot(k), x, pos.cpu(), rows)
                    normed = _rms(y[:, 0], w.exit[e * (PER_LAYER + 1) + PER_LAYER], w.eps)
                    fin[ex == k] = normed[ex == k]
        if (ex == L).any():
            fin[ex == L] = _rms(x[:, 0], w.final_norm, w.eps)[ex == L]
        self.logits.copy_(_linear(fin, w.head))
        return ops.sample_tokens(self.logits, temperature, top_k, top_p, uniform)

    # -- prompts
    def add_prompts(self, prompts: list):
        for b, ids in enumerate(prompts):
            n = len(ids)
            if n == 0:
                raise ValueError(f"prompt {b} is empty")
            if n > self.S:
                raise ValueError(f"prompt {b} has {n} tokens, past the cache of {self.S}")
            self.tokens[b, :n] = torch.as_tensor(ids, dtype=torch.long)
            self.length[b] = n

    def append(self, b: int, token: int):
        n = int(self.length[b])
        if n >= self.S:
            raise ValueError(f"sequence {b} is full: {self.S} tokens, the size of the cache")
        self.tokens[b, n] = token
        self.length[b] = n + 1


# ---- the public call ---------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    text: str
    tokens: list
    exit_layers: list  # the exit that produced each generated token
    tokens_per_second: float  # decode speed after the first token
    time_to_first_token: float  # seconds from the call (validation, cache allocation and prefill included)
    prompt_tokens: int
    finish_reason: str  # "stop" or "length"
    notes: list = field(default_factory=list)

    def __str__(self):
        return self.text


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _prompt_type_error(prompt) -> TypeError:
    return TypeError("a prompt must be a str, a list of str, or token ids (a list of ints, or a list of lists "
                     f"of ints), got {type(prompt).__name__} {reprlib.repr(prompt)}")


def encode_prompt(tok, prompt, chat=None) -> list:
    """Token ids of a prompt: a list of ids as is; a string through the chat template when `chat` (default:
    when the tokenizer has one), else plainly tokenised."""
    if _is_token_ids(prompt):
        return list(prompt)
    if not isinstance(prompt, str):
        raise _prompt_type_error(prompt)
    if not prompt:
        return []  # reported by the caller, which knows the prompt's index
    if tok is None:
        raise ValueError("the model has no tokenizer; pass prompts as lists of token ids")
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt)["input_ids"]


def stop_token_ids(model, stop_tokens=None) -> set:
    """The token ids that end a sequence: `stop_tokens` when given, else the model's end-of-sequence ids."""
    ids = set()
    tok = model.tokenizer
    if stop_tokens is None:
        gen = getattr(model.adapter.hf, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else getattr(tok, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    else:
        ids.update(int(t) for t in stop_tokens)
    return ids


class _Budgets:
    """Turns budget / exit_layer / ms_per_token (numbers, per-sequence lists, schedules or
    callables of the step) into the exit of every row at every step."""

    def __init__(self, model, B, budget, exit_layer, ms_per_token, calibration):
        given = [x is not None for x in (budget, exit_layer, ms_per_token)]
        if sum(given) > 1:
            raise ValueError("give one of budget, exit_layer and ms_per_token")
        if not any(given):
            budget = 1.0
        self.model, self.B, self.cal = model, B, calibration
        self.kind = "budget" if budget is not None else "exit" if exit_layer is not None else "latency"
        self.notes = [[] for _ in range(B)]
        self.set(budget if budget is not None else exit_layer if exit_layer is not None else ms_per_token, 0)

    def set(self, value, step: int):
        """Uses `value` from `step` on. It is resolved for that step first: a bad value raises and changes
        nothing (the resolution is kept for that step, so a callable is still called once per step)."""
        resolved = self._resolve(value, step)
        self.value, self._resolved = value, (step, resolved)

    def _one(self, v, b):
        m = self.model
        if self.kind == "exit":
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"exit_layer must be an int, got {v!r}")
            if v != m.num_layers and v not in m.exits:
                raise ValueError(f"exit {v} is not attached to the model (exits: {m.exits}; "
                                 f"{m.num_layers} is the full model)")
            return v, None
        if self.kind == "latency":
            return exit_for_latency(m, float(v), self.cal)
        return choose_exit(m, v, self.cal)

    def _resolve(self, v, step: int) -> list:
        """[(exit, note or None)] of every row at `step` for the value v; raises for a bad value."""
        if callable(v):
            v = v(step)
        elif isinstance(v, dict):  # schedule {from_step: value}
            keys = sorted(k for k in v if k <= step)
            if not keys:
                raise ValueError(f"the budget schedule {v} has no entry for step {step} (start it at 0)")
            v = v[keys[-1]]
        if isinstance(v, (list, tuple)):
            if len(v) != self.B:
                raise ValueError(f"{len(v)} per-sequence values for {self.B} prompts")
            vals = list(v)
        else:
            vals = [v] * self.B
        return [self._one(x, b) for b, x in enumerate(vals)]

    def exits(self, step: int) -> list:
        at, resolved = self._resolved
        out = []
        for b, (k, note) in enumerate(resolved if at == step else self._resolve(self.value, step)):
            if note and note not in self.notes[b]:
                self.notes[b].append(note)
            out.append(k)
        return out


class Generation:
    """A running generation: iterate it for text pieces (streaming) or call .run(); change the
    budget at any time with set_budget()."""

    def __init__(self, model, prompts, single, budget=None, exit_layer=None, ms_per_token=None,
                 max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None,
                 stop_tokens=None, chat=None, max_len=None, native=None, calibration="auto"):
        self.t_start = time.perf_counter()  # the time to first token counts from the call
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.model = model
        self.ids = [encode_prompt(model.tokenizer, p, chat) for p in prompts]
        for b, ids in enumerate(self.ids):
            if not ids:
                raise ValueError(f"prompt {b} is empty" if len(prompts) > 1 else "the prompt is empty")
            model.check_token_ids(ids)
        self.single = single
        B = len(self.ids)

        def rows(name, v, dtype, ok, allowed):
            v = list(v) if isinstance(v, (list, tuple)) else [v] * B
            if len(v) != B:
                raise ValueError(f"{len(v)} per-sequence {name} values for {B} prompts")
            for x in v:
                if isinstance(x, bool) or not ok(x):
                    raise ValueError(f"{name} must be {allowed}, got {x!r}")
            return torch.tensor(v, dtype=dtype)

        real = lambda x: isinstance(x, numbers.Real)  # noqa: E731
        self.temperature = rows("temperature", temperature, torch.float32,
                                lambda x: real(x) and math.isfinite(x) and x >= 0, "a finite number >= 0 (0: greedy)")
        self.top_k = rows("top_k", top_k, torch.long, lambda x: isinstance(x, numbers.Integral) and x >= 0,
                          "an int >= 0 (0: no top-k cut)")
        self.top_p = rows("top_p", top_p, torch.float32, lambda x: real(x) and 0 < x <= 1, "in (0, 1]")
        need = max(len(i) for i in self.ids) + max_new_tokens
        if max_len is not None and need > max_len:
            raise ValueError(f"a prompt of {max(len(i) for i in self.ids)} tokens plus max_new_tokens="
                             f"{max_new_tokens} needs {need} cache positions, past max_len={max_len}")
        cal = load_calibration(model) if calibration == "auto" else calibration
        self.budgets = _Budgets(model, B, budget, exit_layer, ms_per_token, cal)  # validates before any allocation
        # the engine (its cache) is allocated when the generation starts, inside the time to first token
        self.engine, self._engine_args = None, (B, max_len or need, native)
        self.max_new = max_new_tokens
        self.stop_ids = stop_token_ids(model, stop_tokens)
        self.stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (1 << 63))
        self.gen = gen
        self.generated = [[] for _ in range(B)]
        self.exit_layers = [[] for _ in range(B)]
        self.done = [False] * B
        self.finish = ["length"] * B
        self.texts = [""] * B
        self.step_index = 0
        self.t_first = None
        self.t_end = None

    def set_budget(self, budget):
        """Changes the budget from the next token on (a number, per-sequence list, schedule or callable).
        A value that does not resolve to exits for the next token raises; the generation is then unchanged."""
        self.budgets.set(budget, self.step_index)

    def _decode_text(self, b):
        tok = self.model.tokenizer
        return tok.decode(self.generated[b], skip_special_tokens=True) if tok is not None else ""

    def _advance(self) -> list:
        """One token for every unfinished row; returns the new text of each row."""
        e = self.engine
        exits = self.budgets.exits(self.step_index)
        # finished rows stay idle (exit 0: no layer runs for them)
        exits = [0 if self.done[b] else exits[b] for b in range(e.B)]
        uniform = torch.rand(e.B, generator=self.gen)
        if self.step_index == 0:
            nxt = e.prefill_step(exits, self.temperature, self.top_k, self.top_p, uniform)
        else:
            e.catch_up(exits)
            nxt = e.step(exits, self.temperature, self.top_k, self.top_p, uniform)
        pieces = [""] * e.B
        for b in range(e.B):
            if self.done[b]:
                continue
            t = int(nxt[b])
            self.generated[b].append(t)
            self.exit_layers[b].append(exits[b])
            text = self._decode_text(b)
            pieces[b] = text[len(self.texts[b]):]
            self.texts[b] = text
            if t in self.stop_ids:
                self.done[b], self.finish[b] = True, "stop"
            elif any(s in text for s in self.stop_strings):
                cut = min(text.index(s) for s in self.stop_strings if s in text)
                pieces[b] = pieces[b][: max(0, len(pieces[b]) - (len(text) - cut))]
                self.texts[b] = text[:cut]
                self.done[b], self.finish[b] = True, "stop"
            elif len(self.generated[b]) >= self.max_new:
                self.done[b] = True
            else:
                e.append(b, t)
        if self.step_index == 0:
            self.t_first = time.perf_counter()
        self.step_index += 1
        return pieces

    def prefill(self):
        """Loads the prompts; the first call of _advance runs them through the model."""
        B, max_len, native = self._engine_args
        self.engine = Engine(self.model, B, max_len, native=native)
        self.engine.add_prompts(self.ids)

    def __iter__(self):
        self.prefill()
        while not all(self.done):
            pieces = self._advance()  # the first call also sets t_first
            yield pieces[0] if self.single else pieces
        self.t_end = time.perf_counter()

    def run(self):
        for _ in self:
            pass
        return self.result()

    def result(self):
        end = self.t_end or time.perf_counter()
        outs = []
        for b in range(len(self.ids)):
            n = len(self.generated[b])
            decode_s = end - self.t_first if self.t_first else 0.0
            outs.append(GenerationOutput(
                text=self.texts[b], tokens=list(self.generated[b]), exit_layers=list(self.exit_layers[b]),
                tokens_per_second=(max(self.step_index - 1, 0) / decode_s) if decode_s > 0 else float("nan"),
                time_to_first_token=(self.t_first - self.t_start) if self.t_first else float("nan"),
                prompt_tokens=len(self.ids[b]), finish_reason=self.finish[b], notes=list(self.budgets.notes[b])))
        return outs[0] if self.single else outs


@torch.no_grad()
def generate(model, prompt, budget=None, *, exit_layer=None, ms_per_token=None, max_new_tokens: int = 128,
             temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None, stop_tokens=None, chat=None,
             stream: bool = False, max_len=None, native=None, calibration="auto"):
    """Generates from one prompt (or a list of prompts, as one batch) at the exit the budget buys.

    budget: in (0, 1], a number, a per-sequence list, a schedule {from_step: budget} or a callable
    step -> budget (the exit may change from token to token). Or exit_layer=k, or
    ms_per_token=x (needs a calibration). temperature 0 is greedy; top_k, top_p and seed for
    sampling; stop: strings that end a sequence (not included); stop_tokens: ids (default: the
    model's end-of-sequence tokens); chat: wrap a string prompt in the tokenizer's chat template
    (default: when it has one). stream=True returns a Generation to iterate for text pieces (its
    set_budget() changes the budget mid-generation); otherwise a GenerationOutput (a list for a
    list of prompts).
    """
    if not isinstance(prompt, (str, list, tuple)):
        raise _prompt_type_error(prompt)
    if not prompt and not isinstance(prompt, str):
        raise ValueError("no prompts given")
    single = isinstance(prompt, str) or _is_token_ids(prompt)
    prompts = [prompt] if single else list(prompt)
    g = Generation(model, prompts, single, budget=budget, exit_layer=exit_layer, ms_per_token=ms_per_token,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop=stop, stop_tokens=stop_tokens, chat=chat, max_len=max_len, native=native,
                   calibration=calibration)
    if stream:
        return g
    return g.run()


@torch.no_grad()
def calibrate(model, tokens: int = 32, context: int = 64, repeats: int = 3, path=None, progress: bool = True) -> dict:
    """Measures each exit's (and the full model's) decode milliseconds per token on this machine at
    batch 1 and saves them (default: the cache directory) for budgets and latency targets."""
    from tqdm.auto import tqdm

    prompt = list(range(100, 100 + context))
    ms = {}
    depths = list(model.exits) + [model.num_layers]
    for k in tqdm(depths, desc="calibrating", disable=not progress):
        best = float("inf")
        for _ in range(repeats):
            out = generate(model, prompt, exit_layer=k, max_new_tokens=tokens, stop_tokens=[], calibration=None)
            best = min(best, 1000.0 / out.tokens_per_second)
        ms[str(k)] = best
    cal = dict(model=model.name, ms_per_token=ms, threads=torch.get_num_threads(), context=context,
               measured=time.strftime("%Y-%m-%dT%H:%M:%S"))
    p = Path(path) if path is not None else calibration_path(model)
    p.parent.mkdir(parents=True, exist_ok=True)
    from .exits_io import _atomic_write

    _atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(cal, indent=2)))
    return cal

"""Decode-speed measurements: ours at every exit beside Hugging Face `generate` at the same depth.

Used by `balcony bench` and benchmarks/bench_generate.py. All figures of one call are measured in
one process, so their ratios hold even where absolute timings drift.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .budgets import costs
from .generate import generate


def memory_bandwidth(mb: int = 256, repeats: int = 7) -> dict:
    """Read bandwidth (the fastest of three whole-buffer reductions: sum, max, dot product) and copy
    bandwidth (read + write), GB/s, median of repeats."""
    src = torch.ones(mb * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4

    def median(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    readers = (lambda: src.sum(), lambda: src.amax(), lambda: torch.dot(src, src))
    return dict(read_gbs=max(nbytes / median(r) / 1e9 for r in readers),
                copy_gbs=2 * nbytes / median(lambda: dst.copy_(src)) / 1e9)


# bytes per weight of the block formats (32 values and a float16 scale per block)
BLOCK_BYTES = {"int8": 34 / 32, "q4": 18 / 32, "q4_1": 20 / 32}


def bytes_per_token(model, k: int, head: int = 0) -> int:
    """Bytes of weights a decode step at exit k reads per step (layers, exit, LM head: the rows of the
    first `head` shortlisted tokens only, if not 0; the embedding row lookup is negligible), in the
    model's weight format."""
    from .weights import HEAD_FORMAT, weight_format

    c = costs(model)
    full_head = model.adapter.lm_head.weight.numel()
    head = head * model.adapter.hidden_size if head else full_head
    params = (c["full"] if k == model.num_layers else c[("balcony", k)]) - full_head + head
    fmt = weight_format(model)
    if fmt == "float":
        return params * model.dtype.itemsize
    return int((params - head) * BLOCK_BYTES[fmt] + head * BLOCK_BYTES[HEAD_FORMAT[fmt]])


def hf_at_depth(model, k: int):
    """A Hugging Face causal LM that computes exit k: the first k base layers, the balcony layer and
    its norm, the shared head (modules shared with `model`, no copies but the exit layer's)."""
    hf = model.adapter.hf
    if k == model.num_layers:
        return hf
    ex = model.exit_module(k)
    layer = copy.deepcopy(ex.layer)
    model.adapter.set_cache_index(layer, k)
    fam = model.adapter.family
    stack = getattr(hf, fam.inner)
    inner = copy.copy(stack)
    inner._modules = dict(stack._modules)
    setattr(inner, fam.layers, nn.ModuleList(list(getattr(stack, fam.layers)[:k]) + [layer]))
    setattr(inner, fam.norm, ex.norm)
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = k + 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:k]) + [config.layer_types[-1]]
    inner.config = config
    out = copy.copy(hf)
    out._modules = dict(hf._modules)
    setattr(out, fam.inner, inner)
    out.config = config
    return out


def _hf_speed(hf, ids: torch.Tensor, new_tokens: int) -> tuple:
    """(decode time of new_tokens - 1 tokens s, time to first token s) of one HF greedy generate pair:
    decode time is that of new_tokens tokens minus that of one (the prefill and first token)."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    ttft = timed(1)
    return timed(new_tokens) - ttft, ttft


def _our_speed(model, prompts: list, k: int, new_tokens: int, head: int = 0) -> tuple:
    out = generate(model, prompts, max_new_tokens=new_tokens, exit_layer=k, stop_tokens=[], calibration=None,
                   shortlist=head)[0]
    return out.tokens_per_second, out.time_to_first_token


def decode_table(model, depths=None, batch: int = 1, prompt_len: int = 64, new_tokens: int = 32, hf: bool = True,
                 repeats: int = 3, progress: bool = True, shortlist: bool = True) -> list:
    """One row per route (depth and head; every shortlisted head too where the model has a shortlist and
    `shortlist`): our decode tokens/s (per sequence) and time to first token beside HF's at the same
    depth (full head), the weights' bytes per step, achieved GB/s, and the speed-up over our full model
    against the ideal ratio of bytes read. Best of `repeats` rounds, each round measuring every route
    (ours, then Hugging Face's) in turn, so a slow spell of a shared machine does not land on one row only."""
    from tqdm.auto import tqdm

    from .weights import weight_format

    L = model.num_layers
    depths = list(depths) if depths is not None else list(model.exits) + [L]
    heads = [0] + (list(model.shortlist_sizes) if shortlist and getattr(model, "shortlist", None) is not None else [])
    routes = [(k, s) for k in depths for s in heads]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10_000, (batch, prompt_len), generator=g)
    prompts = ids.tolist()
    hfs = {k: hf_at_depth(model, k) for k in depths} if hf else {}
    best = {r: dict(ours=0.0, ttft=float("inf"), hf=0.0, hf_ttft=float("inf")) for r in routes}
    with torch.no_grad():
        for k, s in routes:  # warm-up
            generate(model, prompts, max_new_tokens=2, exit_layer=k, stop_tokens=[], calibration=None, shortlist=s)
            if hf and not s:
                _hf_speed(hfs[k], ids, 2)
        for _ in tqdm(range(repeats), desc=f"decode speed, batch {batch}", disable=not progress):
            for k, s in routes:
                b = best[(k, s)]
                tps, ttft = _our_speed(model, prompts, k, new_tokens, s)
                b["ours"], b["ttft"] = max(b["ours"], tps), min(b["ttft"], ttft)
                if hf and not s:
                    dec, ttft = _hf_speed(hfs[k], ids, new_tokens)
                    b["hf"], b["hf_ttft"] = max(b["hf"], (new_tokens - 1) / max(dec, 1e-9)), min(b["hf_ttft"], ttft)
    rows = []
    for k, s in routes:
        b = best[(k, s)]
        row = dict(exit=k, head=str(s) if s else "full", batch=batch,
                   dtype=str(model.dtype).replace("torch.", ""), weights=weight_format(model), tokens_per_s=b["ours"],
                   ttft_s=b["ttft"], bytes_per_step=bytes_per_token(model, k, s))
        row["gbs"] = row["bytes_per_step"] * b["ours"] / 1e9
        if hf and not s:
            row.update(hf_tokens_per_s=b["hf"], hf_ttft_s=b["hf_ttft"], vs_hf=b["ours"] / b["hf"])
        rows.append(row)
    full = next((r for r in rows if r["exit"] == L and r["head"] == "full"), None)
    for r in rows:
        if full is not None:
            r["speedup_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
            r["ideal_speedup"] = full["bytes_per_step"] / r["bytes_per_step"]
            r["of_ideal"] = r["speedup_vs_full"] / r["ideal_speedup"]
    return rows


def format_table(rows: list, bandwidth: dict | None = None) -> str:
    cols = [("dtype", "dtype", ""), ("weights", "weights", ""), ("batch", "batch", ""), ("exit", "exit", ""),
            ("head", "head", ""), ("tokens_per_s", "tok/s", ".1f"),
            ("hf_tokens_per_s", "HF tok/s", ".1f"), ("vs_hf", "x HF", ".2f"), ("ttft_s", "TTFT s", ".3f"),
            ("hf_ttft_s", "HF TTFT s", ".3f"), ("gbs", "GB/s", ".1f"), ("of_read_bw", "of read BW", ".2f"),
            ("speedup_vs_full", "x full", ".2f"), ("ideal_speedup", "ideal", ".2f"), ("of_ideal", "of ideal", ".2f")]
    if bandwidth:
        for r in rows:
            r.setdefault("of_read_bw", r["gbs"] / bandwidth["read_gbs"])
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([format(r[k], f) if k in r else "-" for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

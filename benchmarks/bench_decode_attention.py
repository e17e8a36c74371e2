"""Benchmark of torch.ops.balcony.decode_attention (split-KV, GQA) against the PyTorch-eager
reference and against torch.nn.functional.scaled_dot_product_attention (the fair eager
baseline), at decode sizes: batch 1/8/32, contexts 128/1024/8192, SmolLM2-like heads 9/3 x 64
and Llama-8B-like 32/8 x 128. Every sequence is full to the context length.

    python benchmarks/bench_decode_attention.py                 # GPU when there is one, else CPU
    (from the repository root with balcony_ext importable: installed, or PYTHONPATH=.)
    python benchmarks/bench_decode_attention.py --device cpu --dtype float32 --full

bytes = K + V read over the valid lengths + query read + output written. On CPU the default skips
configurations whose KV cache exceeds --max-mb (the full grid takes minutes there); --full keeps all.
The reference (a Python loop over sequences) is timed only for batch <= 8.
"""

import math

import torch
import torch.nn.functional as F

from balcony_ext import ops
from balcony_ext.reference import reference_decode_attention
from common import emit_json, machine, median_time, op_arguments, op_setup, print_table

HEADS = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def sdpa(q, kc, vc, n, scale):
    """Eager baseline: one [B,Hq,1,D] query against the first n cache entries, GQA native."""
    return F.scaled_dot_product_attention(
        q.unsqueeze(2), kc[:, :, :n], vc[:, :, :n], scale=scale, enable_gqa=True
    ).squeeze(2)


def main():
    ap = op_arguments()
    ap.add_argument("--full", action="store_true", help="every configuration, however large")
    ap.add_argument("--max-mb", type=float, default=160.0, help="CPU: skip KV caches larger than this")
    args = ap.parse_args()
    dev, dtype, copy_gbs = op_setup(args)
    print(f"decode_attention on {dev} ({machine()}), {args.dtype}; copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    for name, (hq, hkv, d) in HEADS.items():
        for batch in (1, 8, 32):
            for ctx in (128, 1024, 8192):
                kv_bytes = 2 * batch * hkv * ctx * d * torch.finfo(dtype).bits // 8
                if dev == "cpu" and not args.full and kv_bytes > args.max_mb * 1e6:
                    continue
                q = torch.randn(batch, hq, d, device=dev, dtype=dtype)
                kc = torch.randn(batch, hkv, ctx, d, device=dev, dtype=dtype)
                vc = torch.randn(batch, hkv, ctx, d, device=dev, dtype=dtype)
                lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
                scale = 1.0 / math.sqrt(d)
                nbytes = kv_bytes + 2 * q.numel() * q.element_size()
                t = median_time(lambda: ops.decode_attention(q, kc, vc, lens, scale), min_time=0.05)
                t_sdpa = median_time(lambda: sdpa(q, kc, vc, ctx, scale), min_time=0.05)
                t_ref = (
                    median_time(lambda: reference_decode_attention(q, kc, vc, lens, scale), warmup=1, reps=3)
                    if batch <= 8
                    else float("nan")
                )
                gbs = nbytes / t / 1e9
                rows.append(
                    dict(heads=name, B=batch, ctx=ctx, MB=kv_bytes / 1e6, us=t * 1e6, gbs=gbs, copy=gbs / copy_gbs,
                         sdpa_us=t_sdpa * 1e6, vs_sdpa=t_sdpa / t, ref_us=t_ref * 1e6, vs_ref=t_ref / t)
                )
    print_table(rows, [("heads", "heads", None), ("B", "B", "d"), ("ctx", "ctx", "d"), ("MB", "KV MB", ".1f"),
                       ("us", "ours us", ".1f"), ("gbs", "GB/s", ".1f"), ("copy", "x copy", ".2f"),
                       ("sdpa_us", "sdpa us", ".1f"), ("vs_sdpa", "vs sdpa", ".2f"), ("ref_us", "ref us", ".1f"),
                       ("vs_ref", "vs ref", ".2f")])
    emit_json(dict(bench="decode_attention", device=dev, dtype=args.dtype, machine=machine(),
                   copy_gbs=copy_gbs, rows=rows))


if __name__ == "__main__":
    main()

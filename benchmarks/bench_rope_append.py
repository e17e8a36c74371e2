"""Benchmark of torch.ops.balcony.rope_append (rotary embedding on query and key + KV-cache append)
against its PyTorch-eager reference and against a vectorised eager implementation (the fair
baseline: whole-batch rotate-half plus an index_put_ into the caches), SmolLM2 heads 9/3 x 64 and
Llama-8B-like 32/8 x 128, cache of 2048 slots: at decode (T = 1, batch 1/8/32) and for a prompt
(T = 512 consecutive positions, batch 1/8).

    python benchmarks/bench_rope_append.py                 # GPU when there is one, else CPU
    python benchmarks/bench_rope_append.py --device cpu --dtype float32
    (from the repository root with balcony_ext importable: installed, or PYTHONPATH=.)

bytes = query read + written, key and value read, key and value written to the cache, cos/sin rows
read. At decode these are kilobytes (the figure of merit is latency); prompt rows moving more than
32 MiB ("large") are held to the >= 70% of copy bandwidth target.
"""


import torch

from balcony_ext import ops
from balcony_ext.reference import reference_rope_append
from common import emit_json, machine, median_time, op_arguments, op_setup, print_table

HEADS = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
LARGE_BYTES = 32 << 20


def eager(q, k, v, kc, vc, pos, cos, sin):
    """Whole-batch eager version (every position valid): HF rotate-half, then a scatter."""
    half = q.shape[-1] // 2
    c = cos[pos].unsqueeze(2)  # [B,T,1,D/2]
    s = sin[pos].unsqueeze(2)

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)

    q.copy_(rot(q))
    b = torch.arange(q.shape[0], device=q.device)[:, None]
    kc[b, :, pos] = rot(k)
    vc[b, :, pos] = v


def main():
    ap = op_arguments()
    ap.add_argument("--slots", type=int, default=2048)
    args = ap.parse_args()
    dev, dtype, copy_gbs = op_setup(args)
    print(f"rope_append on {dev} ({machine()}), {args.dtype}; copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    S = args.slots
    for T, batches in ((1, (1, 8, 32)), (512, (1, 8))):
        for name, (hq, hkv, d) in HEADS.items():
            for batch in batches:
                qkv = torch.randn(batch, T, (hq + 2 * hkv) * d, device=dev, dtype=dtype)  # fused projection output
                q = qkv[..., : hq * d].view(batch, T, hq, d)
                k = qkv[..., hq * d : (hq + hkv) * d].view(batch, T, hkv, d)
                v = qkv[..., (hq + hkv) * d :].view(batch, T, hkv, d)
                kc = torch.zeros(batch, hkv, S, d, device=dev, dtype=dtype)
                vc = torch.zeros_like(kc)
                start = torch.randint(0, S - T + 1, (batch, 1), device=dev)
                pos = start + torch.arange(T, device=dev)
                theta = torch.rand(S, d // 2, device=dev)
                cos, sin = theta.cos(), theta.sin()
                el = q.element_size()
                nbytes = batch * T * ((2 * hq + 4 * hkv) * d * el + 2 * d // 2 * 4)
                few = nbytes > LARGE_BYTES
                t = median_time(lambda: ops.rope_append(q, k, v, kc, vc, pos, cos, sin), reps=10 if few else 50,
                                min_time=0.05)
                t_eager = median_time(lambda: eager(q, k, v, kc, vc, pos, cos, sin), reps=5 if few else 50,
                                      min_time=0.05)
                t_ref = (median_time(lambda: reference_rope_append(q, k, v, kc, vc, pos, cos, sin), warmup=1, reps=3)
                         if batch * T <= 512 else float("nan"))
                gbs = nbytes / t / 1e9
                rows.append(dict(heads=name, B=batch, T=T, MB=nbytes / 1e6, us=t * 1e6, gbs=gbs, copy=gbs / copy_gbs,
                                 eager_us=t_eager * 1e6, vs_eager=t_eager / t, ref_us=t_ref * 1e6, vs_ref=t_ref / t,
                                 large=few))
    print_table(rows, [("heads", "heads", None), ("B", "B", "d"), ("T", "T", "d"), ("MB", "MB", ".3f"),
                       ("us", "ours us", ".1f"),
                       ("gbs", "GB/s", ".2f"), ("copy", "x copy", ".3f"), ("eager_us", "eager us", ".1f"),
                       ("vs_eager", "vs eager", ".2f"), ("ref_us", "ref us", ".1f"), ("vs_ref", "vs ref", ".1f"),
                       ("large", "large", None)])
    large = [r for r in rows if r["large"]]
    emit_json(dict(bench="rope_append", device=dev, dtype=args.dtype, machine=machine(), copy_gbs=copy_gbs,
                   target_met_large=all(r["copy"] >= 0.7 for r in large) if large else None,
                   min_frac_copy_large=min((r["copy"] for r in large), default=None), rows=rows))


if __name__ == "__main__":
    main()

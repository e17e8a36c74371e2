"""Benchmark of torch.ops.balcony.rope_append (rotary embedding on query and key + KV-cache append)
against its PyTorch-eager reference and against a vectorised eager implementation (the fair
baseline: whole-batch rotate-half plus index_copy_ into the caches), at decode (T = 1): batch
1/8/32, SmolLM2 heads 9/3 x 64 and Llama-8B-like 32/8 x 128, cache of 2048 slots.

    python benchmarks/bench_rope_append.py                 # GPU when there is one, else CPU
    python benchmarks/bench_rope_append.py --device cpu --dtype float32
    (from the repository root with balcony_ext importable: installed, or PYTHONPATH=.)

bytes = query read + written, key and value read, key and value written to the cache, cos/sin rows
read. These are tiny (kilobytes): the figure of merit is latency; GB/s is shown for completeness.
"""


import torch

from balcony_ext import ops
from balcony_ext.reference import reference_rope_append
from common import emit_json, machine, median_time, op_arguments, op_setup, print_table

HEADS = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def eager(q, k, v, kc, vc, pos, cos, sin):
    """Whole-batch eager version for T = 1 (every position valid): HF rotate-half, then a scatter."""
    half = q.shape[-1] // 2
    c = cos[pos].unsqueeze(2)  # [B,T,1,D/2]
    s = sin[pos].unsqueeze(2)

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)

    q.copy_(rot(q))
    b = torch.arange(q.shape[0], device=q.device)
    p = pos[:, 0]
    kc[b, :, p] = rot(k)[:, 0]
    vc[b, :, p] = v[:, 0]


def main():
    ap = op_arguments()
    ap.add_argument("--slots", type=int, default=2048)
    args = ap.parse_args()
    dev, dtype, copy_gbs = op_setup(args)
    print(f"rope_append on {dev} ({machine()}), {args.dtype}, T = 1; copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    for name, (hq, hkv, d) in HEADS.items():
        for batch in (1, 8, 32):
            S = args.slots
            qkv = torch.randn(batch, 1, (hq + 2 * hkv) * d, device=dev, dtype=dtype)  # fused projection output
            q = qkv[..., : hq * d].view(batch, 1, hq, d)
            k = qkv[..., hq * d : (hq + hkv) * d].view(batch, 1, hkv, d)
            v = qkv[..., (hq + hkv) * d :].view(batch, 1, hkv, d)
            kc = torch.zeros(batch, hkv, S, d, device=dev, dtype=dtype)
            vc = torch.zeros_like(kc)
            pos = torch.randint(0, S, (batch, 1), device=dev)
            theta = torch.rand(S, d // 2, device=dev)
            cos, sin = theta.cos(), theta.sin()
            el = q.element_size()
            nbytes = (2 * hq + 4 * hkv) * d * batch * el + 2 * batch * d // 2 * 4
            t = median_time(lambda: ops.rope_append(q, k, v, kc, vc, pos, cos, sin), reps=50, min_time=0.05)
            t_eager = median_time(lambda: eager(q, k, v, kc, vc, pos, cos, sin), reps=50, min_time=0.05)
            t_ref = median_time(lambda: reference_rope_append(q, k, v, kc, vc, pos, cos, sin), warmup=1, reps=5)
            gbs = nbytes / t / 1e9
            rows.append(dict(heads=name, B=batch, KB=nbytes / 1e3, us=t * 1e6, gbs=gbs, copy=gbs / copy_gbs,
                             eager_us=t_eager * 1e6, vs_eager=t_eager / t, ref_us=t_ref * 1e6, vs_ref=t_ref / t))
    print_table(rows, [("heads", "heads", None), ("B", "B", "d"), ("KB", "KB", ".1f"), ("us", "ours us", ".1f"),
                       ("gbs", "GB/s", ".2f"), ("copy", "x copy", ".3f"), ("eager_us", "eager us", ".1f"),
                       ("vs_eager", "vs eager", ".2f"), ("ref_us", "ref us", ".1f"), ("vs_ref", "vs ref", ".1f")])
    emit_json(dict(bench="rope_append", device=dev, dtype=args.dtype, machine=machine(), copy_gbs=copy_gbs,
                   rows=rows))


if __name__ == "__main__":
    main()

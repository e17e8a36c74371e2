"""RMSNorm microbenchmark: torch.ops.balcony.rms_norm, fused_add_rms_norm and rms_norm_backward against
PyTorch eager: the float32 reference functions ("ref"), and the best stock PyTorch path in the op's own
dtype where it exists ("F.rms_norm": torch.nn.functional.rms_norm, after an in-place add for the fused
op, and its autograd for the backward).

    python benchmarks/bench_rms_norm.py                 # GPU if present, else CPU; bfloat16
    python benchmarks/bench_rms_norm.py --dtype float32 --device cpu

Bytes counted = what the op must read + write (x, out, residual, grad tensors; the weight once).
"Large" rows (> 32 MiB moved, past any L2/L3) are held to the >= 70% of copy bandwidth target,
except where an op returns a new tensor of 32 MiB or more ("fresh": see common.FRESH_BYTES; the
page faults cost more than the op, ours and the reference alike); fused_add_rms_norm, in place,
shows the kernel at those sizes.
On a shared CPU machine, --threads 1 gives steadier figures (a busy second core stalls every
parallel region). Prints a table, then one JSON line.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the source tree, when not installed
from common import FRESH_BYTES, emit_json, machine, median_time, op_arguments, op_setup, print_table  # noqa: E402

from balcony_ext import ops  # noqa: E402
from balcony_ext.reference import reference_fused_add_rms_norm, reference_rms_norm, reference_rms_norm_backward  # noqa: E402

LARGE_BYTES = 32 << 20


def main():
    p = op_arguments(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[576, 2048, 4096])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 4096])
    args = p.parse_args()
    dev, dtype, copy_gbs = op_setup(args)
    es = torch.finfo(dtype).bits // 8
    eps = 1e-6
    has_f_rms = hasattr(F, "rms_norm")
    results = []

    def add(op, rows, hidden, nbytes, ours, ref, torch_fn=None, out_bytes=0):
        reps = 5 if nbytes > LARGE_BYTES else 20
        t = median_time(ours, reps=reps)
        t_ref = median_time(ref, reps=reps)
        t_torch = median_time(torch_fn, reps=reps) if torch_fn else float("nan")
        gbs = nbytes / t / 1e9
        fresh = dev == "cpu" and out_bytes >= FRESH_BYTES
        results.append(dict(op=op, rows=rows, hidden=hidden, us=t * 1e6, ref_us=t_ref * 1e6, torch_us=t_torch * 1e6,
                            gbs=gbs, frac_copy=gbs / copy_gbs, speedup=t_ref / t, vs_stock=t_torch / t,
                            large=nbytes > LARGE_BYTES and not fresh,
                            fresh=fresh))

    for hidden in args.hidden:
        w = torch.randn(hidden, device=dev, dtype=dtype)
        for rows in args.rows:
            x = torch.randn(rows, hidden, device=dev, dtype=dtype)
            r = torch.randn(rows, hidden, device=dev, dtype=dtype)
            n = rows * hidden * es
            add("rms_norm", rows, hidden, 2 * n + hidden * es, lambda: ops.rms_norm(x, w, eps),
                lambda: reference_rms_norm(x, w, eps), (lambda: F.rms_norm(x, (hidden,), w, eps)) if has_f_rms else None,
                out_bytes=n)
            xc, rc = x.clone(), r.clone()
            xs, rs = x.clone(), r.clone()
            add("fused_add_rms_norm", rows, hidden, 4 * n + hidden * es, lambda: ops.fused_add_rms_norm(xc, rc, w, eps),
                lambda: reference_fused_add_rms_norm(x, r, w, eps),
                (lambda: F.rms_norm(rs.add_(xs), (hidden,), w, eps)) if has_f_rms else None)
        rows = max(args.rows)  # training shape
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        g = torch.randn(rows, hidden, device=dev, dtype=dtype)
        stock = None
        if has_f_rms:  # autograd of F.rms_norm in the op's dtype: the gradients of x and of the weight
            xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            y = F.rms_norm(xg, (hidden,), wg, eps)
            stock = lambda: torch.autograd.grad(y, (xg, wg), g, retain_graph=True)  # noqa: E731
        add("rms_norm_backward", rows, hidden, 3 * rows * hidden * es + 2 * hidden * es,
            lambda: torch.ops.balcony.rms_norm_backward(g, x, w, eps), lambda: reference_rms_norm_backward(g, x, w, eps),
            stock, out_bytes=rows * hidden * es)

    print(f"# {machine()}, device {dev}, dtype {args.dtype}, copy bandwidth {copy_gbs:.1f} GB/s")
    print_table(results, [("op", "op", None), ("rows", "rows", "d"), ("hidden", "hidden", "d"), ("us", "ours us", ".1f"),
                          ("ref_us", "ref us", ".1f"), ("torch_us", "F.rms_norm us", ".1f"), ("gbs", "GB/s", ".1f"),
                          ("frac_copy", "of copy", ".0%"), ("speedup", "vs ref", ".2f"),
                          ("vs_stock", "vs F.rms_norm", ".2f"), ("large", "large", None),
                          ("fresh", "fresh", None)])
    large = [r for r in results if r["large"]]
    emit_json(dict(bench="rms_norm", device=dev, dtype=args.dtype, machine=machine(), copy_gbs=copy_gbs,
                   target_met_large=all(r["frac_copy"] >= 0.7 for r in large) if large else None,
                   min_frac_copy_large=min((r["frac_copy"] for r in large), default=None), results=results))


if __name__ == "__main__":
    main()

"""SiLU-and-multiply microbenchmark: torch.ops.balcony.silu_and_mul (forward) and silu_and_mul_backward
against PyTorch eager: the float32 reference function and its autograd-equivalent formula ("ref"), and
the same formulas in the op's own dtype, the best stock PyTorch path ("stock").

    python benchmarks/bench_silu_and_mul.py             # GPU if present, else CPU; bfloat16
    python benchmarks/bench_silu_and_mul.py --dtype float32 --device cpu

Bytes counted = what the op must read + write: forward 2I in + I out; backward I grad + 2I in + 2I out
per row. "Large" rows (> 32 MiB moved) are held to the >= 70% of copy bandwidth target, dst.copy_(src)
into an existing buffer, except where an op returns a new tensor of 32 MiB or more: glibc hands such
a buffer out as fresh pages on every call, and faulting them in (the kernel zeroes each page) costs
more than the op (ours and the reference alike: ~6-8 GB/s on the machine measured). Those rows are
marked "fresh" and left out of the target; silu_and_mul_out (a preallocated output) shows the kernel
at those sizes.
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
from balcony_ext.reference import reference_silu_and_mul  # noqa: E402

LARGE_BYTES = 32 << 20


def eager_silu_and_mul(x):
    """Stock PyTorch in the input's own dtype (what a model's MLP runs): silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def eager_backward(grad, x, dtype=torch.float32):
    """What autograd of the reference computes, written out in eager ops in `dtype` (float32: the
    reference's precision; the input's dtype: stock PyTorch's fastest path)."""
    gate, up = x.to(dtype).chunk(2, dim=-1)
    g = grad.to(dtype)
    s = torch.sigmoid(gate)
    return torch.cat([g * up * s * (1 + gate * (1 - s)), g * F.silu(gate)], dim=-1).to(x.dtype)


def main():
    p = op_arguments(__doc__.splitlines()[0])
    p.add_argument("--inter", type=int, nargs="+", default=[1536, 5632, 14336])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 4096])
    args = p.parse_args()
    dev, dtype, copy_gbs = op_setup(args)
    es = torch.finfo(dtype).bits // 8
    results = []

    def add(op, rows, inter, nbytes, ours, ref, stock, out_bytes=0):
        """ref: the float32 reference; stock: the best plain PyTorch path in the op's own dtype."""
        reps = 5 if nbytes > LARGE_BYTES else 20
        t, t_ref, t_stock = (median_time(f, reps=reps) for f in (ours, ref, stock))
        gbs = nbytes / t / 1e9
        fresh = dev == "cpu" and out_bytes >= FRESH_BYTES
        results.append(dict(op=op, rows=rows, inter=inter, us=t * 1e6, ref_us=t_ref * 1e6, stock_us=t_stock * 1e6,
                            gbs=gbs, frac_copy=gbs / copy_gbs, speedup=t_ref / t, vs_stock=t_stock / t,
                            large=nbytes > LARGE_BYTES and not fresh, fresh=fresh))

    for inter in args.inter:
        for rows in args.rows:
            x = torch.randn(rows, 2 * inter, device=dev, dtype=dtype)
            add("silu_and_mul", rows, inter, 3 * rows * inter * es, lambda: ops.silu_and_mul(x),
                lambda: reference_silu_and_mul(x), lambda: eager_silu_and_mul(x), out_bytes=rows * inter * es)
            out = torch.empty(rows, inter, device=dev, dtype=dtype)
            into = lambda: torch.mul(F.silu(x[:, :inter]), x[:, inter:], out=out)  # noqa: E731
            add("silu_and_mul_out", rows, inter, 3 * rows * inter * es, lambda: ops.silu_and_mul(x, out=out), into, into)
        rows = max(args.rows)  # training shape
        x = torch.randn(rows, 2 * inter, device=dev, dtype=dtype)
        g = torch.randn(rows, inter, device=dev, dtype=dtype)
        add("silu_and_mul_backward", rows, inter, 5 * rows * inter * es,
            lambda: torch.ops.balcony.silu_and_mul_backward(g, x), lambda: eager_backward(g, x),
            lambda: eager_backward(g, x, dtype), out_bytes=2 * rows * inter * es)

    print(f"# {machine()}, device {dev}, dtype {args.dtype}, copy bandwidth {copy_gbs:.1f} GB/s")
    print_table(results, [("op", "op", None), ("rows", "rows", "d"), ("inter", "I", "d"), ("us", "ours us", ".1f"),
                          ("ref_us", "ref us", ".1f"), ("stock_us", "stock us", ".1f"), ("gbs", "GB/s", ".1f"),
                          ("frac_copy", "of copy", ".0%"), ("speedup", "vs ref", ".2f"), ("vs_stock", "vs stock", ".2f"),
                          ("large", "large", None),
                          ("fresh", "fresh", None)])
    large = [r for r in results if r["large"]]
    emit_json(dict(bench="silu_and_mul", device=dev, dtype=args.dtype, machine=machine(), copy_gbs=copy_gbs,
                   target_met_large=all(r["frac_copy"] >= 0.7 for r in large) if large else None,
                   min_frac_copy_large=min((r["frac_copy"] for r in large), default=None), results=results))


if __name__ == "__main__":
    main()

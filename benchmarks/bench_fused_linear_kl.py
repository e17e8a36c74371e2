"""Fused linear + KL loss (ops.fused_linear_kl, forward + gradient) vs the naive full-logits
PyTorch loss with autograd backward, at N=4096 tokens x V=49,152 x H=576 (SmolLM2's LM head).

Run: .venv/bin/python benchmarks/bench_fused_linear_kl.py [--dtypes float32,bfloat16] [--reps 2]

Each variant runs in a fresh subprocess, so its peak memory is its own: "peak MB" is the growth of
the process's peak resident set (ru_maxrss) over its resident set once the inputs exist, i.e. the
extra memory the loss and its backward needed (measured after one 8-token call, so the BLAS and
autograd libraries' lazy initialisation is excluded). Time: median of --reps runs, no warm-up (each run
is seconds long: three 232-GFLOP GEMMs at this size, the same three in both variants).
Prints a table, then one JSON line.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from common import copy_bandwidth, emit_json, machine, median_time, print_table  # noqa: E402

N, V, H = 4096, 49152, 576


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant, dtype_name, reps):
    from balcony_ext import ops

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    teacher = (student.float() + 0.5 * torch.randn(N, H, generator=g)).to(dtype)

    def fused(student=student, teacher=teacher):
        s = student.detach().requires_grad_()
        loss = ops.fused_linear_kl(s, weight, teacher)
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad

    def naive(student=student, teacher=teacher):
        s = student.detach().requires_grad_()
        with torch.no_grad():
            t_logp = torch.log_softmax((teacher @ weight.t()).float(), -1)
        s_logp = torch.log_softmax((s @ weight.t()).float(), -1)
        loss = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad

    fn = fused if variant == "fused" else naive
    fn(student[:8], teacher[:8])  # libraries' lazy initialisation (BLAS, autograd) is not the loss's memory
    base = rss_mb()
    t = median_time(fn, warmup=0, reps=reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    loss, grad = fn()
    print(json.dumps(dict(time_s=t, peak_mb=peak - base, loss=float(loss), grad_norm=float(grad.float().norm()))))


def run_child(variant, dtype_name, reps):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, "--dtypes", dtype_name,
                          "--reps", str(reps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {dtype_name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtypes, args.reps)
        return
    bw = copy_bandwidth()
    rows = []
    for dtype_name in args.dtypes.split(","):
        res = {v: run_child(v, dtype_name, args.reps) for v in ("naive", "fused")}
        rows.append(dict(dtype=dtype_name, naive_s=res["naive"]["time_s"], fused_s=res["fused"]["time_s"],
                         speedup=res["naive"]["time_s"] / res["fused"]["time_s"],
                         naive_mb=res["naive"]["peak_mb"], fused_mb=res["fused"]["peak_mb"],
                         mem_ratio=res["naive"]["peak_mb"] / max(1.0, res["fused"]["peak_mb"]),
                         loss_diff=abs(res["naive"]["loss"] - res["fused"]["loss"]),
                         grad_norm_rel=abs(res["naive"]["grad_norm"] - res["fused"]["grad_norm"])
                         / res["naive"]["grad_norm"]))
    print(f"fused_linear_kl, N={N} V={V} H={H}, forward + grad; {machine()}; copy bandwidth {bw:.1f} GB/s")
    print_table(rows, [("dtype", "dtype", None), ("naive_s", "naive s", ".3f"), ("fused_s", "fused s", ".3f"),
                       ("speedup", "speedup", ".2f"), ("naive_mb", "naive peak MB", ".0f"),
                       ("fused_mb", "fused peak MB", ".0f"), ("mem_ratio", "mem ratio", ".1f"),
                       ("loss_diff", "|dloss|", ".2e"), ("grad_norm_rel", "grad norm rel", ".1e")])
    emit_json(dict(bench="fused_linear_kl", n=N, v=V, h=H, copy_gbps=bw, machine=machine(), results=rows))


if __name__ == "__main__":
    main()

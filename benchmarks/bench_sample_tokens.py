"""sample_tokens (ops.sample_tokens, sort-free) vs torch eager at V=49,152, batch 1/8/32:
greedy vs torch.argmax, and temperature + top-k 50 + top-p 0.9 vs the usual eager recipe
(softmax, sort, cumsum, mask, multinomial).

Run: .venv/bin/python benchmarks/bench_sample_tokens.py
Prints a table (median microseconds per call), then one JSON line.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from common import copy_bandwidth, emit_json, machine, median_time, print_table  # noqa: E402

from balcony_ext import ops  # noqa: E402

V = 49152


def eager_top_k_top_p(logits, temperature, top_k, top_p):
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    sorted_p[:, top_k:] = 0
    cum = torch.cumsum(sorted_p, -1)
    sorted_p[(cum - sorted_p) >= top_p * cum[:, -1:]] = 0
    choice = torch.multinomial(sorted_p, 1)
    return idx.gather(-1, choice).squeeze(-1)


def main():
    bw = copy_bandwidth()
    rows = []
    for batch in (1, 8, 32):
        logits = torch.randn(batch, V) * 3
        u = torch.rand(batch)
        cases = {
            "greedy": (lambda: ops.sample_tokens(logits, 0.0, uniform=u), lambda: torch.argmax(logits, -1)),
            "top-k 50 + top-p 0.9": (lambda: ops.sample_tokens(logits, 0.8, 50, 0.9, u),
                                     lambda: eager_top_k_top_p(logits, 0.8, 50, 0.9)),
            "top-p 0.9": (lambda: ops.sample_tokens(logits, 0.8, 0, 0.9, u),
                          lambda: eager_top_k_top_p(logits, 0.8, V, 0.9)),
        }
        for name, (ours, eager) in cases.items():
            t_ours = median_time(ours, warmup=3, reps=20)
            t_eager = median_time(eager, warmup=3, reps=20)
            rows.append(dict(batch=batch, mode=name, ours_us=t_ours * 1e6, eager_us=t_eager * 1e6,
                             speedup=t_eager / t_ours))
    print(f"sample_tokens, V={V}; {machine()}; copy bandwidth {bw:.1f} GB/s")
    print_table(rows, [("batch", "batch", None), ("mode", "mode", None), ("ours_us", "ours us", ".1f"),
                       ("eager_us", "eager us", ".1f"), ("speedup", "speedup", ".2f")])
    emit_json(dict(bench="sample_tokens", v=V, copy_gbps=bw, machine=machine(), results=rows))


if __name__ == "__main__":
    main()

"""Training throughput and peak memory of the exits on the default model: the fused KL loss
against a straightforward full-logits PyTorch implementation of the same loss, fp32 and bf16.

    PYTHONPATH=. python benchmarks/bench_train.py [--exits 8 15 22] [--batch 4] [--seq 512] [--steps 3] [--vocab 16384]
        [--bf16-only] [--teacher-per-exit] [--affine]

Each configuration runs in a fresh subprocess (so its peak memory is its own), trains a fresh copy
of the exits for --steps optimiser steps on the Shakespeare corpus and reports the median per-step
tokens/s (the first step is warm-up) and the growth of the process's peak resident set (ru_maxrss)
during training over its resident set once model and data are loaded. --vocab N adds a row: the fused
KL in bf16 over the shipped shortlist's first N tokens only (train(vocab=N)). --teacher-per-exit adds,
for each bf16 fused row, the same with the teacher's logits computed inside every exit's loss (as
before they were shared by the exits); --affine trains the learned affine exits beside the exits (as
scripts/train_default_exits.py does); --bf16-only leaves out the fp32 rows.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_json, machine, print_table  # noqa: E402

CONFIGS = [("fused", False), ("reference", False), ("fused", True), ("reference", True)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args):
    import torch

    import balcony_ext as bx
    from balcony_ext.data import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.teacher_per_exit:
        sys.modules["balcony_ext.train"].SHARED_LOGITS_MAX = 0
    model = bx.load(exits=None)
    corpus = prepare("shakespeare", model.tokenizer)
    bx.attach(model, args.exits, seed=0)
    base = rss_mb()
    tokens = args.steps * args.batch * args.seq
    out = bx.train(model, data=corpus, tokens=tokens, batch_size=args.batch, seq_len=args.seq, bf16=args.bf16,
                   loss_impl=args.loss, progress=False, vocab=args.vocab or None, affine_baseline=args.affine)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = out["history"][1:] or out["history"]
    tps = statistics.median(args.batch * args.seq / h["step_s"] for h in timed)
    print(json.dumps(dict(tokens_per_s=tps, peak_mb=peak - base)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits", type=int, nargs="+", default=[8, 15, 22])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=0, help="also the fused bf16 KL over the shortlist's first N tokens")
    ap.add_argument("--bf16-only", action="store_true", help="leave out the fp32 rows")
    ap.add_argument("--teacher-per-exit", action="store_true",
                    help="also each bf16 fused row with the teacher's logits computed inside every exit's loss")
    ap.add_argument("--affine", action="store_true", help="train the learned affine exits beside the exits")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="fused", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    configs = [(loss, bf16, 0, False) for loss, bf16 in CONFIGS if bf16 or not args.bf16_only]
    configs += [("fused", True, args.vocab, False)] if args.vocab else []
    configs += [(loss, bf16, vocab, True) for loss, bf16, vocab, _ in configs
                if args.teacher_per_exit and bf16 and loss == "fused"]
    for loss, bf16, vocab, per_exit in configs:
        cmd = [sys.executable, __file__, "--child", "--loss", loss, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--threads", str(args.threads), "--vocab", str(vocab),
               "--exits", *map(str, args.exits)]
        cmd += (["--bf16"] if bf16 else []) + (["--teacher-per-exit"] if per_exit else [])
        cmd += ["--affine"] if args.affine else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        name = "fused KL" if loss == "fused" else "full logits"
        name = f"{name}, {vocab:,}-token shortlist" if vocab else name
        rows.append(dict(loss=name + (", teacher logits per exit" if per_exit else ""),
                         precision="bf16 autocast" if bf16 else "fp32", vocab=vocab, teacher_per_exit=per_exit, **r))
    for r in rows:
        ref = next(x for x in rows if x["precision"] == r["precision"] and x["loss"] == "full logits")
        r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["memory_ratio"] = ref["peak_mb"] / max(r["peak_mb"], 1e-9)
    print(f"# training throughput, smollm2-135m-instruct, exits {args.exits}"
          f"{' and affine exits' if args.affine else ''}, batch {args.batch} x {args.seq}, "
          f"{machine()}")
    print_table(rows, [("precision", "precision", ""), ("loss", "loss", ""), ("tokens_per_s", "tokens/s", ".1f"),
                       ("speedup", "x full-logits", ".2f"), ("peak_mb", "peak MB", ".0f"),
                       ("memory_ratio", "x less memory", ".2f")])
    emit_json(dict(bench="train", exits=args.exits, affine=args.affine, batch=args.batch, seq_len=args.seq, rows=rows,
                   machine=machine()))


if __name__ == "__main__":
    main()

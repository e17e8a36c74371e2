"""Training throughput of the exits (tokens/s) on the default model, fp32 and bf16 autocast.

    python benchmarks/bench_train.py [--exits 8 15 22] [--batch 2] [--seq 512] [--steps 3]

Each configuration trains a fresh copy of the exits for --steps optimiser steps on the
Shakespeare corpus and reports the median per-step tokens/s (the first step is warm-up)."""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import balcony_ext as bx  # noqa: E402
from balcony_ext.data import prepare  # noqa: E402
from common import emit_json, machine, print_table  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits", type=int, nargs="+", default=[8, 15, 22])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = bx.load(exits=None)
    corpus = prepare("shakespeare", model.tokenizer)
    rows = []
    for bf16 in (False, True):
        bx.attach(model, args.exits, replace=True, seed=0)
        tokens = args.steps * args.batch * args.seq
        out = bx.train(model, data=corpus, tokens=tokens, batch_size=args.batch, seq_len=args.seq, bf16=bf16,
                       progress=False)
        timed = out["history"][1:] or out["history"]  # the first step is warm-up
        tps = statistics.median(tokens / args.steps / h["step_s"] for h in timed)
        rows.append(dict(precision="bf16 autocast" if bf16 else "fp32", exits=" ".join(map(str, args.exits)),
                         tokens_per_s=tps))
    print(f"# training throughput, {model.name}, batch {args.batch} x {args.seq}, {machine()}")
    print_table(rows, [("precision", "precision", ""), ("exits", "exits", ""), ("tokens_per_s", "tokens/s", ".1f")])
    emit_json(dict(bench="train", model=model.name, batch=args.batch, seq_len=args.seq, rows=rows, machine=machine()))


if __name__ == "__main__":
    main()

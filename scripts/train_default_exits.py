"""Trains, evaluates and packages the exits shipped with balcony_ext for SmolLM2-135M-Instruct.

    .venv/bin/python scripts/train_default_exits.py [--tokens 1000000] [--run-dir DIR]

Exits at depths 8, 15 and 22 of the 30 layers (27%, 50% and 73% of the depth, so that budgets
across the range each buy a distinct exit; 15 is the half-depth exit), initialised from the
last decoder layer with the final norm, trained by self-distillation on the Shakespeare corpus
(two plays held out by document), bf16 autocast, lr 5e-4 cosine with 1% warm-up, 4 x 512-token
batches. The learned affine exit (tuned lens) trains beside them on the very same batches.

The run checkpoints every few steps into --run-dir; run the same command again after an
interruption and it resumes where it stopped. When training is complete it evaluates every exit
and the baselines on the held-out plays and writes
  balcony_ext/exits/smollm2-135m-instruct.safetensors  (bf16, the exits `bx.load()` attaches)
  balcony_ext/exits/smollm2-135m-instruct.eval.json (the held-out report `balcony demo` shows)
  docs/results/default_exits.json, docs/results/default_exits.png
"""

import argparse
import json
import os
from pathlib import Path

import torch

import balcony_ext as bx
from balcony_ext.data import prepare
from balcony_ext.loading import bundled_exits_path

ROOT = Path(__file__).resolve().parent.parent
EXITS = [8, 15, 22]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--run-dir", default=os.path.join(os.environ.get("BALCONY_CACHE", Path.home() / ".cache" / "balcony_ext"),
                                                      "runs", "default-exits"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32_768, help="held-out tokens to evaluate on (0: all)")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--out", default=str(bundled_exits_path()), help="where to write the packaged exits")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results" / "default_exits"))
    args = ap.parse_args()

    model = bx.load(exits=None)
    bx.attach(model, EXITS, init="last", norm_init="final")
    corpus = prepare("shakespeare", model.tokenizer)
    run = bx.train(model, data=corpus, tokens=args.tokens, batch_size=args.batch, seq_len=args.seq, bf16=True,
                   lr=5e-4, warmup=0.01, checkpoint_dir=args.run_dir, checkpoint_every=args.checkpoint_every,
                   affine_baseline=True)
    hist = run["history"]
    seconds = sum(h["step_s"] for h in hist)
    print(f"trained {model.tokens_trained:,} tokens in {seconds / 3600:.2f} h of steps "
          f"({model.tokens_trained / max(seconds, 1e-9):.0f} tokens/s)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bx.save_exits(model, out, dtype=torch.bfloat16,
                  extra=dict(corpus=corpus.describe(), recipe="bf16 autocast, lr 5e-4 cosine, 1% warm-up, "
                             f"{args.batch}x{args.seq} tokens per step, init last, norm final"))
    # evaluate what users get: the exits as shipped (bf16 on disk, loaded into the fp32 model)
    bx.load_exits(model, out)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    report = bx.evaluate(model, data=corpus, seq_len=args.seq, max_tokens=args.eval_tokens or None, affine=run["affine"],
                         json_path=results.with_suffix(".json"), plot_path=results.with_suffix(".png"))
    report.info["training"] = dict(tokens=model.tokens_trained, step_seconds=seconds, batch=args.batch, seq_len=args.seq,
                                   final_loss_per_exit=hist[-1]["loss_per_exit"] if hist else None)
    report.to_json(results.with_suffix(".json"))
    report.to_json(out.with_suffix(".eval.json"))
    print(report)
    print(json.dumps(dict(exits=str(out), results=str(results.with_suffix(".json")))))


if __name__ == "__main__":
    main()

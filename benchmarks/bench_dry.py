"""DRY against loops: what each decoding does to the answers every budget buys.

    PYTHONPATH=. python benchmarks/bench_dry.py [--prompts 64] [--budgets 1 0.9 0.8 0.7 0.6 0.5]
        [--decodings greedy fp0.3 dry0.8 dry0.8+fp0.3] [--max-new-tokens 128]

On held-out chat instructions (never trained: chat_eval.heldout_instructions) the full model answers
greedily (the reference); then, per budget (its plan as generate() makes it by default: an opening
at the full depth where it fits, a shortlisted head where the budget buys one) and per decoding
(greedy; fpX: frequency_penalty X; dryX: DRY with dry_multiplier X, llama.cpp's base 1.75 and allowed
length 2; joined with '+'), the answers in batches of 16 and:
  rep4    the share of each answer's 4-grams that already occurred in it (the full model's own greedy
          answers give the yardstick)
  F1      token F1 with the full model's greedy answer (how close the answer stays to the full model's
          greedy one; a penalty changes the full model's answer too)
  F1 same token F1 with the full model's answer under the same decoding (budget 1 with it): how close
          the budget's answer stays to what the full model writes with that decoding
  time    the decoding's wall time relative to greedy's at the same budget (the penalties' overhead;
          both measured in this run, one after the other)
Table, then a JSON line.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import balcony_ext as bx  # noqa: E402
from balcony_ext.chat_eval import _strip_stop, heldout_instructions, repeated_ngram_share, token_f1  # noqa: E402
from balcony_ext.generate import stop_token_ids  # noqa: E402
from common import emit_json, machine, print_table  # noqa: E402

KEYS = {"fp": "frequency_penalty", "dry": "dry_multiplier", "pp": "presence_penalty"}


def decoding(spec: str) -> dict:
    """'greedy' -> {}; 'dry0.8+fp0.3' -> {'dry_multiplier': 0.8, 'frequency_penalty': 0.3}."""
    if spec == "greedy":
        return {}
    out = {}
    for part in spec.split("+"):
        key = next((k for k in KEYS if part.startswith(k)), None)
        if key is None:
            raise SystemExit(f"a decoding is 'greedy' or parts like fp0.3, dry0.8, pp0.5 joined with '+', got {spec!r}")
        out[KEYS[key]] = float(part[len(key):])
    return out


def answers(model, texts, budget, args, stop, **kw):
    out, t0 = [], time.perf_counter()
    for i in range(0, len(texts), 16):
        out += bx.generate(model, texts[i:i + 16], budget=budget, max_new_tokens=args.max_new_tokens, **kw)
    seconds = time.perf_counter() - t0
    return [_strip_stop(o.tokens, stop) for o in out], out, seconds


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--decodings", nargs="+", default=["greedy", "fp0.3", "dry0.8", "dry0.8+fp0.3"])
    args = ap.parse_args()
    decodings = {d: decoding(d) for d in args.decodings}

    model = bx.load()
    texts = heldout_instructions(args.prompts)
    stop = stop_token_ids(model)
    ref, _, _ = answers(model, texts, 1.0, args, stop)  # (the greedy reference)
    rows, full = [], {}  # full: the full model's answers under each decoding
    for b in sorted(set(args.budgets) | {1.0}, reverse=True):
        base_s = None
        for name, kw in decodings.items():
            got, outs, seconds = answers(model, texts, b, args, stop, **kw)
            full.setdefault(name, got)
            base_s = seconds if base_s is None else base_s
            o = outs[0]
            rows.append(dict(budget=b, decoding=name, opening=mean(x.full_start for x in outs),
                             route=f"{max(o.exit_layers)}" if b == 1 else route_name(model, o),
                             rep4=mean(map(repeated_ngram_share, got)), f1=mean(token_f1(g, r) for g, r in zip(got, ref)),
                             f1_same=mean(token_f1(g, r) for g, r in zip(got, full[name])),
                             tokens=mean(map(len, got)), seconds=seconds, time=seconds / base_s))
            print(f"budget {b:g} {name}: rep4 {rows[-1]['rep4']:.3f} F1 {rows[-1]['f1']:.3f} "
                  f"F1 same {rows[-1]['f1_same']:.3f}", file=sys.stderr)
    print(f"{model.name}, exits {model.exits} (trained on {model.tokens_trained:,} tokens); {args.prompts} held-out "
          f"chat prompts, up to {args.max_new_tokens} new tokens, batch 16; {machine()}, CPU kernels "
          f"{bx.cpu_capability()}; the full model's greedy answers: rep4 {mean(map(repeated_ngram_share, ref)):.3f}")
    print_table(rows, [("budget", "budget", ".2f"), ("route", "route", "s"), ("opening", "opening", ".0f"),
                       ("decoding", "decoding", "s"), ("rep4", "rep4", ".3f"), ("f1", "F1", ".3f"),
                       ("f1_same", "F1 same", ".3f"), ("tokens", "tokens", ".0f"), ("time", "time", ".2f")])
    emit_json(dict(bench="dry", machine=machine(), cpu_kernels=bx.cpu_capability(), prompts=args.prompts,
                   max_new_tokens=args.max_new_tokens, tokens_trained=model.tokens_trained,
                   full_answer_rep4=mean(map(repeated_ngram_share, ref)), rows=rows, when=time.strftime("%Y-%m-%d")))


def route_name(model, out) -> str:
    """'exit k, n-token head' of the route after the opening (the deepest exit below the full depth)."""
    after = list(zip(out.exit_layers, out.heads))[out.full_start:]
    k, head = next(((k, h) for k, h in after if k != model.num_layers), (model.num_layers, after[0][1] if after else 0))
    return f"{k}" + (f" {head // 1024}k" if head else "")


if __name__ == "__main__":
    main()

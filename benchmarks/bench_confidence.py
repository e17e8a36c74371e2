"""Confidence-based early exit: answers and speed per (exit, confidence), beside the plain exits.

    PYTHONPATH=. python benchmarks/bench_confidence.py [--prompts 64] [--exits 15 19 23 26]
        [--confidence 0 0.3 0.5] [--speed-prompts 4] [--speed-tokens 64]

With `confidence=c`, generate() takes each token at the exit when the exit gives its most likely
token a probability of at least c, and otherwise again at the full depth. On held-out chat
instructions (never trained: chat_eval.heldout_instructions), the full model answers greedily; then
each (exit, confidence) answers the same prompts greedily (batch 16), and the table gives:
  at exit      the share of answer tokens taken at the exit (the rest were taken at the full depth)
  cost         parameters read per token relative to the full model's: the exit's share at the
               exit's cost, the rest at that cost plus the layers past the exit and the full head
  rep4, F1     repeated 4-grams in the answer (loops) and its token F1 with the full model's answer
  speed-up     decode tokens/s at batch 1 over the full model's, on the first --speed-prompts
               prompts (--speed-tokens tokens each, the full model timed alternately in each round)
Table, then a JSON line.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import balcony_ext as bx  # noqa: E402
from balcony_ext.budgets import costs, head_cost  # noqa: E402
from balcony_ext.chat_eval import _strip_stop, heldout_instructions, repeated_ngram_share, token_f1  # noqa: E402
from balcony_ext.generate import stop_token_ids  # noqa: E402
from common import batched_answers, emit_json, machine, print_table  # noqa: E402


def answers(model, texts, exit_layer, confidence, max_new_tokens, shortlist):
    head = shortlist if exit_layer != model.num_layers else False  # (the full depth reads the full head)
    return batched_answers(model, texts, exit_layer, head, confidence=confidence, max_new_tokens=max_new_tokens)


def decode_seconds(model, texts, exit_layer, confidence, tokens, shortlist):
    """Decode seconds (the first token excluded) and tokens, summed over the prompts at batch 1."""
    seconds, n = 0.0, 0
    for t in texts:
        out = bx.generate(model, t, exit_layer=exit_layer, confidence=confidence, max_new_tokens=tokens,
                          calibration=None, shortlist=shortlist if exit_layer != model.num_layers else False)
        steps = len(out.tokens) - 1
        if steps > 0:
            seconds += steps / out.tokens_per_second
            n += steps
    return seconds, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits-file", default="bundled")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--exits", type=int, nargs="+", default=None, help="default: every attached exit")
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--speed-prompts", type=int, default=4)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shortlist", type=int, default=0,
                    help="the exits read the first N tokens of the model's shortlist as their head (0: the full "
                         "head); a token taken again at the full depth reads the full head")
    args = ap.parse_args()

    model = bx.load(exits=args.exits_file)
    L = model.num_layers
    exits = args.exits or model.exits
    texts = heldout_instructions(args.prompts)
    stop = stop_token_ids(model)
    c = costs(model)
    full_cost = c["full"]
    base = {k: sum(p.numel() for layer in model.adapter.layers[:k] for p in layer.parameters()) for k in exits}

    ref = [_strip_stop(o.tokens, stop) for o in answers(model, texts, L, 0.0, args.max_new_tokens, False)]
    configs = [(L, 0.0)] + [(k, conf) for k in exits for conf in args.confidence]
    rows = []
    for k, conf in configs:
        outs = answers(model, texts, k, conf, args.max_new_tokens, args.shortlist) if k != L else None
        got = ref if outs is None else [_strip_stop(o.tokens, stop) for o in outs]
        if outs is None:
            share, cost = 0.0, 1.0
        else:
            layers = [x for o in outs for x in o.exit_layers]
            share = sum(x == k for x in layers) / len(layers)
            exit_cost = c[("balcony", k)] / full_cost
            exit_cost *= head_cost(model, k, args.shortlist, c) if args.shortlist else 1.0
            cost = exit_cost + (1 - share) * (full_cost - base[k]) / full_cost
        rows.append(dict(exit=k, confidence=conf, at_exit=share, cost=cost,
                         rep4=sum(map(repeated_ngram_share, got)) / len(got),
                         f1=sum(token_f1(g, r) for g, r in zip(got, ref)) / len(got), speedup=None))

    # speed at batch 1: every configuration against the full model, alternating, summed over rounds
    speed = texts[:args.speed_prompts]
    decode_seconds(model, speed[:1], L, 0.0, 8, False)  # warm-up
    totals = {(r["exit"], r["confidence"]): [0.0, 0] for r in rows}
    full_total = [0.0, 0]
    for _ in range(args.rounds):
        for key in totals:
            if key[0] == L:
                continue
            s, n = decode_seconds(model, speed, L, 0.0, args.speed_tokens, False)
            full_total[0] += s
            full_total[1] += n
            s, n = decode_seconds(model, speed, *key, args.speed_tokens, args.shortlist)
            totals[key][0] += s
            totals[key][1] += n
    full_tps = full_total[1] / full_total[0]
    for r in rows:
        s, n = totals[(r["exit"], r["confidence"])]
        r["speedup"] = 1.0 if r["exit"] == L else (n / s) / full_tps if s else None

    print(f"{model.name}, exits {model.exits}; {args.prompts} held-out chat prompts, greedy, "
          f"{args.max_new_tokens} new tokens; exits' head: "
          f"{f'the first {args.shortlist:,} shortlisted tokens' if args.shortlist else 'full'}; speed: {len(speed)} prompts x {args.speed_tokens} tokens at batch 1, "
          f"{args.rounds} rounds; {machine()}, CPU kernels {bx.cpu_capability()}")
    print_table(rows, [("exit", "exit", "d"), ("confidence", "confidence", "g"), ("at_exit", "at exit", ".3f"),
                       ("cost", "cost", ".3f"), ("rep4", "rep4", ".3f"), ("f1", "F1", ".3f"),
                       ("speedup", "speed-up", ".2f")])
    emit_json(dict(bench="confidence", machine=machine(), cpu_kernels=bx.cpu_capability(), prompts=args.prompts, shortlist=args.shortlist, max_new_tokens=args.max_new_tokens,
                   full_tokens_per_s=full_tps, rows=rows, when=time.strftime("%Y-%m-%d")))


if __name__ == "__main__":
    main()

"""Full start: how an exit continues an answer whose opening the full model wrote.

    PYTHONPATH=. python benchmarks/bench_full_start.py [--prompts 64] [--exits 15 19 23 26]
        [--full-start 0 8 16 32] [--max-new-tokens 128] [--frequency-penalty 0] [--shortlist N]

With `full_start=K`, generate() takes the first K answer tokens at the full depth with the full head
and the rest at the exit. On held-out chat instructions (never trained: chat_eval.heldout_instructions)
the full model answers greedily; then each (exit, K) answers the same prompts greedily (batch 16), and
the table gives:
  cost        parameters read per token relative to the full model's, over these answers (the opening
              at 1, the rest at the exit's cost: its layers and its head, full or --shortlist N tokens)
  rep4, F1    repeated 4-grams in the whole answer and its token F1 with the full model's answer (the
              opening is the full model's own, so F1 rises with K by itself)
  F1 after K  the token F1 of the answer's tokens past the K-th with the full model's tokens past the
              K-th: how well the exit continues
  control     the same for the exit's own answer (K = 0): how well it does over those positions when
              it wrote the opening itself
With --budgets b.. the budgets spend an opening (budgets.plan_opening: the longest opening up to
--longest K tokens after which a route fits the budget over --max-new-tokens, then the deepest route
that fits the rest; K 0 is the plain per-token route): for each budget and K the plan, its cost over
the answers, rep4, F1 and F1 after the opening.
Table, then a JSON line.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import balcony_ext as bx  # noqa: E402
from balcony_ext.budgets import costs, head_cost, plan_opening, route_costs  # noqa: E402
from balcony_ext.chat_eval import _strip_stop, heldout_instructions, repeated_ngram_share, token_f1  # noqa: E402
from balcony_ext.generate import stop_token_ids  # noqa: E402
from common import batched_answers, emit_json, machine, print_table  # noqa: E402


def answers(model, texts, exit_layer, full_start, args, stop, head=None):
    """Answer tokens (the stop token cut); head: the route's head (default: --shortlist at an exit, the full
    head at the full depth)."""
    if head is None:
        head = args.shortlist if exit_layer != model.num_layers else False
    out = batched_answers(model, texts, exit_layer, head, full_start=full_start, max_new_tokens=args.max_new_tokens,
                          frequency_penalty=args.frequency_penalty)
    return [_strip_stop(o.tokens, stop) for o in out]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def budget_rows(model, texts, ref, args, stop) -> list:
    """A row per (budget, longest opening): the plan plan_opening makes, and how its answers fare."""
    route_cost = route_costs(model)
    rows, done = [], {}
    for b in args.budgets:
        for longest in sorted(set(args.longest) | {0}):
            K, (k, head), _ = plan_opening(model, b, args.max_new_tokens, shortlist=None, longest=longest)
            if (K, k, head) not in done:  # (a longer cap often makes the same plan)
                done[(K, k, head)] = answers(model, texts, k, K, args, stop, head=head)
            got = done[(K, k, head)]
            n = sum(map(len, got))
            opening = sum(min(K, len(g)) for g in got)
            rows.append(dict(budget=b, longest=longest, full_start=K, exit=k, head=head,
                             cost=(opening + (n - opening) * route_cost[(k, head)]) / n,
                             rep4=mean(map(repeated_ngram_share, got)),
                             f1=mean(token_f1(g, r) for g, r in zip(got, ref)),
                             f1_after=mean(token_f1(g[K:], r[K:]) for g, r in zip(got, ref)),
                             rep4_after=mean(repeated_ngram_share(g[K:]) for g in got), length=n / len(got)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits-file", default="bundled")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--exits", type=int, nargs="+", default=None, help="default: every attached exit")
    ap.add_argument("--full-start", type=int, nargs="+", default=[0, 8, 16, 32])
    ap.add_argument("--frequency-penalty", type=float, default=0.0)
    ap.add_argument("--shortlist", type=int, default=0,
                    help="the exits read the first N tokens of the model's shortlist as their head (0: the full head); "
                         "the opening reads the full head")
    ap.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="measure the plans these budgets make (with --longest) instead of exits after openings")
    ap.add_argument("--longest", type=int, nargs="+", default=[16, 32, 64],
                    help="with --budgets: the longest openings a budget may spend (0: the per-token route)")
    args = ap.parse_args()
    starts = sorted(set(args.full_start) | {0})

    model = bx.load(exits=args.exits_file)
    L = model.num_layers
    texts = heldout_instructions(args.prompts)
    stop = stop_token_ids(model)
    c = costs(model)
    ref = answers(model, texts, L, 0, args, stop)
    if args.budgets:
        rows = budget_rows(model, texts, ref, args, stop)
        print(f"{model.name}, exits {model.exits}; {args.prompts} held-out chat prompts, greedy, "
              f"{args.max_new_tokens} new tokens, budgets spending an opening; {machine()}, "
              f"CPU kernels {bx.cpu_capability()}")
        print_table(rows, [("budget", "budget", ".2f"), ("longest", "longest", "d"), ("full_start", "opening", "d"),
                           ("exit", "exit", "d"), ("head", "head", "d"), ("cost", "cost", ".3f"),
                           ("rep4", "rep4", ".3f"), ("f1", "F1", ".3f"), ("f1_after", "F1 after", ".3f"),
                           ("rep4_after", "rep4 after", ".3f"), ("length", "tokens", ".0f")])
        emit_json(dict(bench="full_start_budgets", machine=machine(), cpu_kernels=bx.cpu_capability(),
                       prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                       frequency_penalty=args.frequency_penalty, full_answer_rep4=mean(map(repeated_ngram_share, ref)),
                       rows=rows, when=time.strftime("%Y-%m-%d")))
        return
    rows = []
    for k in args.exits or model.exits:
        exit_cost = c[("balcony", k)] / c["full"]
        exit_cost *= head_cost(model, k, args.shortlist, c) if args.shortlist else 1.0
        own = None
        for K in starts:
            got = answers(model, texts, k, K, args, stop)
            own = got if K == 0 else own
            n = sum(map(len, got))
            opening = sum(min(K, len(g)) for g in got)
            rows.append(dict(exit=k, full_start=K, cost=(opening + (n - opening) * exit_cost) / n,
                             rep4=mean(map(repeated_ngram_share, got)),
                             f1=mean(token_f1(g, r) for g, r in zip(got, ref)),
                             f1_after=mean(token_f1(g[K:], r[K:]) for g, r in zip(got, ref)),
                             control=mean(token_f1(g[K:], r[K:]) for g, r in zip(own, ref)),
                             length=n / len(got)))

    print(f"{model.name}, exits {model.exits}; {args.prompts} held-out chat prompts, greedy"
          + (f" with frequency_penalty {args.frequency_penalty:g}" if args.frequency_penalty else "")
          + f", {args.max_new_tokens} new tokens; the exits' head: "
          + (f"the first {args.shortlist:,} shortlisted tokens" if args.shortlist else "full")
          + f"; {machine()}, CPU kernels {bx.cpu_capability()}")
    print_table(rows, [("exit", "exit", "d"), ("full_start", "full start", "d"), ("cost", "cost", ".3f"),
                       ("rep4", "rep4", ".3f"), ("f1", "F1", ".3f"), ("f1_after", "F1 after K", ".3f"),
                       ("control", "control", ".3f"), ("length", "tokens", ".0f")])
    emit_json(dict(bench="full_start", machine=machine(), cpu_kernels=bx.cpu_capability(), prompts=args.prompts,
                   max_new_tokens=args.max_new_tokens, frequency_penalty=args.frequency_penalty, shortlist=args.shortlist,
                   full_answer_rep4=mean(map(repeated_ngram_share, ref)), rows=rows, when=time.strftime("%Y-%m-%d")))


if __name__ == "__main__":
    main()

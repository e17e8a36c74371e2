"""Serving under load: continuous batching of mixed budgets, with and without the load controller.

    PYTHONPATH=. python benchmarks/bench_serve.py [--rates 0.5 1 2 4] [--requests 24] [--max-tokens 32]

Requests arrive as a Poisson process at each rate (requests/s), each asking for a budget drawn from
--budgets and allowing the controller down to --min-budget; prompts are held-out instructions in the
chat template. Every request runs through the same Batcher the server uses (in process: no HTTP).
For each rate, without the controller, with it, and with it and its admission control (the target:
--slo-ms, default 1.25x the full model's step time at batch 1, measured first): throughput (generated tokens/s over the run), time
to first token and inter-token latency p50 / p99, and the share of decode steps over the target.
First, the batching gain: aggregate decode tokens/s with 1, 4 and 8 sequences at full depth.
Table, then a JSON line.
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import balcony_ext as bx  # noqa: E402
from balcony_ext.batcher import Batcher, Request  # noqa: E402
from balcony_ext.generate import encode_prompt  # noqa: E402
from balcony_ext.instructions import build_instructions  # noqa: E402
from common import emit_json, machine, print_table  # noqa: E402


def batching_gain(model, prompt_ids, tokens):
    """Aggregate decode tokens/s at full depth with 1, 4 and 8 running sequences (steps only)."""
    out = {}
    for n in (1, 4, 8, 1):  # 1 again at the end: the machine's drift shows in the two figures
        b = Batcher(model, max_batch=n, max_len=len(prompt_ids) + tokens + 1, calibration=None)
        reqs = [b.submit(Request(prompt_ids, max_new_tokens=tokens, stop_tokens=[], budget=1.0)) for _ in range(n)]
        b.iterate()  # prefills (one chunk each) and the first step
        while any(len(r.tokens) < 2 for r in reqs):
            b.iterate()
        t0, steps = time.perf_counter(), 0
        while b.busy:
            b.iterate()
            steps += 1
        out.setdefault(n, []).append(n * steps / (time.perf_counter() - t0))
    return {n: max(v) for n, v in out.items()}


def run_load(model, prompts, rate, n_requests, budgets, min_budget, max_tokens, slo_ms, controller, seed):
    rng = random.Random(seed)
    b = Batcher(model, max_batch=8, max_len=512, slo_ms_per_token=slo_ms if controller != "off" else None,
                calibration=None, admission_control=controller == "on+admission")
    steps_over, steps = [0], [0]
    observe = b._observe

    def counting(seconds):
        steps[0] += 1
        steps_over[0] += seconds * 1000 > slo_ms
        observe(seconds)

    b._observe = counting
    times = {}

    def on_piece(req, piece, token):
        times.setdefault(req.id, []).append(time.perf_counter())

    b.start()
    reqs = []
    t0 = time.perf_counter()
    at = 0.0
    for i in range(n_requests):
        at += rng.expovariate(rate)
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        # (full_start=0: every token at the route its budget buys, so that the controller alone moves the exits)
        reqs.append(b.submit(Request(prompts[i % len(prompts)], max_new_tokens=max_tokens, budget=rng.choice(budgets),
                                     min_budget=min_budget, stop_tokens=[], on_piece=on_piece, full_start=0)))
    for r in reqs:
        r.wait()
    span = time.perf_counter() - t0
    b.stop()
    ttft = [times[r.id][0] - r.t_submit for r in reqs]
    itl = [d for r in reqs for d in np.diff(times[r.id])]
    tokens = sum(len(r.tokens) for r in reqs)
    exits = {}
    for r in reqs:
        for k in r.exit_layers:
            exits[k] = exits.get(k, 0) + 1
    return dict(rate=rate, controller=controller, tokens_per_s=tokens / span,
                ttft_p50_ms=1000 * np.percentile(ttft, 50), ttft_p99_ms=1000 * np.percentile(ttft, 99),
                itl_p50_ms=1000 * np.percentile(itl, 50), itl_p99_ms=1000 * np.percentile(itl, 99),
                steps_over_slo=steps_over[0] / max(steps[0], 1), moves_down=b.moves["down"],
                mean_exit=sum(k * n for k, n in exits.items()) / max(tokens, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    ap.add_argument("--min-budget", type=float, default=0.6)
    ap.add_argument("--slo-ms", type=float, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = bx.load(dtype=getattr(torch, args.dtype))
    questions = build_instructions(200, seed=1)[-args.requests:]
    prompts = [encode_prompt(model.tokenizer, q.text) for q in questions]
    gain = batching_gain(model, prompts[0], tokens=24)
    single_ms = 1000 / gain[1]
    slo = args.slo_ms or 1.25 * single_ms
    print(f"{model.name}, exits {model.exits}, {args.dtype}; {machine()}, CPU kernels {bx.cpu_capability()}")
    print(f"batching: aggregate decode tokens/s at full depth: 1 seq {gain[1]:.1f}, 4 seqs {gain[4]:.1f} "
          f"({gain[4] / gain[1]:.2f}x), 8 seqs {gain[8]:.1f} ({gain[8] / gain[1]:.2f}x)")
    print(f"latency target: {slo:.1f} ms per step (full model alone: {single_ms:.1f} ms)\n")
    rows = []
    for rate in args.rates:
        for controller in ("off", "on", "on+admission"):
            rows.append(run_load(model, prompts, rate, args.requests, args.budgets, args.min_budget, args.max_tokens,
                                 slo, controller, args.seed))
    print_table(rows, [("rate", "req/s", "g"), ("controller", "controller", ""), ("tokens_per_s", "tok/s", ".1f"),
                       ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
                       ("itl_p50_ms", "ITL p50 ms", ".1f"), ("itl_p99_ms", "ITL p99 ms", ".1f"),
                       ("steps_over_slo", "steps > target", ".0%"), ("mean_exit", "mean exit", ".1f")])
    emit_json(dict(benchmark="serve", machine=machine(), cpu=bx.cpu_capability(), dtype=args.dtype, slo_ms=slo,
                   batching_tokens_per_s={str(k): v for k, v in gain.items()},
                   batching_gain_8=gain[8] / gain[1], rows=rows))


if __name__ == "__main__":
    main()

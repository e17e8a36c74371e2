"""The `balcony` command line.

    balcony info                                   build and machine: CUDA kernels, CPU instruction set
    balcony train --exits 8 15 22 --data shakespeare --tokens 1000000 --out exits.safetensors
    balcony eval  --exits-file exits.safetensors --data shakespeare --json eval.json --plot eval.png
    balcony generate --budget 0.5 "Why is the sky blue?"
    balcony calibrate                              measure each exit's ms/token on this machine
    balcony bench                                  decode tokens/s per exit beside Hugging Face
    balcony demo                                   one prompt at several budgets, with the shipped exits
    balcony serve --port 8000                      an OpenAI-compatible server, a budget per request

--model is a local Hugging Face checkpoint directory; without it the bundled default
(SmolLM2-135M-Instruct) is used.
"""

import argparse
import math
import sys

import torch


def _load(args, exits="bundled"):
    from .loading import load

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    shortlist = getattr(args, "shortlist", "bundled")
    return load(args.model, dtype=dtype, exits=exits, weights=getattr(args, "weights", "float"),
                shortlist=None if shortlist == "none" else shortlist)


def _load_with_exits(args):
    """The model with the exits --exits-file names; None (after saying so) when it has none."""
    model = _load(args, exits=args.exits_file)
    if not model.exits:
        print(f"balcony {args.command}: the model has no exits: pass --exits-file FILE", file=sys.stderr)
        return None
    return model


def cmd_info(args) -> int:
    import balcony_ext as bx

    print(f"balcony_ext {bx.__version__}, torch {torch.__version__}")
    print(f"CUDA kernels built: {bx.built_with_cuda()}; GPU available: {torch.cuda.is_available()}")
    print(f"CPU kernels: {bx.cpu_capability()} (best this CPU supports: {bx.max_cpu_capability()}); "
          f"threads: {torch.get_num_threads()}")
    return 0


def cmd_train(args) -> int:
    from .data import data_spec
    from .exits_io import save_exits
    from .model import attach
    from .train import train

    model = _load(args, exits=args.exits_file)
    if args.exits:
        attach(model, exits=args.exits, init=args.init, norm_init=args.norm_init, seed=args.seed, replace=True)
    if not model.exits:
        print("balcony train: no exits: pass --exits K [K ...] or --exits-file FILE", file=sys.stderr)
        return 2
    data = data_spec(args.data)
    run = train(model, data=data, tokens=args.tokens, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                grad_accum=args.grad_accum, bf16=args.bf16, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, seed=args.seed)
    path = save_exits(model, args.out)
    print(f"trained exits {model.exits} on {run['tokens']} tokens ({run['tokens_per_s']:.0f} tokens/s); saved {path}")
    return 0


def cmd_eval(args) -> int:
    from .data import data_spec
    from .evaluate import evaluate

    model = _load_with_exits(args)
    if model is None:
        return 2
    report = evaluate(model, data=data_spec(args.data), seq_len=args.seq_len, max_tokens=args.max_tokens,
                      affine_tokens=args.affine_tokens, chat_prompts=args.chat_prompts, json_path=args.json,
                      plot_path=args.plot)
    print(report)
    return 0


def _budget_arg(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is a number in (0, 1], got {text!r}") from None


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return n


def _full_start(text):
    """--full-start: an int where the text is one (generate checks the value and names what is wrong)."""
    try:
        return int(text)
    except ValueError:
        return text


def _port(text):
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is an int in 0..65535, got {text!r}")
    return n


def cmd_generate(args) -> int:
    from .generate import generate

    model = _load(args, exits=args.exits_file)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, stop=args.stop or None, presence_penalty=args.presence_penalty,
              frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
              dry_multiplier=args.dry_multiplier, confidence=args.confidence, full_start=args.full_start)
    if args.exit is not None:
        kw["exit_layer"] = args.exit
    elif args.ms_per_token is not None:
        kw["ms_per_token"] = args.ms_per_token
    else:
        kw["budget"] = args.budget
    if args.calibration:
        from .budgets import load_calibration

        kw["calibration"] = load_calibration(model, args.calibration)
        if kw["calibration"] is None:
            raise ValueError(f"{args.calibration} is not a calibration of {model.name}")
    g = generate(model, args.prompt, stream=True, **kw)
    for piece in g:
        print(piece, end="", flush=True)
    out = g.result()
    exits = sorted(set(out.exit_layers))
    sizes = sorted({n for n in out.heads if n})
    listed = (f", {sum(1 for n in out.heads if n)} with a shortlisted head of {'/'.join(f'{n:,}' for n in sizes)} tokens"
              if sizes else "")
    asked = g.budgets.exits(0)[0]  # (the CLI's budget, exit or latency is one route for every step)
    L, start = model.num_layers, out.full_start
    deep = sum(1 for k in out.exit_layers[start:] if k == L) if asked != L else 0
    listed += f", the first {start} at the full depth (its opening)" if start and asked != L else ""
    listed += f", {deep} taken again at the full depth (confidence below {args.confidence:g})" if deep else ""
    print(f"\n\n[{len(out.tokens)} tokens at exit {'/'.join(map(str, exits))} of {model.num_layers}{listed}; "
          f"{out.tokens_per_second:.1f} tokens/s; first token after {out.time_to_first_token * 1000:.0f} ms]")
    for note in out.notes:
        print(f"[note: {note}]")
    return 0


def cmd_calibrate(args) -> int:
    from .budgets import calibration_path
    from .generate import calibrate

    model = _load_with_exits(args)
    if model is None:
        return 2
    cal = calibrate(model, tokens=args.tokens, path=args.out)
    full = cal["ms_per_token"][str(model.num_layers)]
    short = cal.get("shortlist_ms_per_token", {})
    print(f"{'exit':>5}{'head':>8}{'ms/token':>10}{'rel cost':>10}")
    for k, ms in cal["ms_per_token"].items():
        print(f"{k:>5}{'full':>8}{ms:>10.2f}{ms / full:>10.3f}")
        for n, v in short.get(k, {}).items():
            print(f"{k:>5}{n:>8}{v:>10.2f}{v / full:>10.3f}")
    print(f"saved {args.out or calibration_path(model)}")
    return 0


def cmd_bench(args) -> int:
    from .bench import decode_table, format_table, memory_bandwidth

    model = _load(args, exits=args.exits_file)
    bw = memory_bandwidth()
    rows = decode_table(model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.tokens, hf=not args.no_hf)
    print(f"# decode, {model.name}, batch {args.batch}, prompt {args.prompt_len}, {args.tokens} new tokens; "
          f"read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s; {torch.get_num_threads()} threads")
    print(format_table(rows, bw))
    return 0


def cmd_demo(args) -> int:
    import json

    from .generate import generate
    from .loading import bundled_exits_path

    model = _load(args, exits="bundled")
    if not model.exits:
        print("balcony demo: no shipped exits found for the default model; train some with `balcony train`",
              file=sys.stderr)
        return 2
    figures = {}  # (method, exit) -> its row of the shipped exits' evaluation report
    report = bundled_exits_path().with_suffix(".eval.json")
    if report.exists():
        for r in json.loads(report.read_text())["rows"]:
            figures[(r["method"], r["exit"])] = r
    from .shortlist import head_method

    L = model.num_layers
    sizes = "/".join(f"{n // 1024}k" for n in model.shortlist_sizes)
    print(f"{model.name}: {L} layers, exits at {model.exits} (trained on {model.tokens_trained:,} tokens)"
          + (f", shortlisted heads of {sizes} tokens" if sizes else "") + f"; prompt: {args.prompt!r}; greedy"
          + (f", frequency_penalty {args.frequency_penalty:g}" if args.frequency_penalty else "")
          + (f", DRY {args.dry_multiplier:g} (a token extending a repeat is penalised)" if args.dry_multiplier else "")
          + (f"; confidence {args.confidence:g} (a token its exit is less sure of is taken again at the full depth)"
             if args.confidence else "")
          + (f"; the first {args.full_start} answer tokens at the full depth at every budget"
             if args.full_start not in (0, "auto") else "")
          + "\n")
    budgets = args.budgets
    if budgets is None:  # tenths from 1 down to the cheapest route
        from .budgets import load_calibration, route_costs

        cheapest = min(route_costs(model, load_calibration(model)).values())
        budgets = [b / 10 for b in range(10, 0, -1) if b / 10 >= cheapest - 0.1 + 1e-9]
    runs, seen = [], set()
    for budget in sorted(budgets, reverse=True):
        out = generate(model, args.prompt, budget=budget, max_new_tokens=args.max_new_tokens,
                       frequency_penalty=args.frequency_penalty, dry_multiplier=args.dry_multiplier,
                       confidence=args.confidence,
                       full_start=args.full_start)
        # the route the budget bought: its tokens' past the opening (those taken again at the full depth
        # are (L, 0))
        after = list(zip(out.exit_layers, out.heads))[out.full_start:] or [(L, 0)]
        route = next(((k, n) for k, n in after if k != L), after[0])
        at_exit = sum(k == route[0] for k, _ in after) / len(after)
        if args.budgets is None and (out.full_start, route) in seen:
            continue  # (a budget that buys the same opening and route as a higher one)
        seen.add((out.full_start, route))
        runs.append((budget, route, out))
        k, n = route
        row = figures.get((head_method(n) if n else "full" if k == L else "balcony", k), {})
        agree = row.get("chat_top1")
        print(f"--- budget {budget:g}: " + ("the full model" if k == L else f"exit {k}")
              + (f" with a {n:,}-token head" if n else "")
              + (f" after a {out.full_start}-token opening at the full depth" if k != L and out.full_start else "")
              + (f" ({at_exit:.0%} of the tokens past it; the rest at the full depth)"
                 if k != L and at_exit < 1 else "")
              + f", {out.tokens_per_second:.1f} tokens/s"
              + (f", agrees with the full model on {agree:.0%} of answer tokens" if agree is not None and
                 route != (L, 0) else ""))
        print(out.text.strip() + "\n")
    full = next((o for b, r, o in runs if r == (L, 0)), None)
    print(f"{'budget':>7}{'opening':>8}{'exit':>6}{'head':>7}{'tokens/s':>10}{'speed-up':>10}{'chat top-1':>12}"
          f"{'chat F1':>9}"
          f"{'held-out ppl':>14}")
    for budget, (k, n), out in runs:
        speed = out.tokens_per_second / full.tokens_per_second if full else float("nan")
        row = figures.get((head_method(n) if n else "full" if k == L else "balcony", k), {})
        agree = f"{row['chat_top1']:.2f}" if row.get("chat_top1") is not None else "-"
        f1 = f"{row['chat_f1']:.2f}" if row.get("chat_f1") is not None else "-"
        ppl = f"{row['perplexity']:.1f}" if row.get("perplexity") is not None else "-"
        head = f"{n // 1024}k" if n else "full"
        opening = out.full_start if k != L else 0
        print(f"{budget:>7g}{opening:>8}{k:>6}{head:>7}{out.tokens_per_second:>10.1f}{speed:>9.2f}x{agree:>12}{f1:>9}"
              f"{ppl:>14}")
    if figures:
        print("\nchat top-1: how often the route's next token equals the full model's along the full model's answers "
              "to held-out instructions;\nchat F1: its own greedy answers' token F1 with the full model's; held-out "
              "ppl: perplexity on held-out text\n(the exits' evaluation report; a shortlisted head gives the tokens "
              "off it no probability, so no perplexity)")
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        print(f"balcony serve: {exc.name} is missing: pip install 'balcony_ext[serve]'", file=sys.stderr)
        return 2
    model = _load(args, exits=args.exits_file)
    print(f"serving {model.name} ({model.num_layers} layers, exits {model.exits}) at http://{args.host}:{args.port}/v1")
    serve(model, host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
          prefill_chunk=args.prefill_chunk, slo_ms_per_token=args.slo_ms_per_token,
          admission_control=args.admission_control)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="balcony", description="Balcony: one causal LM served at many speeds.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="what this build and machine provide").set_defaults(func=cmd_info)

    def model_args(q):
        q.add_argument("--model", default=None, help="local Hugging Face checkpoint directory (default: bundled SmolLM2)")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        q.add_argument("--data", nargs="+", default=["shakespeare"],
                       help="text files/directories, 'shakespeare', 'chat' (the model's answers to instructions) "
                            "or 'self'; NAME=WEIGHT items make a mixture, e.g. chat=0.7 shakespeare=0.3 "
                            "(default: shakespeare)")
        q.add_argument("--seq-len", type=int, default=512)

    t = sub.add_parser("train", help="train exits by self-distillation")
    model_args(t)
    t.add_argument("--exits", type=int, nargs="+", help="exit depths to attach (layer counts)")
    t.add_argument("--exits-file", default=None, help="start from these saved exits")
    t.add_argument("--init", default="last", choices=["last", "next", "random"])
    t.add_argument("--norm-init", default="final", choices=["final", "next"])
    t.add_argument("--tokens", type=int, default=1_000_000)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    t.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here (and resume from them)")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="exits.safetensors")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-exit perplexity, KL and agreement on held-out text")
    model_args(e)
    e.add_argument("--exits-file", default="bundled", help="saved exits (default: the shipped ones)")
    e.add_argument("--shortlist", default="bundled",
                   help="a vocabulary shortlist file: its routes are evaluated too (default: the shipped one; 'none')")
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--affine-tokens", type=int, default=0, help="train the affine-exit baseline on this many tokens")
    e.add_argument("--chat-prompts", type=int, default=0,
                   help="also run the chat evaluation on this many held-out instructions")
    e.add_argument("--json", default=None)
    e.add_argument("--plot", default=None)
    e.set_defaults(func=cmd_eval)

    def serve_args(q):
        q.add_argument("--model", default=None, help="local Hugging Face checkpoint directory (default: bundled SmolLM2)")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        q.add_argument("--exits-file", default="bundled", help="saved exits (default: the shipped ones)")
        q.add_argument("--weights", default="float", choices=["float", "int8", "q4", "q4_1"],
                       help="int8: every matrix the decode step reads rounded to int8 blocks of 32 (8.5 bits per "
                            "weight); q4: the decoder matrices to 4-bit blocks of 32 (4.5 bits), the head to int8; "
                            "q4_1: 4-bit blocks with a scale and a minimum (5 bits; exact for the default model)")
        q.add_argument("--shortlist", default="bundled",
                       help="a vocabulary shortlist file, whose cheaper head budgets below 1 may buy (default: the "
                            "one shipped for the default model; 'none': never)")

    g = sub.add_parser("generate", help="generate at the exit a budget buys")
    serve_args(g)
    g.add_argument("prompt")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--budget", type=_budget_arg, default=1.0, help="fraction of the full model's cost, in (0, 1]")
    how.add_argument("--exit", type=int, default=None, help="an attached exit depth (or the layer count: full)")
    how.add_argument("--ms-per-token", type=float, default=None, help="latency target (needs `balcony calibrate`)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="Hugging Face's, > 0 (1: off)")
    g.add_argument("--dry-multiplier", type=float, default=0.0,
                   help="DRY (llama.cpp's): a token extending a repeat of an earlier stretch of the answer is penalised "
                        "(0: off; 0.8 stops the exits' loops)")
    g.add_argument("--confidence", type=float, default=0.0,
                   help="a token whose exit gives its most likely token a probability below this is taken again at "
                        "the full depth (0: never)")
    g.add_argument("--full-start", type=_full_start, default="auto",
                   help="the first N answer tokens at the full depth, the budget's route after them (0: none; auto: "
                        "the budget spends an opening over --max-new-tokens where it fits; default)")
    g.add_argument("--stop", action="append", help="a string that ends the answer (repeatable)")
    g.add_argument("--calibration", default=None, help="a calibration file (default: the one `balcony calibrate` saved)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="measure each exit's decode ms/token on this machine")
    serve_args(c)
    c.add_argument("--tokens", type=int, default=32)
    c.add_argument("--out", default=None, help="where to save it (default: the cache directory, where generate looks)")
    c.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", help="decode tokens/s at every exit beside Hugging Face generate")
    serve_args(b)
    b.add_argument("--batch", type=_positive_int, default=1)
    b.add_argument("--prompt-len", type=_positive_int, default=64)
    b.add_argument("--tokens", type=_positive_int, default=32)
    b.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="an OpenAI-compatible server where every request carries a budget")
    serve_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache rows)")
    s.add_argument("--max-len", type=int, default=None, help="positions per sequence (default: 2048 or the model's)")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step")
    s.add_argument("--slo-ms-per-token", type=float, default=None,
                   help="target step time: under load, requests that allow it (min_budget) move to cheaper exits")
    s.add_argument("--admission-control", action="store_true",
                   help="with --slo-ms-per-token: keep new requests queued while even the floors would break the target")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the default model with its shipped exits, one prompt at several budgets")
    d.add_argument("--model", default=None, help=argparse.SUPPRESS)
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    d.add_argument("--prompt", default="Why is the sky blue?")
    d.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="budgets to answer at (default: 1, 0.9, 0.8, ... down to the cheapest route)")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--dry-multiplier", type=float, default=0.8,
                   help="DRY at every budget: a token extending a repeat of an earlier stretch of the answer is "
                        "penalised (0: off); 0.8 stops the exits' loops and keeps the answers closest to the full "
                        "model's (docs/results/dry.md)")
    d.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's frequency penalty at every budget (0: off)")
    d.add_argument("--confidence", type=float, default=0.0,
                   help="at every budget, a token whose exit gives its most likely token a probability below this is "
                        "taken again at the full depth (0: never)")
    d.add_argument("--full-start", type=_full_start, default="auto",
                   help="at every budget, the first N answer tokens at the full depth, the budget's route after them "
                        "(0: none; auto: each budget spends an opening over --max-new-tokens where it fits; default)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:  # bad input (or a missing file): a clear message, not a traceback
        print(f"balcony {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

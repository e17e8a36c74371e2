"""The `balcony` command line.

    balcony info                                   build and machine: CUDA kernels, CPU instruction set
    balcony train --exits 8 15 22 --data shakespeare --tokens 1000000 --out exits.safetensors
    balcony eval  --exits-file exits.safetensors --data shakespeare --json eval.json --plot eval.png

--model is a local Hugging Face checkpoint directory; without it the bundled default
(SmolLM2-135M-Instruct) is used.
"""

import argparse
import sys

import torch


def _load(args, exits="bundled"):
    from .loading import load

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return load(args.model, dtype=dtype, exits=exits)


def cmd_info(args) -> int:
    import balcony_ext as bx

    print(f"balcony_ext {bx.__version__}, torch {torch.__version__}")
    print(f"CUDA kernels built: {bx.built_with_cuda()}; GPU available: {torch.cuda.is_available()}")
    print(f"CPU kernels: {bx.cpu_capability()} (best this CPU supports: {bx.max_cpu_capability()}); "
          f"threads: {torch.get_num_threads()}")
    return 0


def cmd_train(args) -> int:
    from .exits_io import save_exits
    from .model import attach
    from .train import train

    model = _load(args, exits=args.exits_file)
    if args.exits:
        attach(model, exits=args.exits, init=args.init, norm_init=args.norm_init, seed=args.seed, replace=True)
    if not model.exits:
        print("balcony train: no exits: pass --exits K [K ...] or --exits-file FILE", file=sys.stderr)
        return 2
    data = args.data if len(args.data) > 1 else args.data[0]
    run = train(model, data=data, tokens=args.tokens, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                grad_accum=args.grad_accum, bf16=args.bf16, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, seed=args.seed)
    path = save_exits(model, args.out)
    print(f"trained exits {model.exits} on {run['tokens']} tokens ({run['tokens_per_s']:.0f} tokens/s); saved {path}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    model = _load(args, exits=args.exits_file)
    if not model.exits:
        print("balcony eval: the model has no exits: pass --exits-file FILE", file=sys.stderr)
        return 2
    data = args.data if len(args.data) > 1 else args.data[0]
    report = evaluate(model, data=data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                      affine_tokens=args.affine_tokens, json_path=args.json, plot_path=args.plot)
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="balcony", description="Balcony: one causal LM served at many speeds.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="what this build and machine provide").set_defaults(func=cmd_info)

    def model_args(q):
        q.add_argument("--model", default=None, help="local Hugging Face checkpoint directory (default: bundled SmolLM2)")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        q.add_argument("--data", nargs="+", default=["shakespeare"],
                       help="text files/directories, 'shakespeare' or 'self' (default: shakespeare)")
        q.add_argument("--seq-len", type=int, default=512)

    t = sub.add_parser("train", help="train exits by self-distillation")
    model_args(t)
    t.add_argument("--exits", type=int, nargs="+", help="exit depths to attach (layer counts)")
    t.add_argument("--exits-file", default=None, help="start from these saved exits")
    t.add_argument("--init", default="last", choices=["last", "random"])
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
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--affine-tokens", type=int, default=0, help="train the affine-exit baseline on this many tokens")
    e.add_argument("--json", default=None)
    e.add_argument("--plot", default=None)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

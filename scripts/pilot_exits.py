"""One pilot run of an exit-training recipe, recorded beside the others in docs/results/pilots.json.

    .venv/bin/python scripts/pilot_exits.py --name chat-depths --exits 10 13 16 19 22 25 --tokens 150000
    .venv/bin/python scripts/pilot_exits.py --name on-policy --exits 15 19 23 --from-exits EXITS.safetensors \
        --mix chat-exits=0.7 shakespeare=0.15 python-docs=0.15 --tokens 200000

Trains exits on the default model with the given recipe (data mixture, depths, initialisation,
learning rate), then measures them the way the shipped exits are measured: the chat evaluation on
held-out instructions (teacher-forced agreement and KL along the full model's answers, free answers'
repetition and match) and held-out perplexity on Shakespeare plays never trained on. Checkpoints go
to --run-dir (outside the repository): the same command resumes an interrupted pilot.
--from-exits continues trained exits instead (--tokens 0: measures them as they are); the mixture item
chat-exits is those exits' own answers to the instructions, which the full model scores in training.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

import balcony_ext as bx
from balcony_ext.chat_data import chat_data
from balcony_ext.data import Mixture, data_spec, prepare
from balcony_ext.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "pilots.json"


def write_table(pilots, path):
    """docs/results/pilots.md: one row per pilot and exit."""
    lines = ["# Pilot runs of the exit-training recipe", "",
             "Written by `scripts/pilot_exits.py`; the figures are in `pilots.json`. Chat: held-out instructions, "
             "teacher-forced along the full model's greedy answers (top-1 agreement, KL) and free answers (share of "
             "repeated 4-grams, token F1 with the full model's answer); Shakespeare: held-out plays, perplexity "
             "relative to the full model's.", "",
             "| pilot | recipe | tokens | exit | rel cost | chat top-1 | chat KL | rep 4-gram | F1 | Shakespeare ppl / full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pilots:
        recipe = (f"{' '.join(p['mix'])}; init {p['init']}, norm {p['norm_init']}; lr {p['lr']:g}"
                  + ("; loss on prompts too" if p.get("learn_prompt") else ""))
        if p.get("from_exits"):
            recipe = f"from {p['from_exits']}; " + (recipe if p["tokens"] > p.get("start_tokens", -1) else "no training")
        full = next(r for r in p["rows"] if r["method"] == "full")
        for r in p["rows"]:
            if r["method"] == "full":
                continue
            cell = lambda key, fmt: format(r[key], fmt) if key in r else "-"
            lines.append(f"| {p['name']} | {recipe} | {p['tokens']:,} | {r['method']} {r['exit']} | {r['rel_cost']:.2f} | "
                         f"{cell('chat_top1', '.3f')} | {cell('chat_kl', '.2f')} | {cell('chat_rep4', '.3f')} | "
                         f"{cell('chat_f1', '.3f')} | {r['shakespeare_ppl_ratio']:.2f} |")
        lines.append(f"| {p['name']} | | | full {full['exit']} | 1.00 | 1 | 0 | {full.get('chat_rep4', 0):.3f} | 1 | 1 |")
    Path(path).write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--exits", type=int, nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=150_000)
    ap.add_argument("--mix", nargs="+", default=["chat=1"], help="data=weight, e.g. chat=0.7 shakespeare=0.3")
    ap.add_argument("--prompts", type=int, default=2000, help="chat instructions (answers from the cache)")
    ap.add_argument("--learn-prompt", action="store_true", help="also learn on the prompt tokens of chat data")
    ap.add_argument("--init", default="last", choices=["last", "next", "random"])
    ap.add_argument("--norm-init", default="final", choices=["final", "next"])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--affine", action="store_true", help="train the affine exit beside them")
    ap.add_argument("--chat-prompts", type=int, default=48)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--from-exits", default=None,
                    help="continue training these exits (a saved exits file) instead of attaching new ones; "
                         "--tokens 0 only evaluates them")
    args = ap.parse_args()

    cache = Path(os.environ.get("BALCONY_CACHE", Path.home() / ".cache" / "balcony_ext"))
    run_dir = Path(args.run_dir or cache / "runs" / f"pilot-{args.name}")
    model = bx.load(exits=args.from_exits)
    start_tokens = model.tokens_trained if args.from_exits else 0
    if args.from_exits and model.exits != args.exits:
        raise SystemExit(f"--exits {args.exits} but {args.from_exits} holds exits {model.exits}")
    gen_model = bx.load(exits=args.from_exits, dtype=torch.bfloat16)  # the answers are generated in bf16
    chat = chat_data(gen_model, prompts=args.prompts, generate_missing=False)
    print(chat.describe())
    parts = []
    for name, w in data_spec(args.mix):
        if name == "chat":
            corpus = chat.corpus(learn_prompt=args.learn_prompt)
        elif name == "chat-exits":  # the starting exits answer the same instructions (generated once, cached)
            if not args.from_exits:
                raise SystemExit("chat-exits needs --from-exits: the exits whose answers the full model scores")
            own = chat_data(gen_model, prompts=args.prompts, answer_exits=gen_model.exits)
            print(own.describe())
            corpus = own.corpus(learn_prompt=args.learn_prompt)
        else:
            corpus = prepare(name, model.tokenizer)
        parts.append((corpus, w))
    del gen_model
    data = parts[0][0] if len(parts) == 1 else Mixture(parts)
    if not args.from_exits:
        bx.attach(model, args.exits, init=args.init, norm_init=args.norm_init)
    t0 = time.time()
    if args.tokens > 0:
        run = bx.train(model, data=data, tokens=args.tokens, lr=args.lr, warmup=args.warmup, batch_size=args.batch,
                       seq_len=args.seq, bf16=True, checkpoint_dir=run_dir, checkpoint_every=10,
                       affine_baseline=args.affine)
    else:
        run = dict(history=[], affine=None)
    seconds = sum(h["step_s"] for h in run["history"])
    from balcony_ext.chat_eval import evaluate_chat

    heads = None
    if run["affine"]:
        a = model.adapter
        heads = {("affine", k): (lambda h, k=k: a.lm_head(run["affine"][k](h))) for k in model.exits}
    chat_rows = evaluate_chat(model, prompts=args.chat_prompts, heads=heads)
    shakes = bx.evaluate(model, data="shakespeare", max_tokens=args.eval_tokens, baselines=(), affine=run["affine"])
    rows = []
    full_ppl = shakes.row("full")["perplexity"]
    for r in shakes.rows:
        key = (r["method"], r["exit"])
        c = chat_rows.get(key, {})
        rows.append(dict(method=r["method"], exit=r["exit"], rel_cost=r["rel_cost"],
                         shakespeare_ppl=r["perplexity"], shakespeare_ppl_ratio=r["perplexity"] / full_ppl,
                         shakespeare_top1=r["top1"], **c))
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    entry = dict(name=args.name, exits=args.exits, tokens=model.tokens_trained, mix=args.mix,
                 chat_data=dict(prompts=len(chat.train_examples),
                                answer_tokens=sum(len(e.answer_ids) for e in chat.train_examples)),
                 learn_prompt=args.learn_prompt, init=args.init, norm_init=args.norm_init, lr=args.lr,
                 warmup=args.warmup, batch=args.batch, seq=args.seq, step_seconds=round(seconds),
                 from_exits=args.from_exits and Path(args.from_exits).name, start_tokens=start_tokens,
                 final_loss_per_exit=run["history"][-1]["loss_per_exit"] if run["history"] else None,
                 chat=chat_rows["_info"], rows=rows,
                 machine=f"{bx.cpu_capability()}, {torch.get_num_threads()} threads",
                 finished=time.strftime("%Y-%m-%d %H:%M"))
    pilots = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    pilots = [p for p in pilots if p["name"] != args.name] + [entry]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, lambda tmp: Path(tmp).write_text(json.dumps(pilots, indent=1)))
    write_table(pilots, RESULTS.with_suffix(".md"))
    print(f"recorded pilot {args.name} in {RESULTS} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

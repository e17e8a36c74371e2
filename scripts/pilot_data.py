"""Pilots of the exits' training data: one exit of a trained exits file continued on the same number of
tokens of different chat data, each measured by the teacher-forced chat evaluation on many held-out
instructions. Recorded in docs/results/data_pilots.json and .md.

    .venv/bin/python scripts/pilot_data.py --from EXITS --exit 15 --tokens 409600 \\
        --variants t:8000-9000 w:0-1000 t:8000-8500x2 t:8000-8500+w:0-500

A variant is t:A-B (the template instructions A to B-1, balcony_ext.instructions, in their order) and/or
w:0-N (the first N questions the model wrote itself, balcony_ext.written_questions) joined by "+", then
optionally "xK": K answers to each (chat_data(samples=K): the first as always, the others sampled), then
optionally "@LR": this variant's learning rate instead of --lr (e.g. t:4000-7000@2e-3). The
question a pilot answers is what new data is worth, so the parts should be data the starting exits never
saw (the shipped exits trained on templates 0-6999: 0-3999, then continued on 4000-6999), and the run should
pass over it more than once (409,600 tokens at 70% chat is ~290k answer tokens, about 1,400 answers):
e.g. 1,000 new templates against 1,000 written questions against 500 templates answered twice. The
answers come from the chat cache (chat_data; --generate makes what is missing). Every variant starts from
the same exit (--from, default: the shipped file), is mixed with human text as the shipped recipe is (70%
chat, 15% Shakespeare, 15% Python docs) and trains with the same schedule, seed and settings (bf16
autocast, 4 x 512 tokens a step, lr --lr with 1% warm-up and cosine decay, the KL over --vocab
shortlisted tokens). The held-out instructions of the evaluation are never trained on whatever the
variant (the split is by a hash of each instruction's text).
"""

import argparse
import json
import time
from pathlib import Path

import torch

import balcony_ext as bx
from balcony_ext.chat_data import ChatData, chat_data
from balcony_ext.chat_eval import evaluate_chat
from balcony_ext.data import Mixture, prepare
from balcony_ext.files import atomic_write
from balcony_ext.loading import bundled_exits_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "data_pilots.json"


def parse_variant(v: str, lr: float) -> tuple:
    """"t:8000-9000+w:0-500x2@2e-3" -> ((8000, 9000), 500, 2, 2e-3): the templates' range, the written
    questions (the first N), the answers to each, the learning rate (`lr` when the variant names none)."""
    body, _, lr_text = v.partition("@")
    data, _, samples = body.partition("x")
    templates, written = None, 0
    try:
        lr = float(lr_text) if lr_text else lr
        if not 0 < lr < 1:
            raise ValueError(lr_text)
        for part in data.split("+"):
            kind, _, span = part.partition(":")
            a, b = (int(x) for x in span.split("-"))
            if kind == "t" and templates is None and 0 <= a < b:
                templates = (a, b)
            elif kind == "w" and not written and a == 0 < b:
                written = b
            else:
                raise ValueError(part)
        samples = int(samples or 1)
        if samples < 1:
            raise ValueError(samples)
    except ValueError:
        raise SystemExit(f"a variant is t:A-B (templates A to B-1) and/or w:0-N (the first N written questions) "
                         f"joined by +, then optionally xK (K answers each) and @LR (a learning rate in (0, 1)), "
                         f"e.g. t:8000-9000, w:0-1000, t:8000-8500x2, t:8000-9000@2e-3; got {v!r}") from None
    return templates, written, samples, lr


def variant_data(gen, templates, written: int, samples: int, generate: bool) -> ChatData:
    """The chat examples of a variant (every answer to each instruction in it)."""
    a, b = templates or (0, 1)
    chat = chat_data(gen, prompts=b, first=a, written=written, samples=samples, batch_size=16,
                     generate_missing=generate)
    keep = [e for e in chat.examples if e.tag == "w" or templates is not None]
    return ChatData(keep, chat.heldout_prompts, chat.source)


def one_exit_model(path: str, k: int):
    model = bx.load(exits=None)
    bx.load_exits(model, path)
    if k not in model.exits:
        raise SystemExit(f"exit {k} is not in {path} (exits {model.exits})")
    return bx.detach(model, [j for j in model.exits if j != k])


def chat_figures(model, k: int, prompts: int, n_instructions: int) -> dict:
    rows = evaluate_chat(model, prompts=prompts, free=False, shortlisted=False, n_instructions=n_instructions)
    return dict(chat_top1=rows[("balcony", k)]["chat_top1"], chat_kl=rows[("balcony", k)]["chat_kl"],
                chat_answer_tokens=rows["_info"]["chat_answer_tokens"])


def write_table(entry: dict, path: Path):
    lines = [f"# Data pilots: exit {entry['exit']}, {entry['tokens']:,} tokens each from {entry['from']}",
             "", f"{entry['recipe']}; evaluated on {entry['eval_prompts']} held-out instructions "
             f"(teacher-forced); {entry['machine']}", "",
             "| data | template instructions | written | answers | answer tokens (training) | chat top-1 | chat KL | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in entry["variants"].items():
        lines.append(f"| {name} | {r.get('prompts', '-')} | {r.get('written', '-')} | {r.get('answers', '-')} "
                     f"| {r.get('answer_tokens', '-')} "
                     f"| {r['chat_top1']:.4f} | {r['chat_kl']:.3f} | {r.get('seconds', 0):.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="start", default=str(bundled_exits_path()), help="the exits file to start from")
    ap.add_argument("--exit", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=409_600)
    ap.add_argument("--variants", nargs="+", default=["t:8000-9000", "w:0-1000", "t:8000-8500x2"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vocab", type=int, default=16384, help="the KL over the shortlist's first N tokens (0: all)")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-instructions", type=int, default=8000,
                    help="the held-out prompts are the first --eval-prompts held out among these many")
    ap.add_argument("--generate", action="store_true", help="generate the chat data that is not cached")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    variants = {v: parse_variant(v, args.lr) for v in args.variants}
    k, results = args.exit, Path(args.results)
    recipe = (f"chat=0.7 shakespeare=0.15 python-docs=0.15, bf16 autocast, lr {args.lr:g} (or the variant's @LR) "
              f"cosine, 1% warm-up, "
              f"4x512 tokens a step" + (f", KL over the shortlist's first {args.vocab:,} tokens" if args.vocab else ""))
    # (the starting file by its name only: the results are committed, a path is this machine's)
    entry = dict(exit=k, tokens=args.tokens, start=Path(args.start).name, recipe=recipe, eval_prompts=args.eval_prompts,
                 machine=f"{bx.cpu_capability()}, threads: {torch.get_num_threads()}", variants={})
    entry["from"] = Path(args.start).name
    if results.exists():  # the same pilot run before: its variants are kept, those run now replaced
        before = json.loads(results.read_text())
        if all(before.get(key) == entry[key] for key in ("exit", "tokens", "start", "recipe", "eval_prompts")):
            entry["variants"] = before["variants"]
    model = one_exit_model(args.start, k)
    if "start (no training)" not in entry["variants"]:
        entry["variants"]["start (no training)"] = chat_figures(model, k, args.eval_prompts, args.eval_instructions)
    gen = bx.load(exits=None, dtype=torch.bfloat16)  # (the chat answers' cache is keyed by the bf16 model)
    shakespeare, docs = prepare("shakespeare", gen.tokenizer), prepare("python-docs", gen.tokenizer)
    for name, (templates, written, samples, lr) in variants.items():
        chat = variant_data(gen, templates, written, samples, args.generate)
        print(name, chat.describe(), flush=True)
        model = one_exit_model(args.start, k)
        t0 = time.time()
        bx.train(model, data=Mixture([(chat.corpus(), 0.7), (shakespeare, 0.15), (docs, 0.15)]), tokens=args.tokens,
                 lr=lr, batch_size=4, seq_len=512, bf16=True, vocab=args.vocab or None)
        r = chat_figures(model, k, args.eval_prompts, args.eval_instructions)
        train = chat.train_examples
        r.update(prompts=len({e.index for e in train if e.tag == ""}), written=len({e.index for e in train if e.tag == "w"}),
                 answers=len(train), answer_tokens=sum(len(e.answer_ids) for e in train), seconds=time.time() - t0)
        entry["variants"][name] = r
        print(name, r, flush=True)
        atomic_write(results, lambda tmp: Path(tmp).write_text(json.dumps(entry, indent=1)))
        write_table(entry, results.with_suffix(".md"))
    atomic_write(results, lambda tmp: Path(tmp).write_text(json.dumps(entry, indent=1)))
    write_table(entry, results.with_suffix(".md"))


if __name__ == "__main__":
    main()

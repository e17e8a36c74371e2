"""Trains, evaluates and packages the exits shipped with balcony_ext for SmolLM2-135M-Instruct.

    .venv/bin/python scripts/train_default_exits.py [--tokens 3000000] [--run-dir DIR]

The recipe (chosen by the pilot runs in docs/results/pilots.json):
  - data: the model's own answers to everyday instructions in its chat template (balcony_ext.chat_data:
    --prompts instructions, and --written more that the model writes itself, answered at full depth by
    the frozen model in bfloat16, greedy and sampled,
    loss on the answer tokens), mixed with human text so that general text does not get worse:
    Shakespeare's plays and the Python tutorial/HOWTOs/FAQ (--mix);
  - exits at --exits, initialised from the last decoder layer with the final norm;
  - bf16 autocast, AdamW, lr 2e-3 (4x the paper's 5e-4: measured better at these token counts), 1% warm-up
    then cosine, 4 x 512-token batches;
  - the learned affine exit (tuned lens) trains beside them on the very same batches.

Everything is cached or checkpointed outside the repository (--run-dir, the chat cache): run the same
command again after an interruption and it resumes where it stopped (answer generation included).
When training is complete it evaluates every exit on held-out instructions (chat agreement, KL, free
answers, greedy and with DRY 0.8), held-out Shakespeare plays and held-out Python
documentation, and writes
  balcony_ext/exits/smollm2-135m-instruct.safetensors  (bf16, the exits `bx.load()` attaches)
  balcony_ext/exits/smollm2-135m-instruct.eval.json    (the report `balcony demo` shows)
  docs/results/default_exits.json/.png, docs/results/default_exits_python_docs.json
--from-checkpoint packages and evaluates the latest checkpoint as it stands, training nothing (to ship
the exits of a run still in progress; the figures then say how many tokens they were trained on).
--from-exits FILE continues training the exits of a file (e.g. the shipped one, on more tokens).
--add-run DIR ... packages and evaluates, beside this run's exits, those of other runs of this script
(their last checkpoints): exits train independently of each other, so a rung added later (e.g. exit
26, trained with --exits 26 --run-dir DIR) joins the shipped ones without retraining them.

The shipped file: exits 15 / 19 / 23 from the default command (3M tokens), exit 26 from
  --exits 26 --tokens 1500000 --run-dir RUN26   then   --from-checkpoint --add-run RUN26
then all four continued on new instructions, seven times, each step from the file the step before wrote:
  --from-exits PREVIOUS.safetensors --lr 1e-3 --vocab 16384 --run-dir RUN_N  and
  --prompts 7000  --first 4000  --tokens 1000000   (templates 4,000-6,999: 3,000 new instructions)
  --prompts 11000 --first 7000  --tokens 1000000   (then 4,000 more each time)
  --prompts 15000 --first 11000 --tokens 1100000
  --prompts 19000 --first 15000 --tokens 1100000
  --prompts 23000 --first 19000 --tokens 1100000
  --prompts 27000 --first 23000 --tokens 1100000
  --prompts 30000 --first 27000 --tokens 1100000   (the last 3,000)
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
from balcony_ext.loading import bundled_exits_path

ROOT = Path(__file__).resolve().parent.parent
CHECK_TOKENS = 2048


def build_data(model, args):
    """The training mixture; the chat answers are generated (or read from the cache) in bfloat16."""
    gen_model = bx.load(exits=None, dtype=torch.bfloat16)
    chat = chat_data(gen_model, prompts=args.prompts, first=args.first, written=args.written, samples=args.samples,
                     batch_size=16, generate_missing=not args.from_checkpoint)
    del gen_model
    print(chat.describe())
    parts = [(chat.corpus() if name == "chat" else prepare(name, model.tokenizer), w) for name, w in data_spec(args.mix)]
    return chat, (parts[0][0] if len(parts) == 1 else Mixture(parts))


def from_checkpoint(model, run_dir: Path) -> dict:
    """The exits, affine lenses and history of the latest checkpoint of a run (as train() returns them),
    loaded into the model's exits of the same depths (attached first where the model lacks them)."""
    from balcony_ext.affine import new_affine_exits
    from balcony_ext.train import STATE_FILE

    state = torch.load(Path(run_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    depths = sorted({int(name.split(".", 1)[0]) for name in state["exits"]})
    if missing := [k for k in depths if k not in model.exits]:
        bx.attach(model, missing, init="last", norm_init="final")
    for k in depths:
        prefix = f"{k}."
        model.balconies[str(k)].load_state_dict({n[len(prefix):]: t for n, t in state["exits"].items()
                                                 if n.startswith(prefix)})
    model.tokens_trained = max(model.tokens_trained, state["tokens_trained"])
    model.last_loss = state["history"][-1]["loss"] if state["history"] else None
    affine = None
    if "affine" in state:
        affine = new_affine_exits(model, depths)
        for k, lens in affine.items():
            lens.load_state_dict(state["affine"][str(k)])
            lens.eval()
    print(f"checkpoint of {run_dir}: exits {depths}, step {state['step']} of {state['settings']['total_steps']}, "
          f"{state['tokens_trained']:,} tokens")
    return dict(history=state["history"], affine=affine, exits=depths, tokens=state["tokens_trained"])


def continued(path) -> dict:
    """What an exits file made by this script says of its training: tokens, recipe and runs."""
    from balcony_ext.exits_io import read_exits

    meta = read_exits(path)[1]
    extra = json.loads(meta.get("extra") or "{}")
    return dict(tokens=int(meta.get("tokens_trained") or 0), recipe=extra.get("recipe", "a recipe not recorded"),
                runs=list(extra.get("runs", [])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3_000_000)
    ap.add_argument("--exits", type=int, nargs="+", default=[15, 19, 23])
    ap.add_argument("--mix", nargs="+", default=["chat=0.7", "shakespeare=0.15", "python-docs=0.15"])
    ap.add_argument("--prompts", type=int, default=4000, help="chat instructions answered by the model")
    ap.add_argument("--written", type=int, default=0, metavar="N",
                    help="N more instructions written by the model itself (balcony_ext.written_questions)")
    ap.add_argument("--first", type=int, default=0, metavar="A",
                    help="leave out the template instructions before A (e.g. those the --from-exits run trained on)")
    ap.add_argument("--samples", type=int, default=1, metavar="K",
                    help="answers to each training instruction (the first as always, the others sampled)")
    ap.add_argument("--run-dir", default=os.path.join(os.environ.get("BALCONY_CACHE", Path.home() / ".cache" / "balcony_ext"),
                                                      "runs", "default-exits-chat"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=32_768, help="held-out tokens per text corpus")
    ap.add_argument("--chat-prompts", type=int, default=64, help="held-out instructions in the chat evaluation")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--from-checkpoint", action="store_true",
                    help="package and evaluate the latest checkpoint of --run-dir, train nothing")
    ap.add_argument("--out", default=str(bundled_exits_path()), help="where to write the packaged exits")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results" / "default_exits"))
    ap.add_argument("--from-exits", default=None, metavar="FILE",
                    help="continue training the exits of this file (e.g. the shipped one) instead of new ones")
    ap.add_argument("--vocab", type=int, default=None, metavar="N",
                    help="the KL over the shipped shortlist's first N tokens only (16384: a third of the head's "
                         "work per step, measured no worse: docs/results/capacity_pilots.md)")
    ap.add_argument("--no-affine", action="store_true",
                    help="do not train the learned affine exit beside the exits (half the head's work per step)")
    ap.add_argument("--add-run", nargs="+", default=[], metavar="RUN_DIR",
                    help="also package and evaluate the exits of these runs of this script (their last checkpoints)")
    args = ap.parse_args()

    model = bx.load(exits=None)
    before = None  # the continued file's tokens, recipe and runs
    if args.from_exits:  # (their depths replace --exits)
        bx.load_exits(model, args.from_exits)
        before = continued(args.from_exits)
        args.exits, model.tokens_trained = list(model.exits), 0
    else:
        bx.attach(model, args.exits, init="last", norm_init="final")
    chat, data = build_data(model, args)
    recipe = (f"{' '.join(args.mix)} ({args.prompts - args.first} instructions"
              + (f" from the {args.first}th" if args.first else "")
              + (f" and {args.written} written by the model" if args.written else "")
              + (f", {args.samples} answers each" if args.samples > 1 else "")
              + f"), bf16 autocast, lr {args.lr:g} cosine over {args.tokens:,} tokens, 1% warm-up, "
              f"{args.batch}x{args.seq} tokens per step, "
              + (f"continuing exits trained on {before['tokens']:,} tokens ({before['recipe']})" if before
                 else "init last, norm final")
              + (f", KL over the shortlist's first {args.vocab:,} tokens" if args.vocab else ""))
    if args.from_checkpoint:
        run = from_checkpoint(model, Path(args.run_dir))
    else:
        run = bx.train(model, data=data, tokens=args.tokens, batch_size=args.batch, seq_len=args.seq, bf16=True,
                       lr=args.lr, warmup=0.01, checkpoint_dir=args.run_dir, checkpoint_every=args.checkpoint_every,
                       affine_baseline=not args.no_affine, vocab=args.vocab)
    hist = run["history"]
    seconds = sum(h["step_s"] for h in hist)
    print(f"trained {model.tokens_trained:,} tokens in {seconds / 3600:.2f} h of steps")
    trained = model.tokens_trained  # (this run's tokens, as `seconds` is this run's)
    runs = [dict(exits=list(args.exits), tokens=trained, step_seconds=seconds)]
    if before:  # the runs before this one, and the exits' tokens in all
        runs = before["runs"] + [dict(runs[0], continued=True)]
        model.tokens_trained += before["tokens"]
    for other in args.add_run:  # exits of other runs (trained alone), beside these
        more = from_checkpoint(model, Path(other))
        runs.append(dict(exits=more["exits"], tokens=more["tokens"], step_seconds=sum(h["step_s"] for h in more["history"])))
        if run["affine"] is not None and more["affine"] is not None:
            run["affine"].update(more["affine"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bx.save_exits(model, out, dtype=torch.bfloat16, extra=dict(corpus=data.describe(), recipe=recipe, runs=runs))
    bx.load_exits(model, out)  # evaluate what users get: the exits as shipped (bf16 on disk, fp32 model)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = bx.evaluate(model, data="shakespeare", seq_len=args.seq, max_tokens=args.eval_tokens, affine=run["affine"],
                         chat_prompts=args.chat_prompts)
    docs = bx.evaluate(model, data="python-docs", seq_len=args.seq, max_tokens=args.eval_tokens, affine=run["affine"],
                       baselines=())
    # the exits' free answers again with the decoding `balcony demo` uses (DRY 0.8)
    from balcony_ext.chat_eval import evaluate_chat

    decoding = {"dry_multiplier": 0.8}
    penalised = evaluate_chat(model, prompts=args.chat_prompts, decoding=decoding, shortlisted=False)
    report.info["chat_free_answers_with"] = dict(decoding=decoding, rows={
        f"{key[0]}@{key[1]}": {f: v[f] for f in ("chat_rep4", "chat_prefix", "chat_f1")}
        for key, v in penalised.items() if isinstance(key, tuple) and key[0] != "full"})
    training = dict(tokens=trained, step_seconds=seconds, batch=args.batch, seq_len=args.seq,
                    recipe=recipe, chat_data=chat.describe(), final_loss_per_exit=hist[-1]["loss_per_exit"] if hist else None,
                    runs=runs)
    report.info["training"] = docs.info["training"] = training
    report.info["python_docs"] = {f"{r['method']}@{r['exit']}": r["perplexity"] for r in docs.rows}
    # a small sample the test suite re-evaluates with the shipped file (python_tests/test_loading.py)
    check = bx.evaluate(model, data="shakespeare", seq_len=args.seq, max_tokens=CHECK_TOKENS, baselines=(), progress=False)
    report.info["check"] = dict(data="shakespeare", seq_len=args.seq, max_tokens=CHECK_TOKENS,
                                perplexity={str(r["exit"]): r["perplexity"] for r in check.rows
                                            if "head" not in r})
    report.to_json(results.with_suffix(".json"))
    report.plot(results.with_suffix(".png"))
    docs.to_json(results.parent / (results.name + "_python_docs.json"))
    report.to_json(out.with_suffix(".eval.json"))
    print(report)
    print(docs)
    print(json.dumps(dict(exits=str(out), results=str(results.with_suffix(".json")), eval_s=round(time.time() - t0))))


if __name__ == "__main__":
    main()

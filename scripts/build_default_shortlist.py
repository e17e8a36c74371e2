"""Builds the vocabulary shortlist shipped for SmolLM2-135M-Instruct (balcony_ext/shortlist.py).

    .venv/bin/python scripts/build_default_shortlist.py [--sizes 32768 16384 8192 4096] [--prompts 4000]

The tokens are ranked by their frequency in the model's own answers to the training instructions of
the chat data (balcony_ext.chat_data: the cache scripts/train_default_exits.py builds; answered here if
missing), with Shakespeare's plays and the Python documentation at a small weight (they order the tokens
the answers never used); the end-of-sequence and special tokens rank first. The list is as long as the
largest size; every size is a head the budgets may buy. Coverage of each is measured on the answers to
the held-out instructions (never counted) and written with the file:
  balcony_ext/exits/smollm2-135m-instruct.shortlist.safetensors
"""

import argparse

import torch

import balcony_ext as bx
from balcony_ext.chat_data import chat_data
from balcony_ext.data import prepare
from balcony_ext.loading import bundled_shortlist_path
from balcony_ext.shortlist import build_shortlist, coverage, save_shortlist

HUMAN_WEIGHT = 0.01


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 16384, 8192, 4096])
    ap.add_argument("--prompts", type=int, default=4000)
    ap.add_argument("--out", default=str(bundled_shortlist_path()))
    args = ap.parse_args()

    model = bx.load(exits=None, shortlist=None, dtype=torch.bfloat16)
    chat = chat_data(model, prompts=args.prompts, batch_size=16)
    print(chat.describe())
    answers = [e.answer_ids for e in chat.train_examples]
    human = [prepare(name, model.tokenizer).train_ids for name in ("shakespeare", "python-docs")]
    ids = build_shortlist(model, [answers, human], size=max(args.sizes), weights=[1.0, HUMAN_WEIGHT])
    held = [t for e in chat.heldout_examples for t in e.answer_ids]
    figures = dict(sizes=sorted(args.sizes, reverse=True), vocab_size=model.adapter.vocab_size,
                   heldout_answer_tokens=len(held), train_answer_tokens=sum(len(a) for a in answers),
                   train_prompts=len(answers), human_text_weight=HUMAN_WEIGHT,
                   heldout_coverage={n: round(coverage(ids[:n], held), 4) for n in (1024, 2048, *args.sizes)})
    save_shortlist(model, args.out, ids, sizes=args.sizes, extra=figures)
    print(figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

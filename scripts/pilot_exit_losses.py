"""Pilots of the exits' loss and capacity: one shipped exit trained further on the same batches under
several objectives, each measured by the chat evaluation (teacher-forced agreement and KL on held-out
instructions). Recorded in docs/results/loss_pilots.json and .md.

    .venv/bin/python scripts/pilot_exit_losses.py --exit 15 --steps 200 --variants fkl rkl fkl+ce 2layer

Every variant starts from the shipped exit and sees the very same micro-batches (the shipped recipe's
mixture: 70% chat answers, 15% Shakespeare, 15% Python docs; 4 x 512 tokens), so the frozen model's
states are computed once and kept on disk (--cache-dir, about 7 MB per step). Variants:
  fkl      forward KL(p_full || p_exit), the shipped objective (the control)
  rkl      reverse KL(p_exit || p_full) (mode-seeking)
  fkl+ce   forward KL + 0.5 x cross-entropy on the full model's top token
  2layer   forward KL through the exit's layer followed by a second, new layer (a copy of the base's
           last layer whose output projections start at zero, so the exit starts as it was)
and two that start from nothing trained (the question: does capacity pay at equal tokens?):
  scratch1 a new one-layer exit as the shipped ones began (a copy of the base's last layer, the final norm)
  scratch2 a new two-layer exit: copies of the base's last two layers in their order, then the final norm
  scratch1-16k  scratch1 with the KL over the shipped shortlist's first 16,384 tokens only (teacher and
           exit renormalised there): a third of the head's work per step, the head most budgets buy
AdamW (betas 0.9 / 0.95), lr --lr with 1% warm-up and cosine decay, clipping at 1, bfloat16 autocast.
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import balcony_ext as bx
from balcony_ext.chat_data import chat_data
from balcony_ext.chat_eval import evaluate_chat
from balcony_ext.data import Mixture, prepare
from balcony_ext.files import atomic_write
from balcony_ext.train import lr_factor, micro_batch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "loss_pilots.json"
DATA_SEED = 7


def frozen_states(model, k: int, steps: int, path: Path) -> list:
    """[(hidden after k layers, the full model's normed final hidden at the learned positions, mask)] per step."""
    if path.exists():
        return torch.load(path)
    gen = bx.load(exits=None, dtype=torch.bfloat16)  # (the chat answers' cache is keyed by the bf16 model)
    chat = chat_data(gen, prompts=4000, generate_missing=False)
    del gen
    data = Mixture([(chat.corpus(), 0.7), (prepare("shakespeare", model.tokenizer), 0.15),
                    (prepare("python-docs", model.tokenizer), 0.15)])
    blocks, masks = data.train_blocks(512), data.train_mask_blocks(512)
    out = []
    for i in range(steps):
        ids, keep = micro_batch(blocks, i, 4, DATA_SEED), micro_batch(masks, i, 4, DATA_SEED)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden, final = model.frozen_forward(ids, [k])
        out.append((hidden[k].float(), final[keep].to(torch.bfloat16), keep))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(out, tmp))
    return out


def objective(variant: str, s_logits, t_logits):
    log_q, log_p = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    if variant in ("fkl", "2layer", "scratch1", "scratch2", "scratch1-16k"):
        return forward
    if variant == "rkl":
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    if variant == "fkl+ce":
        return forward + 0.5 * F.nll_loss(log_q, t_logits.argmax(-1))
    raise ValueError(f"unknown variant {variant!r}")


def run_variant(model, k: int, variant: str, states: list, lr: float, start: dict) -> dict:
    model.balconies.load_state_dict(start)
    a, ex = model.adapter, model.exit_module(k)
    kind = a.layer_type(a.num_layers - 1)
    extra = None
    params = model.balcony_parameters()
    if variant.startswith("scratch"):  # the exit as attach() builds it, trained from there
        fresh = model.build_exit(k)
        ex.layer.load_state_dict(fresh.layer.state_dict())
        ex.norm.load_state_dict(fresh.norm.state_dict())
    if variant in ("2layer", "scratch2"):
        extra = copy.deepcopy(a.layers[a.num_layers - 1])
        for name, p in extra.named_parameters():
            p.requires_grad_(True)
            if variant == "2layer" and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.data.zero_()
        if variant == "scratch2":  # the exit's own layer starts as the base's second-to-last
            ex.layer.load_state_dict(a.layers[a.num_layers - 2].state_dict())
        params = params + list(extra.parameters())

    def exit_hidden(h):
        if extra is None:
            return model.exit_hidden(k, h)
        ctx = a.context(h)
        return ex.norm(a.run_layer(extra, a.run_layer(ex.layer, h, ctx, kind), ctx, kind))

    head = a.lm_head.weight.to(torch.bfloat16)
    if variant.endswith("-16k"):
        head = head[model.shortlist[:16384].to(head.device)]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = len(states)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, max(1, steps // 100)))
    model.train()
    t0 = time.time()
    for h, teacher, keep in states:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s_logits = F.linear(exit_hidden(h)[keep].to(torch.bfloat16), head).float()
        with torch.no_grad():
            t_logits = F.linear(teacher, head).float()
        objective(variant, s_logits, t_logits).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.time() - t0
    model.eval()
    heads = {("pilot", k): (lambda hk: a.logits(exit_hidden(hk)))}
    short = variant.endswith("-16k")
    with torch.no_grad():
        rows = evaluate_chat(model, prompts=64, free=False, shortlisted=short, progress=False, heads=heads)
    r = rows[("pilot", k)]
    if short:  # (the exit trained in place is also the attached one: its top-1 with the 16k head)
        r["chat_top1_16k_head"] = rows[("short16k", k)]["chat_top1"]
    return dict(r, train_s=round(seconds))


def write_table(entry: dict, path: Path):
    lines = ["# Pilots of the exits' objective and capacity", "",
             f"Written by `scripts/pilot_exit_losses.py` (figures in `{path.with_suffix('.json').name}`): the "
             f"shipped exit {entry['exit']} (or a new one: scratch*) trained {entry['steps']} more steps ({entry['tokens']:,} tokens, lr {entry['lr']:g}, "
             "the same batches for every variant), then the chat evaluation's teacher-forced figures on "
             f"{entry['chat_prompts']} held-out instructions ({entry['machine']}).", "",
             "| variant | chat top-1 | chat KL | chat top-1, 16k head | training seconds |", "|---|---|---|---|---|"]
    for name, r in entry["variants"].items():
        short = f"{r['chat_top1_16k_head']:.4f}" if "chat_top1_16k_head" in r else ""
        lines.append(f"| {name} | {r['chat_top1']:.4f} | {r['chat_kl']:.3f} | {short} | {r.get('train_s', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exit", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--variants", nargs="+", default=["fkl", "rkl", "fkl+ce", "2layer"])
    ap.add_argument("--cache-dir", default=os.path.join(os.environ.get("BALCONY_CACHE", Path.home() / ".cache" /
                                                                       "balcony_ext"), "runs"))
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()

    model = bx.load()
    k = args.exit
    if k not in model.exits:
        raise SystemExit(f"--exit {k}: the shipped exits are {model.exits}")
    bx.detach(model, [j for j in model.exits if j != k])
    start = {n: t.clone() for n, t in model.balconies.state_dict().items()}
    states = frozen_states(model, k, args.steps, Path(args.cache_dir) / f"loss-pilot-states-{k}-{args.steps}.pt")
    results = Path(args.results)
    entry = dict(exit=k, steps=args.steps, tokens=args.steps * 4 * 512, lr=args.lr, chat_prompts=64,
                 machine=f"{bx.cpu_capability()}, threads: {torch.get_num_threads()}", variants={})
    if results.exists():  # the same pilot run before: its variants are kept, those run now replaced
        before = json.loads(results.read_text())
        if all(before.get(f) == entry[f] for f in ("exit", "steps", "tokens", "lr")):
            entry["variants"] = before["variants"]
    model.eval()
    entry["variants"]["start (no training)"] = evaluate_chat(model, prompts=64, free=False, shortlisted=False,
                                                             progress=False)[("balcony", k)]
    for v in args.variants:
        entry["variants"][v] = run_variant(model, k, v, states, args.lr, start)
        print(v, entry["variants"][v], flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(results, lambda tmp: Path(tmp).write_text(json.dumps(entry, indent=1)))
    write_table(entry, results.with_suffix(".md"))


if __name__ == "__main__":
    main()

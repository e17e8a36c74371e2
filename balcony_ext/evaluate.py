"""Evaluating exits on held-out text, against the full model and baselines at the same depths.

    report = bx.evaluate(model, data="shakespeare", max_tokens=20_000, json_path="eval.json",
                         plot_path="eval.png")
    print(report)

Per exit depth k and method, on the held-out documents of `data`:
  perplexity   exp(mean next-token cross-entropy)
  kl           mean KL(p_full || p_exit) per token
  top1         fraction of tokens where the exit's argmax equals the full model's
  rel_cost     parameters read per token (layers run + exit + LM head; the embedding lookup is
               excluded) relative to the full model; bytes are these times the element size
Methods: "balcony" (the attached, trained exit), "truncation" (the hidden state at depth k
straight into the final norm and LM head), "untrained" (a fresh exit built with the same init;
a "random" init uses seed 0), "affine" (a learned H x H linear map + norm per depth, trained with
the same loss on the training split: the tuned lens; only when affine_tokens > 0), and "full".
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F

from .checks import check_flag, check_path
from .data import check_heldout, prepare
from .files import atomic_write
from .affine import AffineExit, new_affine_exits
from .budgets import costs, head_cost
from .shortlist import shortlisted_heads
from .train import distill_loss_for, lr_factor, micro_batch


def train_affine(model, corpus, depths, tokens: int, seq_len: int, batch_size: int, lr: float = 1e-3,
                 seed: int = 0, progress: bool = True) -> dict:
    """Fits one AffineExit per depth with the same self-distillation loss as the balcony layers.
    (train(..., affine_baseline=True) instead trains them beside the exits on the same batches.)"""
    from tqdm.auto import tqdm

    a = model.adapter
    lenses = new_affine_exits(model, depths)
    loss = distill_loss_for(model)
    params = [p for l in lenses.values() for p in l.parameters()]
    blocks = corpus.train_blocks(seq_len)
    steps = max(1, math.ceil(tokens / (batch_size * seq_len)))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, max(1, steps // 100)))
    for step in tqdm(range(steps), desc="training affine exits", disable=not progress):
        ids = micro_batch(blocks, step, batch_size, seed + 7).to(model.device)
        hidden, teacher = model.frozen_forward(ids, depths)
        for k, lens in lenses.items():
            (loss(lens(hidden[k]), a.lm_head.weight, teacher) / len(lenses)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return lenses


class Report:
    """Evaluation rows with a printable table, JSON and a perplexity-vs-cost plot."""

    COLUMNS = ("method", "exit", "perplexity", "kl", "top1", "rel_cost", "bytes_per_token")

    def __init__(self, rows: list, info: dict):
        self.rows = rows
        self.info = info

    def row(self, method: str, exit: int | None = None) -> dict:
        for r in self.rows:
            if r["method"] == method and (exit is None or r["exit"] == exit):
                return r
        raise KeyError((method, exit))

    CHAT = (("chat_top1", "chat top-1", ".3f"), ("chat_kl", "chat KL", ".3f"), ("chat_rep4", "rep 4-gram", ".3f"),
            ("chat_prefix", "prefix", ".1f"), ("chat_f1", "F1", ".3f"))

    def __str__(self) -> str:
        chat = [c for c in self.CHAT if any(c[0] in r for r in self.rows)]
        head = f"{'method':<11}{'exit':>5}{'perplexity':>13}{'KL':>9}{'top-1':>8}{'rel cost':>10}"
        head += "".join(f"{title:>12}" for _, title, _ in chat)
        lines = [f"held-out: {self.info.get('corpus', '')}; {self.info.get('tokens', 0):,} tokens", head, "-" * len(head)]
        if chat:
            lines.insert(1, f"chat: {self.info.get('chat_prompts')} held-out instructions, "
                            f"{self.info.get('chat_answer_tokens', 0):,} answer tokens of the full model")
        for r in self.rows:
            ppl, kl = r["perplexity"], r["kl"]
            ppl = f"{'-':>13}" if ppl is None else f"{ppl:>13.2f}" if ppl < 1e7 else f"{ppl:>13.3e}"
            kl = f"{'-':>9}" if kl is None else f"{kl:>9.3f}"
            line = f"{r['method']:<11}{r['exit']:>5}{ppl}{kl}{r['top1']:>8.3f}{r['rel_cost']:>10.3f}"
            line += "".join(f"{r[key]:>12{fmt}}" if r.get(key) is not None else f"{'':>12}" for key, _, fmt in chat)
            lines.append(line)
        return "\n".join(lines)

    __repr__ = __str__

    def to_json(self, path) -> Path:
        blob = json.dumps(dict(info=self.info, rows=self.rows), indent=2)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(blob))
        return Path(path)

    def plot(self, path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chat = any("chat_top1" in r for r in self.rows)
        fig, axes = plt.subplots(1, 2 if chat else 1, figsize=(11 if chat else 6, 4), squeeze=False)
        panels = [("perplexity", "held-out perplexity", True)] + ([("chat_top1", "chat top-1 agreement with the full "
                                                                     "model", False)] if chat else [])
        full = self.row("full")
        methods = list(dict.fromkeys(r["method"] for r in self.rows if r["method"] != "full"))
        colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # (a method keeps its colour in every panel)
        for ax, (key, label, log) in zip(axes[0], panels):
            for method in methods:
                pts = sorted((r["rel_cost"], r[key]) for r in self.rows
                             if r["method"] == method and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method, color=colors[method])
            ax.scatter([full["rel_cost"]], [full[key]], marker="*", s=150, color="k", label="full model", zorder=3)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("relative per-token cost (parameters read)")
            ax.set_ylabel(label)
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_title(self.info.get("model", ""))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def check_affine(model, affine) -> None:
    """affine: None or trained affine exits {depth: AffineExit} for every attached exit (as
    train(..., affine_baseline=True) returns them); raises naming what is wrong."""
    if affine is None:
        return
    if not isinstance(affine, dict):
        raise ValueError(f"affine must be a dict {{depth: AffineExit}} (train(..., affine_baseline=True) returns "
                         f"one) or None, got {type(affine).__name__} {affine!r:.80}")
    bad = {k: v for k, v in affine.items() if not isinstance(v, AffineExit)}
    if bad:
        k, v = next(iter(bad.items()))
        raise ValueError(f"affine maps each exit depth to an AffineExit (train(..., affine_baseline=True) returns "
                         f"them), got {type(v).__name__} {v!r:.80} at depth {k!r}")
    missing = [k for k in model.exits if k not in affine]
    if missing:
        raise ValueError(f"affine exits given for depths {sorted(affine, key=str)}, missing {missing}")
    width = model.adapter.hidden_size
    wrong = [k for k, v in affine.items() if v.proj.in_features != width]
    if wrong:
        raise ValueError(f"the affine exit at depth {wrong[0]} maps width {affine[wrong[0]].proj.in_features}, "
                         f"not this model's hidden size {width}: it belongs to another model")


@torch.no_grad()
def evaluate(model, data="shakespeare", seq_len: int = 512, batch_size: int = 2, max_tokens: int | None = None,
             baselines=("truncation", "untrained"), affine_tokens: int = 0, affine: dict | None = None,
             heldout: float = 0.05, seed: int = 0, chat_prompts: int = 0, chat_max_new_tokens: int = 128,
             json_path=None, plot_path=None, progress: bool = True) -> Report:
    """Evaluates every attached exit (and baselines at the same depths) against the full model on
    the held-out split of `data` (the same split train() uses for the same data, heldout and seed).
    affine: trained affine exits {depth: AffineExit} (train(..., affine_baseline=True) returns
    them); otherwise affine_tokens > 0 trains them here first.
    chat_prompts > 0 adds the chat evaluation (chat_eval.evaluate_chat) on that many held-out
    instructions: chat_top1 / chat_kl along the full model's answers for every method with an
    exit module or a lens, and for the balcony exits their free answers' chat_rep4 / chat_prefix /
    chat_f1. With a vocabulary shortlist attached, rows of methods "short16k" etc. (shortlist.head_method)
    are the routes with each shortlisted head the shortlist offers, at every exit and the full depth
    (their `head`: its size): top-1 agreement (perplexity and KL have no finite value where the next
    token is off the head: None) and their chat figures."""
    from tqdm.auto import tqdm

    if not model.exits:
        raise ValueError("the model has no exits to evaluate; attach() or load_exits() first")
    count = lambda x, low: isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low  # noqa: E731
    for name, v, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("affine_tokens", affine_tokens, 0),
                         ("chat_prompts", chat_prompts, 0), ("chat_max_new_tokens", chat_max_new_tokens, 1)):
        if not count(v, low):
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if max_tokens is not None and not count(max_tokens, 1):
        raise ValueError(f"max_tokens must be a positive int or None (all the held-out text), got {max_tokens!r}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise ValueError(f"seq_len={seq_len} is past the model's {positions} positions (max_position_embeddings)")
    if isinstance(baselines, str):
        raise ValueError(f"baselines must be a list of 'truncation' / 'untrained', got the string {baselines!r}")
    for b in baselines:
        if b not in ("truncation", "untrained"):
            raise ValueError(f"unknown baseline {b!r}; choose from 'truncation', 'untrained'")
    check_affine(model, affine)
    check_flag("progress", progress)
    check_path("json_path", json_path, none="no JSON file")
    check_path("plot_path", plot_path, none="no plot")
    check_heldout(data, heldout)
    corpus = prepare(data, model.tokenizer, heldout=heldout, seed=seed, model=model)
    # about max_tokens of held-out text, spread over the held-out documents; the loss mask says
    # which positions count (a chat corpus: the answers)
    blocks, masks = corpus.heldout_sample(seq_len, max_tokens)
    if blocks.shape[0] == 0:
        raise ValueError(f"the held-out text has fewer than seq_len={seq_len} tokens; use a shorter seq_len")
    exits = model.exits
    a = model.adapter
    heads = {("balcony", k): (lambda h, k=k: a.logits(model.exit_hidden(k, h))) for k in exits}
    if "truncation" in baselines:
        heads.update({("truncation", k): (lambda h: model.truncated_logits(h)) for k in exits})
    if "untrained" in baselines:
        fresh = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for k in exits:
                ex = model.exit_module(k)
                fresh[k] = model.build_exit(k, ex.init, ex.norm_init).eval()
        heads.update({("untrained", k): (lambda h, k=k: a.logits(model.exit_hidden(k, h, module=fresh[k])))
                      for k in exits})
    if affine is not None:
        lenses = affine
        for l in lenses.values():
            l.eval()
        heads.update({("affine", k): (lambda h, k=k: a.logits(lenses[k](h))) for k in exits})
    elif affine_tokens:
        with torch.enable_grad():
            lenses = train_affine(model, corpus, exits, affine_tokens, seq_len, batch_size, seed=seed, progress=progress)
        for l in lenses.values():
            l.eval()
        heads.update({("affine", k): (lambda h, k=k: a.logits(lenses[k](h))) for k in exits})

    L = model.num_layers
    off = shortlisted_heads(model)  # {method: True for the tokens off that head}
    for name, o in off.items():  # the routes with a shortlisted head: -inf off it
        heads.update({(name, k): (lambda h, k=k, o=o: a.logits(model.exit_hidden(k, h)).masked_fill(o, -math.inf))
                      for k in exits})
    sums = {key: dict(ce=0.0, kl=0.0, top1=0.0) for key in [("full", L)] + list(heads) + [(n, L) for n in off]}
    n_tokens = 0
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc="evaluating", disable=not progress):
        ids = blocks[i:i + batch_size].to(model.device)
        keep = masks[i:i + batch_size, :-1].to(model.device)
        targets = ids[:, 1:][keep]
        hidden, final = model.frozen_forward(ids, exits)
        log_p = F.log_softmax(a.logits(final[:, :-1][keep]).float(), -1)
        top_p = log_p.argmax(-1)
        n_tokens += targets.numel()
        sums[("full", model.num_layers)]["ce"] += F.nll_loss(log_p, targets, reduction="sum").item()
        sums[("full", model.num_layers)]["top1"] += targets.numel()
        for name, o in off.items():
            sums[(name, L)]["top1"] += (log_p.masked_fill(o, -math.inf).argmax(-1) == top_p).sum().item()
        exit_logits = {}  # the balcony exits' logits of this batch, which their shortlisted heads mask
        for (method, k), fn in heads.items():
            if method in off:  # agreement only
                lg = exit_logits[k].masked_fill(off[method], -math.inf) if k in exit_logits else fn(hidden[k])
                sums[(method, k)]["top1"] += (lg[:, :-1][keep].argmax(-1) == top_p).sum().item()
                continue
            logits = fn(hidden[k])
            if method == "balcony":
                exit_logits[k] = logits
            log_q = F.log_softmax(logits[:, :-1][keep].float(), -1)
            s = sums[(method, k)]
            s["ce"] += F.nll_loss(log_q, targets, reduction="sum").item()
            s["kl"] += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            s["top1"] += (log_q.argmax(-1) == top_p).sum().item()
            del log_q
    model.train(was_training)

    cost = costs(model)
    elem = a.lm_head.weight.element_size()
    rows = []
    for (method, k), s in sums.items():
        listed = off.get(method) is not None
        if listed:
            n = int((~off[method]).sum())
            c = (cost[("balcony", k)] if k < L else cost["full"]) * head_cost(model, k, n)
        else:
            c = cost["full"] if method == "full" else cost[(method, k)]
        rows.append(dict(method=method, exit=k, perplexity=None if listed else math.exp(s["ce"] / n_tokens),
                         kl=None if listed else s["kl"] / n_tokens, top1=s["top1"] / n_tokens,
                         rel_cost=c / cost["full"], params_per_token=c, bytes_per_token=c * elem,
                         **({"head": n} if listed else {})))
    if chat_prompts:
        from .chat_eval import evaluate_chat

        extra = {key: fn for key, fn in heads.items() if key[0] != "balcony" and key[0] not in off}
        chat = evaluate_chat(model, prompts=chat_prompts, max_new_tokens=chat_max_new_tokens, heads=extra,
                             seed=seed, progress=progress)
        for r in rows:
            r.update(chat.get((r["method"], r["exit"]), {}))
    order = {"full": 0, "balcony": 1, "affine": 3, "untrained": 4, "truncation": 5}
    rows.sort(key=lambda r: (order.get(r["method"], 2), -r.get("head", 0), r["exit"]))
    info = dict(model=model.name, corpus=corpus.describe(), heldout_documents=corpus.heldout_docs, tokens=n_tokens,
                seq_len=seq_len, exits=exits, tokens_trained=model.tokens_trained, affine_tokens=affine_tokens,
                **(chat["_info"] if chat_prompts else {}),
                cost_note="parameters read per token: layers run + exit + LM head, embedding lookup excluded")
    report = Report(rows, info)
    if json_path is not None:
        report.to_json(json_path)
    if plot_path is not None:
        report.plot(plot_path)
    return report

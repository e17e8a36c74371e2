"""Chat evaluation: how well each exit imitates the full model where an instruct model is used.

    rows = evaluate_chat(model, prompts=64)      # {("balcony", k): {...}, ("full", L): {...}}

On instructions held out by prompt (never trained: the held-out split of chat_data), the full
model answers greedily. Per exit, then:
  chat_top1   teacher-forced along the full model's answer: the share of answer tokens where the
              exit's argmax equals the full model's (the full model's own greedy choice)
  chat_kl     mean KL(p_full || p_exit) per answer token, teacher-forced likewise
and each exit answers the same prompts freely (greedy):
  chat_rep4   the share of the answer's 4-grams that already occurred earlier in the same answer
              (loops; the full model's own figure is the yardstick)
  chat_prefix mean number of leading tokens equal to the full model's answer
  chat_f1     token F1 between the exit's answer and the full model's (bags of token ids)
With a vocabulary shortlist attached (shortlist.py), the same figures for the routes with each
shortlisted head it offers, at every exit and at the full depth, under (shortlist.head_method(n), k)
(no KL: a shortlisted head gives the tokens off it no probability).
"""

from __future__ import annotations

from collections import Counter

from .shortlist import shortlisted_heads

import torch
import torch.nn.functional as F


def repeated_ngram_share(tokens: list, n: int = 4) -> float:
    """The share of the n-grams of `tokens` that already occurred earlier in it (0 for < n + 1 tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_f1(pred: list, ref: list) -> float:
    if not pred and not ref:
        return 1.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    p, r = overlap / len(pred), overlap / len(ref)
    return 2 * p * r / (p + r)


def heldout_instructions(prompts: int, n_instructions: int = 4000, heldout: float = 0.05, seed: int = 0) -> list:
    """The first `prompts` held-out instruction texts of the chat data split (the instructions that
    chat_data(..., prompts=n_instructions, heldout=heldout, seed=seed) never trains on)."""
    from .data import split_by_document
    from .instructions import build_instructions

    texts = [i.text for i in build_instructions(n_instructions, seed)]
    held = split_by_document(texts, heldout, seed)
    out = [t for t in texts if t in held][:prompts]
    if len(out) < prompts:
        raise ValueError(f"only {len(out)} held-out instructions among {n_instructions}; ask for fewer prompts "
                         "or more instructions")
    return out


def _strip_stop(tokens: list, stop_ids: set) -> list:
    return tokens[:-1] if tokens and tokens[-1] in stop_ids else list(tokens)


@torch.no_grad()
def evaluate_chat(model, prompts: int | list = 64, max_new_tokens: int = 128, batch_size: int = 16, heads=None,
                  free: bool = True, n_instructions: int = 4000, seed: int = 0, progress: bool = True,
                  decoding: dict | None = None, shortlisted: bool = True) -> dict:
    """Chat figures per exit (see the module docstring). prompts: how many held-out instructions,
    or the instruction texts themselves. heads: extra teacher-forced-only methods {(method, k):
    fn(hidden_k) -> logits} (e.g. affine exits). decoding: generate() options for the exits' free
    answers (e.g. {"frequency_penalty": 0.5}; the full model's reference answers stay greedy).
    shortlisted=False leaves out the routes with shortlisted heads.
    Returns {(method, k): {figures}}, the full model under ("full", num_layers) with its own chat_rep4."""
    from tqdm.auto import tqdm

    from .generate import stop_token_ids, encode_prompt, generate

    if model.tokenizer is None:
        raise ValueError("the chat evaluation needs the model's tokenizer")
    texts = heldout_instructions(prompts, n_instructions, seed=seed) if isinstance(prompts, int) else list(prompts)
    L = model.num_layers
    stop = stop_token_ids(model)
    ids = [encode_prompt(model.tokenizer, t, chat=True) for t in texts]
    chunks = [list(range(i, min(i + batch_size, len(ids)))) for i in range(0, len(ids), batch_size)]
    off = shortlisted_heads(model) if shortlisted else {}  # {method: True for the tokens off that head}
    sizes = {name: int((~o).sum()) for name, o in off.items()}
    routes = [("balcony", k) for k in model.exits] + [(name, k) for name in off for k in model.exits + [L]]
    steps = len(chunks) * (2 + (len(routes) if free else 0))
    bar = tqdm(total=steps, desc="chat evaluation", disable=not progress)

    def answers(k, **kw):
        out = []
        for rows in chunks:
            res = generate(model, [ids[i] for i in rows], exit_layer=k, max_new_tokens=max_new_tokens,
                           calibration=None, **kw)
            out += [r.tokens for r in res]
            bar.update(1)
        return out

    full = answers(L)
    a = model.adapter
    methods = {("balcony", k): (lambda h, k=k: a.logits(model.exit_hidden(k, h))) for k in model.exits}
    methods.update(heads or {})
    short_top1 = {(name, k): 0 for name in off for k in model.exits + [L]}
    sums = {key: dict(top1=0.0, kl=0.0) for key in methods}
    n_answer = 0
    was_training = model.training
    model.eval()
    pad = next(iter(stop)) if stop else 0
    for rows in chunks:  # teacher-forced along the full model's answers (right padding: causal)
        seqs = [ids[i] + full[i] for i in rows]
        T = max(map(len, seqs))
        batch = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, i in enumerate(rows):
            batch[r, :len(seqs[r])] = torch.tensor(seqs[r])
            m, n = len(ids[i]), len(full[i])
            mask[r, m - 1:m + n - 1] = True  # the positions that predict the answer's tokens
        batch, mask = batch.to(model.device), mask.to(model.device)
        depths = sorted({k for _, k in methods})
        hidden, final = model.frozen_forward(batch, depths)
        log_p = F.log_softmax(a.logits(final[mask]).float(), -1)
        top_p = log_p.argmax(-1)
        n_answer += int(mask.sum())
        for name, o in off.items():
            short_top1[(name, L)] += (log_p.masked_fill(o, -float("inf")).argmax(-1) == top_p).sum().item()
        for (method, k), fn in methods.items():
            log_q = F.log_softmax(fn(hidden[k])[mask].float(), -1)
            sums[(method, k)]["top1"] += (log_q.argmax(-1) == top_p).sum().item()
            if method == "balcony":
                for name, o in off.items():
                    short_top1[(name, k)] += (log_q.masked_fill(o, -float("inf")).argmax(-1) == top_p).sum().item()
            sums[(method, k)]["kl"] += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        bar.update(1)
    model.train(was_training)

    ref = [_strip_stop(t, stop) for t in full]
    out = {("full", L): dict(chat_top1=1.0, chat_kl=0.0, chat_rep4=sum(map(repeated_ngram_share, ref)) / len(ref),
                             chat_prefix=sum(map(len, ref)) / len(ref), chat_f1=1.0)}
    for key, s in sums.items():
        out[key] = dict(chat_top1=s["top1"] / max(1, n_answer), chat_kl=s["kl"] / max(1, n_answer))
    for key, n in short_top1.items():
        out[key] = dict(chat_top1=n / max(1, n_answer), chat_kl=None)
    if free:
        for method, k in routes:
            got = [_strip_stop(t, stop) for t in answers(k, **(decoding or {}), shortlist=sizes.get(method, 0))]
            out[(method, k)].update(
                chat_rep4=sum(map(repeated_ngram_share, got)) / len(got),
                chat_prefix=sum(common_prefix(g, r) for g, r in zip(got, ref)) / len(got),
                chat_f1=sum(token_f1(g, r) for g, r in zip(got, ref)) / len(got))
    bar.close()
    out["_info"] = dict(chat_prompts=len(texts), chat_answer_tokens=n_answer, chat_max_new_tokens=max_new_tokens,
                        **({"chat_decoding": dict(decoding)} if decoding else {}))
    return out

"""Prints the README's tables of the shipped exits from the results that train_default_exits.py writes.

    .venv/bin/python scripts/exits_table.py [docs/results/default_exits]

Reads RESULTS.json (held-out Shakespeare and the chat evaluation, with the shortlisted-head routes) and
RESULTS_python_docs.json (held-out Python documentation), and prints two Markdown tables: per exit
(relative cost, chat top-1 and KL with the affine exit's beside them, repeated 4-grams and token F1 of
the free answers greedy / with the decoding `balcony demo` uses, perplexity ratios to the full model), and per
route with a shortlisted head. A results file without some figure prints "-" there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rows(results: dict) -> dict:
    return {(r["method"], r["exit"]): r for r in results["rows"]}


def decoding_name(decoding: dict) -> str:
    """How the README names the second decoding of the free answers ("DRY 0.8", "freq. pen. 0.3")."""
    names = {"dry_multiplier": "DRY", "frequency_penalty": "freq. pen.", "presence_penalty": "pres. pen."}
    return " + ".join(f"{names.get(k, k)} {v:g}" for k, v in decoding.items()) or "-"


def exits_table(results: dict, docs: dict | None) -> str:
    rows, drows = _rows(results), _rows(docs) if docs else {}
    info = results["info"]
    depth = max(info["exits"] + [r["exit"] for r in results["rows"]])
    pen = info.get("chat_free_answers_with", {}).get("rows", {})
    used = decoding_name(info.get("chat_free_answers_with", {}).get("decoding", {}))
    full, dfull = rows[("full", depth)], drows.get(("full", depth), {})
    out = [f"| exit | relative cost | chat top-1 (affine) | chat KL (affine) | repeated 4-grams, greedy / {used} "
           f"| token F1, greedy / {used} | Shakespeare ppl (x full) | Python docs ppl (x full) "
           "| affine ppl, Shakespeare / docs |", "|---|---|---|---|---|---|---|---|---|"]
    for k in info["exits"]:
        b, a = rows[("balcony", k)], rows.get(("affine", k), {})
        p, db, da = pen.get(f"balcony@{k}", {}), drows.get(("balcony", k), {}), drows.get(("affine", k), {})
        ratio = lambda x, f: "-" if x is None or f is None else f"{x:.1f} ({x / f:.2f})"  # noqa: E731
        out.append(f"| {k} | {b['rel_cost']:.2f} | **{_f(b.get('chat_top1'))}** ({_f(a.get('chat_top1'))}) "
                   f"| **{_f(b.get('chat_kl'), 2)}** ({_f(a.get('chat_kl'), 2)}) "
                   f"| {_f(b.get('chat_rep4'))} / {_f(p.get('chat_rep4'))} | {_f(b.get('chat_f1'))} / {_f(p.get('chat_f1'))} "
                   f"| {ratio(b['perplexity'], full['perplexity'])} "
                   f"| {ratio(db.get('perplexity'), dfull.get('perplexity'))} "
                   f"| {_f(a.get('perplexity'), 1)} / {_f(da.get('perplexity'), 1)} |")
    out.append(f"| {depth} (full) | 1 | 1 | 0 | {_f(full.get('chat_rep4'))} | 1 | {full['perplexity']:.1f} "
               f"| {_f(dfull.get('perplexity'), 1)} | |")
    return "\n".join(out)


def routes_table(results: dict) -> str:
    rows = _rows(results)
    heads = sorted({r["head"] for r in results["rows"] if "head" in r}, reverse=True)
    if not heads:
        return ""
    depth = max(r["exit"] for r in results["rows"])
    names = " / ".join(f"{h // 1024}k" for h in heads)
    out = ["| route | relative cost | chat top-1 | repeated 4-grams | tokens equal to the full answer's, from the start "
           "| token F1 |", "|---|---|---|---|---|---|"]
    for h in heads:
        r = rows[(f"short{h // 1024}k", depth)]
        out.append(f"| full depth, {h // 1024}k head | {r['rel_cost']:.2f} | **{_f(r['chat_top1'])}** "
                   f"| {_f(r['chat_rep4'])} | {r['chat_prefix']:.1f} | **{_f(r['chat_f1'])}** |")
    for k in reversed(results["info"]["exits"]):
        rs = [rows[(f"short{h // 1024}k", k)] for h in heads]
        col = lambda key, d=3: " / ".join(_f(r[key], d) for r in rs)  # noqa: E731
        out.append(f"| exit {k}, {names} head | {col('rel_cost', 2)} | {col('chat_top1')} | {col('chat_rep4')} "
                   f"| {col('chat_prefix', 1)} | {col('chat_f1')} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", default=str(ROOT / "docs" / "results" / "default_exits"),
                    help="the results path without .json (as train_default_exits.py --results)")
    args = ap.parse_args()
    base = Path(args.results)
    results = json.loads(base.with_suffix(".json").read_text())
    docs_path = base.with_name(base.name + "_python_docs.json")
    docs = json.loads(docs_path.read_text()) if docs_path.exists() else None
    info = results["info"]
    print(f"{info['model']}: exits {info['exits']}, {info.get('tokens_trained', 0):,} tokens trained; "
          f"{info.get('chat_prompts')} held-out instructions ({info.get('chat_answer_tokens')} answer tokens)\n")
    print(exits_table(results, docs))
    print()
    print(routes_table(results))


if __name__ == "__main__":
    main()

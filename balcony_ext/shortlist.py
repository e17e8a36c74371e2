"""A vocabulary shortlist for the LM head: cheaper heads at budgets below 1.

The LM head reads one row per vocabulary token for every generated token: for SmolLM2-135M (49,152
tokens x 576) that is 23% of a full-depth step's weights and more of an exit's. A model answering
everyday instructions uses far fewer tokens: the 16,384 most frequent tokens of its own answers cover
99.0% of the answer tokens of held-out instructions. A shortlist is a ranking of tokens, most frequent
first; any leading part of it is a head: "the first n tokens" has logits equal to the full head's on
those tokens and -inf elsewhere (so sampling, penalties and stop tokens work unchanged), at n / vocab
of the head's cost. The shortlist offers a few sizes (`sizes`, nested), and the budgets (budgets.py)
buy a route: a depth and a head, the full one or one of those sizes.

    ids = build_shortlist(model, [answers_ids, ...], size=32768)      # most frequent first, specials first
    set_shortlist(model, ids, sizes=[32768, 16384, 8192, 4096])       # or bx.load(shortlist=path)
    save_shortlist(model, "shortlist.safetensors"); load_shortlist(model, path)

A shortlist file is a safetensors file of the ranked token ids (int32) with metadata naming the sizes
offered and the vocabulary it belongs to (its size and a hash of the tokenizer's token strings).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checks import check_path
from .files import atomic_write

FORMAT = "balcony_shortlist"
FORMAT_VERSION = "1"
MIN_DEFAULT_SIZE = 2048


class ShortlistFileError(ValueError):
    """The shortlist file is damaged, of an unknown format, or belongs to another vocabulary."""


def vocab_hash(model) -> str:
    """sha256 of the tokenizer's token strings in id order (or of the vocabulary size without one)."""
    tok = model.tokenizer
    V = model.adapter.vocab_size
    h = hashlib.sha256(str(V).encode())
    if tok is not None:
        vocab = tok.get_vocab()
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        h.update(json.dumps([t for t, _ in by_id], ensure_ascii=False).encode())
    return h.hexdigest()


def always_kept(model) -> list:
    """Token ids every head of a shortlist holds: the end-of-sequence tokens and the tokenizer's special
    tokens (a sequence must be able to stop, and the chat template's markers stay reachable)."""
    from .generate import stop_token_ids

    ids = set(stop_token_ids(model))
    tok = model.tokenizer
    if tok is not None:
        ids.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    V = model.adapter.vocab_size
    return sorted(i for i in ids if 0 <= i < V)


def default_sizes(n: int) -> list:
    """The sizes offered by default for a shortlist of n tokens: n, n/2, n/4, ... down to 2048."""
    out = [n]
    while out[-1] // 2 >= MIN_DEFAULT_SIZE:
        out.append(out[-1] // 2)
    return out


def check_shortlist(model, ids, sizes=None) -> tuple:
    """(ids as int64 in their rank order, sizes sorted largest first); raises naming the problem.
    sizes: the head sizes offered (default: default_sizes); each must hold the always-kept tokens."""
    V = model.adapter.vocab_size
    t = torch.as_tensor(ids)
    if t.numel() == 0:
        raise ValueError("the shortlist is empty")
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"a shortlist must be a 1-D sequence of token ids, got {t.dim()}-D {t.dtype}")
    t = t.to(torch.long)
    if int(t.min()) < 0 or int(t.max()) >= V:
        bad = int(t[(t < 0) | (t >= V)][0])
        raise ValueError(f"shortlist token {bad} is outside the vocabulary (ids 0..{V - 1})")
    srt = torch.sort(t).values
    if srt.numel() > 1 and bool((srt[1:] == srt[:-1]).any()):
        raise ValueError(f"the shortlist repeats token {int(srt[1:][srt[1:] == srt[:-1]][0])}")
    N = t.numel()
    if N >= V:
        raise ValueError(f"a shortlist of {N} tokens is the whole vocabulary ({V}); it would save nothing")
    sizes = default_sizes(N) if sizes is None else list(sizes)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= N for n in sizes):
        raise ValueError(f"sizes must be ints in 1..{N} (the shortlist's length), got {sizes!r}")
    sizes = sorted(set(sizes), reverse=True)
    keep = set(always_kept(model))
    missing = sorted(keep - set(t[:sizes[-1]].tolist()))
    if missing:
        raise ValueError(f"the first {sizes[-1]} tokens of the shortlist lack end-of-sequence / special tokens "
                         f"{missing[:8]}: generation could not stop; build_shortlist ranks them first")
    return t, sizes


def set_shortlist(model, ids, sizes=None):
    """Attaches a shortlist (token ids, most frequent first) offering `sizes` (see check_shortlist), or
    removes it (ids None). Returns the model."""
    if ids is None:
        model.shortlist, model.shortlist_sizes = None, []
    else:
        model.shortlist, model.shortlist_sizes = check_shortlist(model, ids, sizes)
    model._engine_weights = None  # the engine's head rows are rebuilt
    return model


def build_shortlist(model, sources, size: int = 16384, weights=None) -> torch.Tensor:
    """The `size` most frequent tokens over `sources` (each an iterable of token-id sequences: lists
    or 1-D tensors), mixed by `weights` (a token's score: the sum over sources of weight x its frequency
    there; default 1 each; ties go to lower ids), ranked: the end-of-sequence and special tokens first,
    then the most frequent. int64 ids in rank order."""
    V = model.adapter.vocab_size
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < V:
        raise ValueError(f"size must be an int in 1..{V - 1} (the vocabulary has {V} tokens), got {size!r}")
    sources = list(sources)
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources) or any(not float(w) > 0 for w in weights):
        raise ValueError(f"weights must be one positive number per source, got {weights!r} for {len(sources)}")
    score = torch.zeros(V, dtype=torch.float64)
    for n, (src, w) in enumerate(zip(sources, weights)):
        counts = torch.zeros(V, dtype=torch.float64)
        for seq in src:
            seq = torch.as_tensor(seq, dtype=torch.long).reshape(-1)
            if seq.numel():
                if int(seq.min()) < 0 or int(seq.max()) >= V:
                    raise ValueError(f"source {n} holds token ids outside the vocabulary (0..{V - 1})")
                counts += torch.bincount(seq, minlength=V).double()
        if counts.sum() > 0:
            score += counts / counts.sum() * float(w)
    keep = always_kept(model)
    score[keep] = float("inf")
    order = torch.sort(score, descending=True, stable=True).indices  # (stable: ties go to lower ids)
    return order[:max(size, len(keep))].clone()


def head_method(n: int) -> str:
    """The evaluation's method name of a head of the first n shortlisted tokens ("short16k")."""
    return f"short{n // 1024}k" if n % 1024 == 0 else f"short{n}"


def shortlisted_heads(model) -> dict:
    """{method name: bool mask [V], True for the tokens off that head} for every head size the model's
    shortlist offers (none without a shortlist)."""
    if getattr(model, "shortlist", None) is None:
        return {}
    out = {}
    for n in model.shortlist_sizes:
        off = torch.ones(model.adapter.vocab_size, dtype=torch.bool, device=model.device)
        off[model.shortlist[:n].to(model.device)] = False
        out[head_method(n)] = off
    return out


def coverage(ids, tokens) -> float:
    """The share of `tokens` (token ids) that the shortlist `ids` (or a leading part of it) holds."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() == 0:
        return float("nan")
    ids = torch.as_tensor(ids, dtype=torch.long)
    mask = torch.zeros(int(max(int(ids.max()), int(tokens.max()))) + 1, dtype=torch.bool)
    mask[ids] = True
    return float(mask[tokens].float().mean())


def save_shortlist(model, path, ids=None, sizes=None, extra: dict | None = None) -> Path:
    """Writes the model's shortlist (or `ids` offering `sizes`) to `path`, atomically."""
    from safetensors.torch import save_file

    check_path("path", path)
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict (saved as JSON metadata) or None, got {type(extra).__name__}")
    if ids is None:
        if model.shortlist is None:
            raise ValueError("the model has no shortlist to save")
        ids, sizes = model.shortlist, model.shortlist_sizes if sizes is None else sizes
    ids, sizes = check_shortlist(model, ids, sizes)
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, vocab_size=str(model.adapter.vocab_size),
                vocab_sha256=vocab_hash(model), model=model.name, sizes=json.dumps(sizes))
    if extra:
        meta["extra"] = json.dumps(extra, default=str)
    tensors = {"ids": ids.to(torch.int32).contiguous()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def read_shortlist(path) -> tuple:
    """(ids int64 in rank order, sizes, metadata) of a shortlist file; raises ShortlistFileError naming
    the problem."""
    from safetensors import safe_open

    check_path("path", path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shortlist file {path} does not exist")
    if path.is_dir():
        raise ShortlistFileError(f"{path} is a directory, not a shortlist file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            ids = f.get_tensor("ids") if "ids" in f.keys() else None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ShortlistFileError(f"{path} is not a readable safetensors file (damaged or truncated?): {exc}") from exc
    if meta.get("format") != FORMAT or ids is None:
        raise ShortlistFileError(f"{path} is not a balcony shortlist file (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShortlistFileError(f"{path} has shortlist format version {meta.get('format_version')!r}; "
                                 f"this balcony_ext reads {FORMAT_VERSION}")
    try:
        sizes = json.loads(meta["sizes"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ShortlistFileError(f"{path} has damaged metadata (sizes: {exc})") from exc
    return ids.to(torch.long), sizes, meta


def load_shortlist(model, path):
    """Attaches the shortlist saved in `path` after checking that it belongs to this model's vocabulary
    (size and token strings); on any failure the model is unchanged. Returns the model."""
    ids, sizes, meta = read_shortlist(path)
    V = model.adapter.vocab_size
    if meta.get("vocab_size") != str(V) or meta.get("vocab_sha256") != vocab_hash(model):
        raise ShortlistFileError(f"{path} was built for another vocabulary (model {meta.get('model')!r}, "
                                 f"{meta.get('vocab_size')} tokens) than this model's ({model.name!r}, {V} tokens)")
    try:
        ids, sizes = check_shortlist(model, ids, sizes)
    except ValueError as exc:
        raise ShortlistFileError(f"{path}: {exc}") from exc
    return set_shortlist(model, ids, sizes)

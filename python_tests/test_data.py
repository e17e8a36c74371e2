"""Data: packing, the by-document split, sampling from the model."""

import pytest
import torch

from balcony_ext.data import prepare, read_documents, sample_self, split_by_document
from tiny_models import tiny_balcony


class ByteTokenizer:
    """bytes -> ids 0..254; 255 is EOS."""

    eos_token_id = 255
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [b % 255 for b in text.encode()]


def _write_docs(tmp_path, n=20):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        (d / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(f"document {i} " * (10 + i))
    (d / ".hidden").write_text("never read")
    return d


def test_split_is_by_document_deterministic_and_disjoint(tmp_path):
    d = _write_docs(tmp_path)
    a = prepare(d, ByteTokenizer(), heldout=0.1)
    b = prepare([d], ByteTokenizer(), heldout=0.1)
    assert a.heldout_docs == b.heldout_docs and 1 <= len(a.heldout_docs) <= 6
    assert not set(a.heldout_docs) & set(a.train_docs) and len(a.train_docs) + len(a.heldout_docs) == 20
    assert torch.equal(a.train_ids, b.train_ids)
    # held-out text never appears in training: each held-out document's marker is absent
    train_text = bytes(t for t in a.train_ids.tolist() if t != 255).decode()
    for name in a.heldout_docs:
        i = int(name.split("doc")[-1][:2])
        assert f"document {i} " not in train_text
    # split independent of listing order
    names = [f"n{i}" for i in range(50)]
    assert split_by_document(names, 0.1) == split_by_document(list(reversed(names)), 0.1)
    # a grown corpus keeps its held-out documents held out
    more = names + [f"m{i}" for i in range(200)]
    assert split_by_document(names, 0.1) <= split_by_document(more, 0.1)
    assert 5 <= len(split_by_document(more, 0.1)) <= 45
    assert len(split_by_document(["a", "b"], 0.01)) == 1 and len(split_by_document(["a", "b"], 0.99)) == 1


def test_packing_blocks(tmp_path):
    c = prepare(_write_docs(tmp_path), ByteTokenizer(), heldout=0.1)
    blocks = c.train_blocks(32)
    assert blocks.shape == (c.train_ids.numel() // 32, 32)
    assert torch.equal(blocks.reshape(-1), c.train_ids[: blocks.numel()])
    assert (c.train_ids == 255).sum() == len(c.train_docs)  # one EOS after every training document


def test_single_file_split_into_sections(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("\n\n".join(f"paragraph {i}" for i in range(100)))
    docs = read_documents(f)
    assert len(docs) == 20 and "".join(t for _, t in docs).count("paragraph") == 100
    c = prepare(f, ByteTokenizer(), heldout=0.1)
    assert c.heldout_docs and all(n.startswith("one.txt#") for n in c.heldout_docs)


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "missing", ByteTokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text documents"):
        prepare(tmp_path / "empty", ByteTokenizer())
    with pytest.raises(ValueError, match="heldout"):
        prepare(_write_docs(tmp_path), ByteTokenizer(), heldout=1.5)


def test_sample_self_tiny_model():
    model = tiny_balcony()
    c = sample_self(model, tokens=300, seq_len=16, batch_size=4, seed=1, progress=False)
    assert c.train_ids.numel() + c.heldout_ids.numel() >= 300
    assert len(c.heldout_docs) >= 1 and not set(c.heldout_docs) & set(c.train_docs)
    c2 = sample_self(model, tokens=300, seq_len=16, batch_size=4, seed=1, progress=False)
    assert torch.equal(c.train_ids, c2.train_ids)


def test_heldout_sample_spreads_over_documents(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(f"[{i:02d}]" + "x" * (200 + 40 * i))
    c = prepare(d, ByteTokenizer(), heldout=0.4)
    assert len(c.heldout_docs) >= 3 and len(c.heldout_spans) == len(c.heldout_docs)
    for (s, e), name in zip(c.heldout_spans, c.heldout_docs):
        assert bytes(c.heldout_ids[s:s + 4].tolist()).decode() == f"[{name.split('doc')[-1][:2]}]"
    n = len(c.heldout_docs)
    blocks, masks = c.heldout_sample(16, max_tokens=16 * n)
    assert blocks.shape == (n, 16) and masks.all()
    # one block from the start of every held-out document, not n blocks of the first one
    assert sorted(bytes(b[:4].tolist()).decode() for b in blocks) == sorted(f"[{x.split('doc')[-1][:2]}]" for x in c.heldout_docs)
    everything, _ = c.heldout_sample(16)
    assert torch.equal(everything, c.heldout_blocks(16))


def test_command_line_data_specs():
    from balcony_ext.data import data_spec

    assert data_spec(["shakespeare"]) == "shakespeare"
    assert data_spec(["a/", "b.txt"]) == ["a/", "b.txt"]
    assert data_spec(["chat=0.7", "shakespeare=0.3"]) == [("chat", 0.7), ("shakespeare", 0.3)]
    assert data_spec(["dir=with=equals=1"]) == [("dir=with=equals", 1.0)]
    with pytest.raises(ValueError, match="mix weighted and unweighted"):
        data_spec(["chat=0.7", "shakespeare"])


def test_unknown_data_name_lists_the_named_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path no-such-data does not exist \(named data: 'self', "
                                                 r"'shakespeare'"):
        prepare("no-such-data", ByteTokenizer())
    with pytest.raises(TypeError, match=r"data must be a Corpus, .* got dict"):
        prepare({"shakespeare": 1.0}, ByteTokenizer())


def test_a_ready_corpus_keeps_its_split_and_refuses_another_heldout(tmp_path):
    from balcony_ext.data import Mixture

    corpus = prepare(_write_docs(tmp_path), ByteTokenizer(), heldout=0.3)
    assert corpus.heldout == 0.3
    for heldout in (0.3, 0.05):  # the fraction it was split with, or the default: it goes as it is
        assert prepare(corpus, heldout=heldout) is corpus
    # another fraction was silently ignored before
    with pytest.raises(ValueError, match=r"heldout=0.1 cannot apply: data is a ready Corpus that already has its "
                                         r"held-out split \(\d+ held-out documents, made with heldout=0.3\); split "
                                         r"the text with prepare\(..., heldout=0.1\) instead"):
        prepare(corpus, heldout=0.1)
    mix = Mixture([(corpus, 1.0)])
    assert mix.heldout == 0.3 and prepare(mix, heldout=0.3) is mix
    with pytest.raises(ValueError, match="data is a ready Mixture that already has its held-out split"):
        prepare(mix, heldout=0.1)
    with pytest.raises(ValueError, match=r"heldout must be a fraction in \[0, 1\), got '0.1'"):
        prepare(corpus, heldout="0.1")

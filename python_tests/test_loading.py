"""bx.load: local checkpoints (tiny, fast) and the bundled default (slow: fetch/convert once, then cached)."""


import pytest
import torch

import balcony_ext as bx
from balcony_ext.loading import load
from tiny_models import tiny_hf


def test_load_local_checkpoint_and_exits(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "ckpt")
    model = load(tmp_path / "ckpt", exits=None)
    assert model.num_layers == 4 and model.exits == []
    assert all(not p.requires_grad for p in model.base.parameters())
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, exits=[4])[4], hf(ids).logits, atol=1e-5, rtol=1e-5)
    bx.attach(model, [2])
    bx.save_exits(model, tmp_path / "e.safetensors")
    again = load(tmp_path / "ckpt", exits=tmp_path / "e.safetensors", dtype="bfloat16")
    assert again.exits == [2] and again.dtype == torch.bfloat16


def test_load_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown dtype"):
        load(tmp_path / "nothing", dtype="float33")


@pytest.mark.parametrize("kw,match", [
    (dict(device="tpu"), r"device must be a torch device or its name .*got 'tpu'"),
    (dict(device=3.5), r"device must be a torch device or its name .*got 3.5"),
    (dict(dtype=torch.int8), r"dtype must be a floating-point torch dtype .*got torch.int8"),
    (dict(dtype="long"), r"dtype must be a floating-point torch dtype .*got torch.int64"),
    (dict(dtype=16), r"dtype must be a floating-point torch dtype .*got 16"),
])
def test_bad_dtype_or_device_named_before_the_model_loads(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        load(tmp_path / "nothing", **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_cuda_without_a_device_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda': no CUDA device is available here"):
        load(tmp_path / "nothing", device="cuda")


@pytest.mark.parametrize("weights", ["int4", 8, None, "INT8", ["int8"]])
def test_bad_weight_format_named_before_the_model_loads(tmp_path, weights):
    # (a checkpoint that does not exist: the FileNotFoundError would come first were the model loaded first)
    with pytest.raises(ValueError, match=r"weights must be one of 'float', 'int8', 'q4', 'q4_1', got"):
        load(tmp_path / "nothing", weights=weights)
    with pytest.raises(ValueError, match=r"weights must be one of 'float', 'int8', 'q4', 'q4_1', got"):
        bx.load(weights=weights)  # the default model: neither fetched nor loaded


@pytest.mark.parametrize("kw,match", [
    (dict(exits=True), r"exits must be 'bundled' \(the default model's\), a path .* or None \(none\), got bool"),
    (dict(shortlist=5), r"shortlist must be 'bundled' \(the default model's\), a path .* or None \(none\), got int"),
    (dict(path=5), r"path must be a str or os.PathLike \(a file path\) or None \(the bundled default model\)"),
])
def test_bad_paths_named_before_the_model_loads(kw, match):
    with pytest.raises(TypeError, match=match):
        load(**kw)


@pytest.mark.slow
def test_default_model_says_paris():
    model = load()
    assert model.num_layers == 30
    tok = model.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.base.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_default_model_trains_an_exit_and_round_trips(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(6):
        (text / f"{i}.txt").write_text(
            f"Chapter {i}. The river ran past the old mill, and the miller counted his sacks of flour. " * 12)
    model = load(exits=None)
    bx.attach(model, [15], init="last")
    out = bx.train(model, data=text, tokens=2 * 64, batch_size=2, seq_len=64, heldout=0.2, progress=False)
    assert out["steps"] == 1 and 0 < out["history"][0]["loss"] < 100  # KL in nats, finite
    bx.save_exits(model, tmp_path / "e.safetensors")
    other = load(exits=tmp_path / "e.safetensors")
    assert other.exits == [15] and other.tokens_trained == 128
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids, exits=[15])[15], other(ids, exits=[15])[15], atol=0, rtol=0)


@pytest.mark.slow
def test_default_model_comes_with_trained_exits():
    import json

    import balcony_ext as bx
    from balcony_ext.loading import bundled_exits_path

    model = load()
    report = json.loads(bundled_exits_path().with_suffix(".eval.json").read_text())
    assert model.exits == report["info"]["exits"] and len(model.exits) >= 2
    assert model.tokens_trained == report["info"]["tokens_trained"] >= 100_000
    rows = {(r["method"], r["exit"]): r for r in report["rows"]}
    for k in model.exits:  # the shipped exits beat the learned affine exit trained on the same tokens
        assert rows[("balcony", k)]["chat_top1"] > rows[("affine", k)]["chat_top1"]
        assert rows[("balcony", k)]["perplexity"] < rows[("affine", k)]["perplexity"]
    # the stored figures are those of this file: a small held-out sample evaluated again
    check = report["info"]["check"]
    again = bx.evaluate(model, data=check["data"], seq_len=check["seq_len"], max_tokens=check["max_tokens"],
                        baselines=(), progress=False)
    for r in again.rows:
        if "head" in r:  # the shipped shortlist's routes: agreement only
            assert r["perplexity"] is None and 0 < r["top1"] <= 1
            continue
        assert r["perplexity"] == pytest.approx(check["perplexity"][str(r["exit"])], rel=1e-4)
    assert {(r["exit"], r["head"]) for r in again.rows if "head" in r} == {
        (k, n) for k in model.exits + [model.num_layers] for n in model.shortlist_sizes}
    assert load(exits=None).exits == []

"""save_exits / load_exits: round trip, metadata, and refusal of foreign or damaged files."""

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open

from balcony_ext.exits_io import ExitsFileError, load_exits, read_exits, save_exits, tensors_checksum, weights_hash
from balcony_ext.loading import bundled_exits_path
from balcony_ext.model import attach
from tiny_models import tiny_balcony


def _trained(seed=0):
    model = tiny_balcony(seed=seed)
    attach(model, [1, 3], init="random", norm_init="next", seed=5)
    with torch.no_grad():
        for p in model.balcony_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.tokens_trained, model.last_loss = 1234, 0.5
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.balconies.state_dict().items()}


def test_round_trip_and_metadata(tmp_path):
    src = _trained()
    path = save_exits(src, tmp_path / "e.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = list(f.keys())
    assert all(n.split(".")[0] in ("1", "3") for n in names)  # only balcony parameters
    assert json.loads(meta["exits"]) == [1, 3]
    assert json.loads(meta["tokens_trained"]) == 1234 and json.loads(meta["loss"]) == 0.5
    base = json.loads(meta["base"])
    assert base["weights_hash"] == weights_hash(src) and "config_hash" in base and "weights_hash_method" in base
    assert json.loads(meta["inits"])["3"] == {"init": "random", "norm_init": "next"}

    dst = tiny_balcony(seed=0)
    attach(dst, [2])
    load_exits(dst, path)
    assert dst.exits == [1, 3] and dst.tokens_trained == 1234
    for k, v in src.balconies.state_dict().items():
        assert torch.equal(dst.balconies.state_dict()[k], v)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        a, b = src(ids), dst(ids)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert all(p.requires_grad for p in dst.balcony_parameters())


def test_weights_hash_same_across_dtypes():
    a = tiny_balcony(seed=0)
    b = tiny_balcony(seed=0)
    b.base.to(torch.bfloat16)
    assert weights_hash(a) == weights_hash(b)
    c = tiny_balcony(seed=1)
    assert weights_hash(a) != weights_hash(c)


def test_other_base_weights_refused_and_model_unchanged(tmp_path):
    path = save_exits(_trained(seed=0), tmp_path / "e.safetensors")
    other = tiny_balcony(seed=1)
    attach(other, [2])
    before = _snapshot(other)
    with pytest.raises(ExitsFileError, match="weights differ"):
        load_exits(other, path)
    assert other.exits == [2] and all(torch.equal(v, before[k]) for k, v in _snapshot(other).items())


def test_other_architecture_refused(tmp_path):
    path = save_exits(_trained(), tmp_path / "e.safetensors")
    other = tiny_balcony(layers=5)
    with pytest.raises(ExitsFileError, match="architecture"):
        load_exits(other, path)
    assert other.exits == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_header"])
def test_damaged_file_refused(tmp_path, damage):
    path = save_exits(_trained(), tmp_path / "e.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file at all")
    else:
        data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    model = tiny_balcony()
    attach(model, [2])
    before = _snapshot(model)
    with pytest.raises(ExitsFileError):
        load_exits(model, path)
    assert model.exits == [2] and all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())


def test_flipped_data_byte_refused(tmp_path):
    path = save_exits(_trained(), tmp_path / "e.safetensors")
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # the tensor data follows the JSON header
    data[(start + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    model = tiny_balcony()
    attach(model, [2])
    before = _snapshot(model)
    with pytest.raises(ExitsFileError, match=re.escape(f"{path}: the tensor data is damaged")):
        load_exits(model, path)
    assert model.exits == [2] and all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())


def test_checksum_is_canonical_and_files_without_one_load(tmp_path):
    from safetensors.torch import save_file

    src = _trained()
    path = save_exits(src, tmp_path / "e.safetensors", dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["tensors_sha256"] == tensors_checksum(dict(reversed(list(tensors.items()))))
    changed = dict(tensors)
    name = sorted(changed)[0]
    changed[name] = changed[name].float()  # same values, another dtype
    assert tensors_checksum(changed) != meta["tensors_sha256"]
    # a file written before the checksum existed (no key) loads unchecked
    del meta["tensors_sha256"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    dst = tiny_balcony()
    load_exits(dst, tmp_path / "old.safetensors")
    assert dst.exits == [1, 3]
    _, shipped = read_exits(bundled_exits_path())  # the bundled exits carry it, and it verifies
    assert "tensors_sha256" in shipped and shipped["exits"]


def test_wrong_shapes_and_foreign_format_refused(tmp_path):
    from safetensors.torch import save_file

    src = _trained()
    path = save_exits(src, tmp_path / "e.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(tensors))
    bad = dict(tensors)
    bad[name] = torch.zeros(3)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    model = tiny_balcony()
    with pytest.raises(ExitsFileError, match="shape"):
        load_exits(model, tmp_path / "shape.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExitsFileError, match="not a balcony exits file"):
        load_exits(model, tmp_path / "plain.safetensors")
    assert model.exits == []


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    path = tmp_path / "e.safetensors"
    save_exits(_trained(), path)
    good = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError):
        save_exits(_trained(), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_misused_paths_models_and_dtypes_named(tmp_path):
    model = _trained()
    with pytest.raises(IsADirectoryError, match="is a directory; give the exits file's path"):
        save_exits(model, tmp_path)
    for dtype in ("bfloat16", torch.int8):  # an int dtype would silently round the weights to integers
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            save_exits(model, tmp_path / "e.safetensors", dtype=dtype)
    assert not (tmp_path / "e.safetensors").exists()
    path = save_exits(model, tmp_path / "e.safetensors")
    with pytest.raises(ExitsFileError, match="is a directory, not an exits file"):
        load_exits(tiny_balcony(), tmp_path)
    with pytest.raises(TypeError, match=r"load_exits\(\) needs a BalconyModel, got object"):
        load_exits(object(), path)
    with pytest.raises(TypeError, match=r"save_exits\(\) needs a BalconyModel, got object"):
        save_exits(object(), path)


def test_paths_flags_and_extra_named(tmp_path):
    model = _trained()
    for path in (None, 5):  # (pathlib's TypeError, naming no argument, before)
        with pytest.raises(TypeError, match=r"path must be a str or os.PathLike \(a file path\), got"):
            save_exits(model, path)
        with pytest.raises(TypeError, match=r"path must be a str or os.PathLike \(a file path\), got"):
            load_exits(tiny_balcony(), path)
    with pytest.raises(ValueError, match=r"extra must be a dict \(saved as JSON metadata\) or None, got list"):
        save_exits(model, tmp_path / "e.safetensors", extra=["note"])
    assert not (tmp_path / "e.safetensors").exists()
    path = save_exits(model, tmp_path / "e.safetensors", extra={"note": "x"})
    fresh = tiny_balcony()
    with pytest.raises(ValueError, match="check_weights must be True or False, got str 'no'"):
        load_exits(fresh, path, check_weights="no")  # ("no" is truthy: the weights were checked before)
    assert fresh.exits == []
    assert load_exits(fresh, path, check_weights=False).exits == [1, 3]

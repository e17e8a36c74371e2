"""Saving and loading exits: a safetensors file holding only the balcony parameters, with JSON
metadata that says which base model they belong to.

Metadata (safetensors string metadata):
  format = "balcony_exits", format_version = "1"
  base   = JSON {name, model_type, config_hash, weights_hash, weights_hash_method}
  exits  = JSON [k, ...];  inits = JSON {k: {"init": ..., "norm_init": ...}}
  tokens_trained, loss = JSON numbers (loss may be null)
  tensors_sha256 = hex sha256 of the tensors (tensors_checksum); files written before it was added
                   have none and load unchecked

The weights hash is a sha256 over every base tensor's name, shape and a fixed sample of its values
(the first and last WEIGHT_SAMPLE values, and WEIGHT_SAMPLE evenly strided ones, each rounded to
bfloat16 so that the same model loaded in float32 or bfloat16 hashes the same). It reads about
100 KB per tensor, so it takes milliseconds even for large models, and changes if any tensor is
swapped, reshaped, retrained or re-quantised in any but the most contrived way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checks import check_flag, check_path
from .files import atomic_write
from .model import BalconyModel

FORMAT = "balcony_exits"
FORMAT_VERSION = "1"
WEIGHT_SAMPLE = 4096
WEIGHTS_HASH_METHOD = f"sha256(name, shape, bf16(first/last/strided {WEIGHT_SAMPLE} values)) v1"


class ExitsFileError(ValueError):
    """The exits file is damaged, of an unknown format, or belongs to another base model."""


def config_hash(model: BalconyModel) -> str:
    fields = model.adapter.architecture_fields()
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@torch.no_grad()
def weights_hash(model: BalconyModel) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.base.state_dict().items()):
        flat = t.detach().reshape(-1)
        n = flat.numel()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if n == 0:
            continue
        stride = max(1, n // WEIGHT_SAMPLE)
        parts = [flat[:WEIGHT_SAMPLE], flat[-WEIGHT_SAMPLE:], flat[::stride][:WEIGHT_SAMPLE]]
        sample = torch.cat([p.to("cpu", torch.float32) for p in parts])
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).to(torch.float32)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tensors_checksum(tensors: dict) -> str:
    """sha256 over the tensors in sorted name order: each one's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def base_identity(model: BalconyModel) -> dict:
    return dict(
        name=model.name,
        model_type=model.adapter.model_type,
        config_hash=config_hash(model),
        weights_hash=weights_hash(model),
        weights_hash_method=WEIGHTS_HASH_METHOD,
    )


def save_exits(model: BalconyModel, path, extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Writes the exits (only the balcony parameters) and their metadata to `path`, atomically.
    dtype: store the tensors in this dtype (e.g. torch.bfloat16 to halve the file); loading
    converts them back to the model's dtype."""
    from safetensors.torch import save_file

    if not isinstance(model, BalconyModel):
        raise TypeError(f"save_exits() needs a BalconyModel, got {type(model).__name__}")
    check_path("path", path)
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict (saved as JSON metadata) or None, got {type(extra).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the exits file's path, e.g. {Path(path) / 'exits.safetensors'}")
    if not model.exits:
        raise ValueError("the model has no exits to save; attach() some first")
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone()
               for k, v in model.balconies.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": json.dumps(base_identity(model), sort_keys=True),
        "exits": json.dumps(model.exits),
        "inits": json.dumps({str(k): dict(init=model.exit_module(k).init, norm_init=model.exit_module(k).norm_init)
                             for k in model.exits}),
        "tokens_trained": json.dumps(int(model.tokens_trained)),
        "loss": json.dumps(model.last_loss),
        "dtype": str(model.dtype).replace("torch.", ""),
        "tensors_sha256": tensors_checksum(tensors),
    }
    if extra:
        meta["extra"] = json.dumps(extra, default=str)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def read_exits(path) -> tuple:
    """Reads and checks an exits file: (tensors, metadata with JSON fields decoded). Raises
    ExitsFileError naming the problem for a missing, damaged or foreign file."""
    from safetensors import safe_open

    check_path("path", path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"exits file {path} does not exist")
    if path.is_dir():
        raise ExitsFileError(f"{path} is a directory, not an exits file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ExitsFileError(f"{path} is not a readable safetensors file (damaged or truncated?): {exc}") from exc
    if raw.get("format") != FORMAT:
        raise ExitsFileError(f"{path} is not a balcony exits file (format={raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ExitsFileError(
            f"{path} has exits format version {raw.get('format_version')!r}; this balcony_ext reads {FORMAT_VERSION}"
        )
    if "tensors_sha256" in raw and raw["tensors_sha256"] != tensors_checksum(tensors):
        raise ExitsFileError(f"{path}: the tensor data is damaged (its sha256 differs from the one saved with it)")
    meta = dict(raw)
    try:
        for key in ("base", "exits", "inits", "tokens_trained", "loss"):
            meta[key] = json.loads(raw[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ExitsFileError(f"{path} has damaged metadata ({exc})") from exc
    return tensors, meta


def load_exits(model: BalconyModel, path, check_weights: bool = True) -> BalconyModel:
    """Replaces the model's exits with those saved in `path`.

    Everything is checked before the model is touched: the file's integrity, that it was saved
    from the same base model (architecture config hash and weights hash; check_weights=False skips
    the latter, e.g. for a deliberately fine-tuned base), and that every tensor has the expected
    name and shape. On any failure the model is unchanged."""
    if not isinstance(model, BalconyModel):
        raise TypeError(f"load_exits() needs a BalconyModel, got {type(model).__name__}")
    check_path("path", path)
    check_flag("check_weights", check_weights)
    tensors, meta = read_exits(path)
    base = meta["base"]
    mine_cfg = config_hash(model)
    if base.get("config_hash") != mine_cfg:
        raise ExitsFileError(
            f"{path} was saved for base model {base.get('name')!r} ({base.get('model_type')}), whose architecture "
            f"differs from this model {model.name!r} ({model.adapter.model_type}); config hash "
            f"{str(base.get('config_hash'))[:12]} != {mine_cfg[:12]}"
        )
    if check_weights:
        if base.get("weights_hash_method") != WEIGHTS_HASH_METHOD:
            raise ExitsFileError(f"{path} uses an unknown weights hash method {base.get('weights_hash_method')!r}")
        mine_w = weights_hash(model)
        if base.get("weights_hash") != mine_w:
            raise ExitsFileError(
                f"{path} was trained on base model {base.get('name')!r}, whose weights differ from this model's "
                f"({model.name!r}); weights hash {str(base.get('weights_hash'))[:12]} != {mine_w[:12]}"
            )
    exits = meta["exits"]
    try:
        exits = model.validate_exits(exits)
    except ValueError as exc:
        raise ExitsFileError(f"{path}: {exc}") from exc
    inits = meta["inits"]
    built = {}
    for k in exits:
        info = inits.get(str(k), {})
        with torch.random.fork_rng(devices=[]):
            ex = model.build_exit(k, info.get("init", "last"), info.get("norm_init", "final"))
        expected = ex.state_dict()
        prefix = f"{k}."
        mine = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if set(mine) != set(expected):
            raise ExitsFileError(
                f"{path}: exit {k} has tensors {sorted(set(mine) ^ set(expected))[:6]} missing or unexpected"
            )
        for name, t in mine.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ExitsFileError(
                    f"{path}: exit {k} tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}"
                )
            if not torch.isfinite(t.float()).all():
                raise ExitsFileError(f"{path}: exit {k} tensor {name} holds NaN or infinite values")
        ex.load_state_dict({n: t.to(expected[n].dtype) for n, t in mine.items()})
        built[k] = ex
    stray = [n for n in tensors if n.split(".", 1)[0] not in {str(k) for k in exits}]
    if stray:
        raise ExitsFileError(f"{path}: tensors for exits not listed in the metadata: {stray[:4]}")
    # All checks passed: swap the exits in.
    from torch import nn

    model.balconies = nn.ModuleDict({str(k): built[k] for k in exits})
    model.tokens_trained = int(meta.get("tokens_trained") or 0)
    model.last_loss = meta.get("loss")
    return model

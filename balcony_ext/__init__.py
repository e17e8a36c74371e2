"""balcony_ext: one pretrained causal LM served at many speeds (Balcony, EMNLP 2025).

`import balcony_ext` is the whole API.
"""

from . import _native
from ._native import built_with_cuda, cpu_capability, max_cpu_capability, set_cpu_capability
from . import ops, reference
from .model import BalconyModel, attach, detach
from .loading import load
from .exits_io import load_exits, save_exits
from .train import train
from .evaluate import evaluate
from .generate import GenerationOutput, calibrate, generate
from .weights import quantize
from .shortlist import build_shortlist, load_shortlist, save_shortlist, set_shortlist

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "built_with_cuda",
    "cpu_capability",
    "max_cpu_capability",
    "set_cpu_capability",
    "BalconyModel",
    "attach",
    "detach",
    "load",
    "save_exits",
    "load_exits",
    "train",
    "evaluate",
    "generate",
    "calibrate",
    "GenerationOutput",
    "quantize",
    "build_shortlist",
    "set_shortlist",
    "save_shortlist",
    "load_shortlist",
]

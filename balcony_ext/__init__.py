"""balcony_ext: one pretrained causal LM served at many speeds (Balcony, EMNLP 2025).

`import balcony_ext` is the whole API.
"""

from . import _native
from ._native import built_with_cuda, cpu_capability, max_cpu_capability, set_cpu_capability
from . import ops, reference

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "built_with_cuda",
    "cpu_capability",
    "max_cpu_capability",
    "set_cpu_capability",
]

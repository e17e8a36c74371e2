"""Loads the compiled extension (balcony_ext._C), which registers torch.ops.balcony.*.

Without it the package still imports (so that a broken build can be diagnosed), but it says so
loudly, and every kernel call raises with the reason.
"""

import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing registers the ops)

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    IMPORT_ERROR = exc
    warnings.warn(
        f"balcony_ext: the native extension balcony_ext._C failed to load ({exc}). "
        "Kernels are unavailable; reinstall with `pip install --no-build-isolation .` and read the build log.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def require() -> None:
    """Raises if the native extension did not load."""
    if _C is None:
        raise RuntimeError(f"balcony_ext native extension is not available: {IMPORT_ERROR}")


def built_with_cuda() -> bool:
    require()
    return bool(torch.ops.balcony.built_with_cuda())


def cpu_capability() -> str:
    """The instruction set the CPU kernels use now: 'default', 'avx2', 'avx512' or 'avx512bf16'."""
    require()
    return torch.ops.balcony.get_cpu_capability()


def max_cpu_capability() -> str:
    require()
    return torch.ops.balcony.max_cpu_capability()


def set_cpu_capability(name: str) -> None:
    """Lowers (or restores) the CPU instruction set the kernels use; raises if the CPU lacks it."""
    require()
    torch.ops.balcony.set_cpu_capability(name)


def supported_cpu_capabilities() -> list:
    order = ["default", "avx2", "avx512", "avx512bf16"]
    return order[: order.index(max_cpu_capability()) + 1]

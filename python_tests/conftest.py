"""Shared fixtures. The suite runs fully on a CPU-only machine; CUDA variants skip without a GPU.

A missing native extension is an error, not a skip: the whole session fails at start.
"""

import pytest
import torch

import balcony_ext
from balcony_ext import _native


def pytest_sessionstart(session):
    _native.require()


def pytest_collection_modifyitems(config, items):
    # A CUDA variant runs once: the CPU instruction set does not change what it tests, so its copies
    # under the other CPU capabilities are deselected (not reported as skips).
    first_cpu = _cpu_capabilities()[0]
    keep, drop = [], []
    for item in items:
        cap = getattr(item, "callspec", None) and item.callspec.params.get("cpu_capability")
        (drop if "cuda" in item.keywords and cap not in (None, first_cpu) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def _cpu_capabilities():
    return _native.supported_cpu_capabilities() if _native.available() else ["default"]


@pytest.fixture(params=_cpu_capabilities())
def cpu_capability(request):
    """Runs a test once per CPU instruction set this machine supports (baseline, AVX2, AVX-512)."""
    before = balcony_ext.cpu_capability()
    balcony_ext.set_cpu_capability(request.param)
    yield request.param
    balcony_ext.set_cpu_capability(before)


def devices():
    """CPU always; CUDA as a parameter marked `cuda` (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def dtypes_for(device):
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.bfloat16]


def device_dtype_params():
    """(device, dtype) pairs: float32 and bfloat16 on CPU; float32, float16, bfloat16 on CUDA."""
    params = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        params.append(pytest.param("cuda", dt, marks=pytest.mark.cuda))
    return params

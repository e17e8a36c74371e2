"""Builds and drives the CPU execution harness for the CUDA kernels (csrc/harness/, docs/cuda_harness.md).

The runner executable is compiled from csrc/harness/*.cpp and the kernel headers with the host C++
compiler, AddressSanitizer and UBSan, into build/cuda_harness/ under a name that hashes its sources and
flags (so it is rebuilt exactly when they change). `run()` writes a case (parameters and buffers) to a
temporary directory, runs the kernel once per scheduling seed, and returns each seed's output buffers
and the launch choices the entry reported (the op's own host logic, shared with csrc/cuda/*.cu).

Environment: CXX (compiler, default c++), BALCONY_HARNESS_SANITIZE=0 (build without sanitizers, the
harness's own shared-memory guards still on), BALCONY_HARNESS_SEEDS (e.g. "0,1,2,3,4,5,6,7").
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HARNESS_SRC = ROOT / "csrc" / "harness"
KERNEL_INCLUDE = ROOT / "csrc" / "include"
BUILD_DIR = ROOT / "build" / "cuda_harness"

# seed % 2 == 0: warp-greedy schedule; seed % 2 == 1: uniform random schedule (cuda_harness.cpp).
SEEDS = tuple(int(s) for s in os.environ.get("BALCONY_HARNESS_SEEDS", "0,1,2,3,4,5,6,7").split(","))

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
CXXFLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-fcf-protection=none", "-Wall",
            "-Wno-unknown-pragmas", "-DBALCONY_CUDA_HARNESS"]
RUN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0:"
                    "allocator_may_return_null=0:exitcode=23",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=24",
}


def sanitized() -> bool:
    """Whether the runner is built with AddressSanitizer and UBSan."""
    return os.environ.get("BALCONY_HARNESS_SANITIZE", "1").strip().lower() not in ("0", "false", "off", "no")


def _sources():
    srcs = sorted(HARNESS_SRC.glob("*.cpp"))
    deps = srcs + sorted(HARNESS_SRC.glob("*.h")) + sorted((KERNEL_INCLUDE / "balcony").glob("*"))
    return srcs, deps


def build() -> Path:
    """Returns the runner executable, compiling it first when its sources or flags changed."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    flags = CXXFLAGS + (SANITIZE if sanitized() else [])
    srcs, deps = _sources()
    h = hashlib.sha256()
    h.update(" ".join(cxx + flags).encode())
    for p in deps:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    key = h.hexdigest()[:16]
    exe = BUILD_DIR / f"balcony_cuda_harness-{key}"
    if exe.exists():
        return exe
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (pytest-xdist workers, parallel sessions)
        if exe.exists():
            return exe
        obj_dir = BUILD_DIR / f"obj-{key}"
        obj_dir.mkdir(exist_ok=True)
        include = ["-I", str(HARNESS_SRC), "-I", str(KERNEL_INCLUDE)]

        def compile_one(src: Path) -> Path:
            obj = obj_dir / (src.stem + ".o")
            cmd = cxx + flags + include + ["-c", str(src), "-o", str(obj)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"harness build failed: {shlex.join(cmd)}\n{r.stdout}{r.stderr}")
            return obj

        jobs = max(1, int(os.environ.get("MAX_JOBS", min(4, os.cpu_count() or 1))))
        with ThreadPoolExecutor(jobs) as pool:
            objs = list(pool.map(compile_one, srcs))
        tmp = exe.with_suffix(".tmp")
        cmd = cxx + flags + [str(o) for o in objs] + ["-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"harness link failed: {shlex.join(cmd)}\n{r.stdout}{r.stderr}")
        tmp.replace(exe)
        return exe


class HarnessFailure(AssertionError):
    """The harness (or a sanitizer) reported a bug; `report` holds the runner's output."""

    def __init__(self, kernel, returncode, report):
        super().__init__(f"{kernel}: harness runner exited with status {returncode}\n{report}")
        self.returncode, self.report = returncode, report


@dataclass
class Result:
    outputs: dict = field(default_factory=dict)  # seed -> {buffer name -> tensor (same shape and dtype as given)}
    log: str = ""
    # What the entry reported of its launch choices (Case::report in csrc/harness/runner.h): the split
    # count, block shape, path or fallback the op's host logic (csrc/include/balcony/*_launch.h) picked.
    reports: dict = field(default_factory=dict)

    def __getitem__(self, seed):
        return self.outputs[seed]


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def run(kernel: str, params: dict, inputs: dict, outputs: dict, seeds=SEEDS, timeout=300) -> Result:
    """Runs harness entry `kernel` once per seed.

    inputs / outputs: {name: tensor}; each is passed as its own buffer holding the tensor's contiguous
    bytes (outputs with their initial contents, e.g. NaN poison). Returns each seed's output tensors.
    Raises HarnessFailure when the runner reports a bug.
    """
    exe = build()
    with tempfile.TemporaryDirectory(prefix="balcony_harness_") as d:
        d = Path(d)
        lines = [f"kernel {kernel}", "seeds " + " ".join(str(s) for s in seeds)]
        for k, v in params.items():
            lines.append(f"param {k} {v}")
        for direction, bufs in (("in", inputs), ("out", outputs)):
            for name, t in bufs.items():
                (d / f"{name}.bin").write_bytes(_to_bytes(t))
                lines.append(f"buffer {name} {direction} {name}.bin")
        (d / "spec.txt").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, **RUN_ENV)
        r = subprocess.run([str(exe), str(d)], capture_output=True, text=True, env=env, timeout=timeout)
        log = r.stdout + r.stderr
        if r.returncode != 0:
            raise HarnessFailure(kernel, r.returncode, log)
        res = Result(log=log)
        for line in r.stdout.splitlines():
            if line.startswith("report "):
                _, key, value = line.split()
                res.reports[key] = int(value)
        for s in seeds:
            res.outputs[s] = {}
            for name, t in outputs.items():
                data = bytearray((d / f"{name}.seed{s}.bin").read_bytes())
                res.outputs[s][name] = torch.frombuffer(data, dtype=torch.uint8).view(t.dtype).reshape(t.shape)
        return res


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer the kernel must overwrite: NaN for floating types, -1 bytes otherwise."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -1)


def assert_same_across_seeds(result: Result, names=None):
    """A kernel without atomics on floats gives bit-identical results under every schedule; a
    difference means its result depends on the order threads run in (a race)."""
    seeds = list(result.outputs)
    first = result.outputs[seeds[0]]
    for s in seeds[1:]:
        for name in names or first:
            a, b = first[name], result.outputs[s][name]
            same = torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a, b.view(torch.uint8))
            assert same, f"buffer '{name}' differs between seeds {seeds[0]} and {s}: the result depends on the schedule"

"""Builds balcony_ext and its native extension balcony_ext._C.

    pip install --no-build-isolation .        # CPU kernels always; CUDA kernels when nvcc and a CUDA torch exist

Environment switches:
    BALCONY_CUDA=1 / 0      force the CUDA kernels on (fail if impossible) or off; unset = auto
    CUDA_HOME               CUDA toolkit (default: /usr/local/cuda when it exists)
    TORCH_CUDA_ARCH_LIST    GPU targets (default: 8.0;8.6;8.9;9.0+PTX: Ampere, Ada, Hopper, PTX for newer)
    MAX_JOBS                parallel compile jobs (default: number of CPUs)
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def read_sources():
    groups = {"kernel": [], "op": [], "cuda": []}
    for line in (CSRC / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, path = line.split()
        groups[kind].append(os.path.join("csrc", path))
    return groups


def default_cuda_home():
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and guesses it from the nvcc on
    # PATH, which may be a wrapper outside the toolkit: point it at the standard location first.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def want_cuda(torch):
    flag = os.environ.get("BALCONY_CUDA", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "")) / "bin" / "nvcc")
    possible = torch.version.cuda is not None and nvcc and Path(nvcc).exists()
    if flag in ("1", "true", "on", "yes"):
        if not possible:
            sys.exit("BALCONY_CUDA=1 but CUDA cannot be built: need nvcc and a CUDA build of torch "
                     f"(torch.version.cuda = {torch.version.cuda})")
        return True
    return bool(possible)


def extensions():
    default_cuda_home()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = read_sources()
    cuda = want_cuda(torch)
    include_dirs = [str(CSRC / "include"), str(CSRC)]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fvisibility-inlines-hidden", "-Wall", "-Wno-unused-function"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    kwargs = dict(
        name="balcony_ext._C",
        sources=sources["kernel"] + sources["op"],
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
    )
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        nvcc = ["-O3", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr", "-std=c++20"]
        define_macros.append(("BALCONY_WITH_CUDA", "1"))
        print(f"balcony_ext: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
        return [CUDAExtension(sources=kwargs.pop("sources") + sources["cuda"],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, define_macros=define_macros, **kwargs)]
    print("balcony_ext: building CPU kernels only (no CUDA: nvcc or a CUDA torch missing, or BALCONY_CUDA=0)",
          flush=True)
    return [CppExtension(extra_compile_args={"cxx": cxx}, define_macros=define_macros, **kwargs)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["balcony_ext", "balcony_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    package_data={"balcony_ext": ["data/*", "exits/*"]},
)

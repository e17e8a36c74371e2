#!/usr/bin/env bash
# Sets balcony_ext up from nothing: a virtual environment in .venv, torch, the dependencies, and
# `pip install` of the project, which compiles the CPU kernels and, when nvcc and a CUDA build of
# torch are present, the CUDA kernels. The full build log (with the ptxas register and spill
# report of every CUDA kernel) is kept in build/install.log.
#
#   bash scripts/setup.sh            # BALCONY_CUDA=0/1 forces the CUDA kernels off/on
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
echo "== installing $TORCH_SPEC and the build tools"
mkdir -p build
quiet_pip() {  # pip's output goes to build/pip.log, shown only when it fails
  $PIP install -q "$@" > build/pip.log 2>&1 || { cat build/pip.log; echo "setup: pip install $* failed" >&2; exit 1; }
}
quiet_pip --upgrade pip setuptools wheel ninja
quiet_pip "$TORCH_SPEC"
echo "== building and installing balcony_ext (log: build/install.log)"
start=$(date +%s)
if ! $PIP install -v --no-build-isolation ".[test]" > build/install.log 2>&1; then
  tail -n 60 build/install.log
  echo "setup: pip install failed; full log in build/install.log" >&2
  exit 1
fi
echo "   built in $(( $(date +%s) - start )) s"
grep -E "^balcony_ext: building" build/install.log || true

# ptxas report: every kernel's registers and spills; no kernel may spill.
if grep -q "ptxas info" build/install.log; then
  kernels=$(grep -c "ptxas info    : Compiling entry function" build/install.log || true)
  spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" build/install.log || true)
  echo "   ptxas: $kernels kernel compilations, $(grep -c ' 0 bytes spill stores, 0 bytes spill loads' build/install.log) without spills"
  if [ -n "$spills" ]; then
    echo "setup: CUDA kernels spill registers:" >&2
    grep -B2 -E "[1-9][0-9]* bytes spill (stores|loads)" build/install.log >&2
    exit 1
  fi
fi
.venv/bin/python -P -c "import balcony_ext as b; print('   balcony_ext', b.__version__, '| CUDA kernels built:', b.built_with_cuda(), '| CPU kernels:', b.cpu_capability())"

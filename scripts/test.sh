#!/usr/bin/env bash
# Sets everything up from nothing (scripts/setup.sh), then runs the C++ tests (CMake + ctest)
# and the Python test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m cuda_harness`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== C++ tests (CMake)"
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake-configure.log
cmake --build build/cmake -j "$(nproc)" > build/cmake-build.log 2>&1 || { tail -n 40 build/cmake-build.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure

echo "== Python tests"
# The installed package is tested (not the source tree), so run pytest from the venv, not `python -m pytest`.
.venv/bin/pytest python_tests -q -rs "$@"

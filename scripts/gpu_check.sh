#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch: build the extension in place (CPU and CUDA
# kernels, for this GPU's architecture only) and run every test marked `cuda` (the kernels on the
# GPU against their references, the engine's composed step on the GPU against the native CPU step,
# host synchronisations per generated token). Logs go to $OUT when it is set, else to build/.
#     bash scripts/gpu_check.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-build}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export BALCONY_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
start=$(date +%s)
$PY setup.py build_ext --inplace > "$LOGS/gpu_build.log" 2>&1 || { tail -n 40 "$LOGS/gpu_build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s for sm_$TORCH_CUDA_ARCH_LIST"
$PY -c "import balcony_ext as b; print('CUDA kernels built:', b.built_with_cuda())"
# (the server tests need fastapi/uvicorn/openai, which a GPU image may lack; they have no GPU part)
$PY -m pytest python_tests -m cuda -q -rs -p no:cacheprovider --ignore=python_tests/test_server.py "$@" 2>&1 \
  | tee "$LOGS/gpu_tests.log"

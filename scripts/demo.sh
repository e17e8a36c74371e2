#!/usr/bin/env bash
# Sets everything up from nothing (scripts/setup.sh: environment, build, install), fetches the
# default model on first use, and runs the demo: SmolLM2-135M-Instruct with its shipped exits
# answers one prompt at several budgets. Extra arguments go to `balcony demo`, e.g.
#   bash scripts/demo.sh --prompt "Write a haiku about the sea." --budgets 0.5 1.0
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "== balcony demo"
.venv/bin/balcony demo "$@"

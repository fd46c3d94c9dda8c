#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU; Triton kernels under the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest tests "$@"

#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU; Triton kernels under the interpreter) on the pinned
# Triton, then the build check and an interpreter subset on the newest supported Triton, then the
# continuous-batching tests on the oldest supported transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest tests "$@"
bash scripts/test_newest_triton.sh
bash scripts/test_oldest_transformers.sh

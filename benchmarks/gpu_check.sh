#!/usr/bin/env bash
# One call on a CUDA machine: the test suite on the GPU, then the benchmark with its peers.
#   bash benchmarks/gpu_check.sh [bench args...]   (where pytest is missing, it installs it from .wheels/)
#   e.g. --suite all adds the masks / varlen / sliding-window cases (attend.bench_masks)
set -uo pipefail
OUT=${OUT:-/tmp/attend_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import pytest" 2>/dev/null || pip install -q --no-deps --no-index --target /tmp/pylib .wheels/*.whl
export PYTHONPATH=src:/tmp/pylib
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  OUT="$OUT" SHARD_TIMEOUT="${TEST_TIMEOUT:-300}" bash benchmarks/gpu_tests.sh "${TEST_SHARDS:-12}"
fi
python3 -m attend bench --device cuda --json "$OUT/bench.json" --png "$OUT/bench.png" \
  --masks-json "$OUT/bench_masks.json" "$@" 2> "$OUT/bench_progress.txt"
echo "bench exit $?"

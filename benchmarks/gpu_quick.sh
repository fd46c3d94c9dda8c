#!/usr/bin/env bash
# A bounded GPU run for one change: chosen tests, the masks suite with fixed configs,
# then a short core table (fixed configs, as users get them). Every step has its own time limit and writes to $OUT as it goes.
#   TESTS="tests/test_varlen.py" bash benchmarks/gpu_quick.sh [core bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/attend_out}
mkdir -p "$OUT"
python3 -c "import pytest" 2>/dev/null || pip install -q --no-deps --no-index --target /tmp/pylib .wheels/*.whl
export PYTHONPATH=src:/tmp/pylib
OUT="$OUT" SHARD_TIMEOUT="${TEST_TIMEOUT:-150}" bash benchmarks/gpu_tests.sh "${TEST_SHARDS:-14}"
timeout "${MASKS_TIMEOUT:-200}" python3 -m attend bench --device cuda --suite masks \
  --masks-json "$OUT/bench_masks.json" > "$OUT/bench_masks.txt" 2> "$OUT/bench_masks_progress.txt"
echo "masks exit $?"; tail -25 "$OUT/bench_masks.txt"
timeout "${CORE_TIMEOUT:-200}" python3 -m attend bench --device cuda --json "$OUT/bench.json" --png "$OUT/bench.png" \
  "$@" > "$OUT/bench.txt" 2> "$OUT/bench_progress.txt"
echo "core exit $?"; cat "$OUT/bench.txt"

#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU; Triton kernels under the interpreter) on the pinned
# Triton, then the build check and an interpreter subset on the newest supported Triton, then the
# continuous-batching tests on the oldest supported transformers.
# With arguments, one pytest over tests/ with them (`bash scripts/test.sh -k flex`). Without, the
# suite runs as two pytest processes over two halves of the test files, one per core: a single one
# keeps one core busy (its CPU time is its wall time) and took 11-13 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -gt 0 ]; then
  python -m pytest tests "$@"
else
  # The half the current process runs: the slowest files by `pytest --durations`, about half the time.
  first=(tests/test_sdpa.py tests/test_transformers.py tests/test_core_variants.py tests/test_rows.py tests/test_varlen.py
         tests/test_triton_build.py)
  second=()
  for f in tests/test_*.py; do
    [[ " ${first[*]} " == *" $f "* ]] || second+=("$f")
  done
  log=$(mktemp)
  python -m pytest "${second[@]}" > "$log" 2>&1 &
  other=$!
  status=0
  python -m pytest "${first[@]}" || status=$?
  wait "$other" || status=$((status == 0 ? $? : status))
  echo "== the other half: ${second[*]}"
  cat "$log"
  rm -f "$log"
  [ "$status" -eq 0 ] || exit "$status"
fi
bash scripts/test_newest_triton.sh
bash scripts/test_oldest_transformers.sh

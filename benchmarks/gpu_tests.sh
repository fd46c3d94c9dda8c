#!/usr/bin/env bash
# Run the test suite on a CUDA machine, sharded over N processes: the GPU run is bound by Triton
# compiling each kernel specialization, which is CPU work spread over the host's cores.
#   PYTHONPATH=src bash benchmarks/gpu_tests.sh [N]   -> prints one "N passed, M failed" line
#   TESTS="tests/test_varlen.py ..." limits it to those files or node ids; SHARD_TIMEOUT (s)
#   bounds each shard (SIGINT: a shard cut short still reports what passed and the test it was in), so the summary is always written ($OUT/tests_summary.txt, $OUT/pytest.txt).
set -uo pipefail
N=${1:-8}
OUT=${OUT:-/tmp/attend_out}
W=$(mktemp -d)
mkdir -p "$OUT"
python3 -m pytest ${TESTS:-tests} --collect-only -q -o addopts= -p no:cacheprovider 2>/dev/null | grep '::' > "$W/ids.txt"
total=$(wc -l < "$W/ids.txt")
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$W/ids.txt" > "$W/shard_$i.ids"
  mapfile -t ids < "$W/shard_$i.ids"
  [ ${#ids[@]} -eq 0 ] && continue
  timeout -s INT -k 30 "${SHARD_TIMEOUT:-280}" python3 -m pytest -q -o addopts= -p no:cacheprovider "${ids[@]}" > "$W/shard_$i.txt" 2>&1 &
done
wait
passed=0; failed=0
{
  for f in "$W"/shard_*.txt; do
    p=$(grep -Eo '[0-9]+ passed' "$f" | grep -Eo '[0-9]+' || echo 0)
    fl=0
    for n in $(grep -Eo '[0-9]+ (failed|errors?)' "$f" | grep -Eo '^[0-9]+'); do fl=$((fl + n)); done
    passed=$((passed + ${p:-0})); failed=$((failed + ${fl:-0}))
    grep -E '^(FAILED|ERROR)' "$f" || true
    grep -q -E '[0-9]+ (passed|failed)' "$f" || echo "UNFINISHED shard $(basename "$f") (timed out?)"
  done
  echo "GPU tests: $total collected; $passed passed, $failed failed"
} | tee "$OUT/tests_summary.txt"
cat "$W"/shard_*.txt > "$OUT/pytest.txt"

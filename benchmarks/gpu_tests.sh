#!/usr/bin/env bash
# Run the test suite on a CUDA machine, sharded over N processes: the GPU run is bound by Triton
# compiling each kernel specialization, which is CPU work spread over the host's cores.
#   PYTHONPATH=src bash benchmarks/gpu_tests.sh [N]   -> prints one "N passed, M failed" line
#   TESTS="tests/test_varlen.py ..." limits it to those files or node ids; SHARD_TIMEOUT (s)
#   bounds each shard (SIGINT: a shard cut short still reports what passed and the test it was in), so the summary is always written ($OUT/tests_summary.txt, $OUT/pytest.txt).
#   A shard that ignores SIGINT is killed 30 s later and prints no summary: each failure is printed
#   as it happens (ATTEND_TEST_REPORT_NOW, tests/conftest.py) and counted from those lines, and a
#   test still running after TEST_HANG_S (default 240) dumps every thread's stack (faulthandler).
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
  ATTEND_TEST_REPORT_NOW=1 timeout -s INT -k 30 "${SHARD_TIMEOUT:-280}" python3 -m pytest -q -o addopts= \
    -o faulthandler_timeout="${TEST_HANG_S:-240}" -p no:cacheprovider "${ids[@]}" > "$W/shard_$i.txt" 2>&1 &
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
    if ! grep -q -E '[0-9]+ (passed|failed)' "$f"; then  # killed: count its results from the progress lines
      n=$(grep -c '^FAILED NOW' "$f"); failed=$((failed + n))
      p=$(grep -oE '^[.sxXFE]+' "$f" | tr -cd '.' | wc -c); passed=$((passed + p))
      echo "UNFINISHED shard $(basename "$f") (killed at its time limit): $p passed, $n failed before it; the test it was in:"
      grep -A3 'Timeout (' "$f" | head -4 || true
    fi
  done
  echo "GPU tests: $total collected; $passed passed, $failed failed"
} | tee "$OUT/tests_summary.txt"
for f in "$W"/shard_*.txt; do echo "== $(basename "$f")"; cat "$f"; echo; done > "$OUT/pytest.txt"

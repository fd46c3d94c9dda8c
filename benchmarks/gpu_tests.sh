#!/usr/bin/env bash
# Run the test suite on a CUDA machine, sharded over N processes: the GPU run is bound by Triton
# compiling each kernel specialization, which is CPU work spread over the host's cores.
#   PYTHONPATH=src bash benchmarks/gpu_tests.sh [N]   -> prints one "N passed, M failed" line
#   TESTS="tests/test_varlen.py ..." limits it to those files or node ids; SHARD_TIMEOUT (s)
#   bounds each shard (SIGINT: a shard cut short still reports what passed and the test it was in), so the summary is always written ($OUT/tests_summary.txt, $OUT/pytest.txt).
#   A shard that ignores SIGINT is killed 30 s later and prints no summary: each failure is printed
#   as it happens and the running test is written to a file (ATTEND_TEST_REPORT_NOW, tests/conftest.py),
#   so the summary still names its failures and the test it was in, and counts its results from its
#   progress line. Each finished shard lists its five slowest tests ($OUT/pytest.txt). A test still running after TEST_HANG_S (default: 45 s short of the shard's limit)
#   dumps every thread's stack (faulthandler).
set -uo pipefail
N=${1:-8}
OUT=${OUT:-/tmp/attend_out}
W=$(mktemp -d)
mkdir -p "$OUT"
LIMIT=${SHARD_TIMEOUT:-280}
HANG=${TEST_HANG_S:-$(( LIMIT > 75 ? LIMIT - 45 : 30 ))}
python3 -m pytest ${TESTS:-tests} --collect-only -q -o addopts= -p no:cacheprovider > "$W/collect.txt" 2>&1
grep '::' "$W/collect.txt" > "$W/ids.txt"
total=$(wc -l < "$W/ids.txt")
if [ "$total" -eq 0 ]; then  # (a TESTS path that does not exist collects nothing: say so, not "0 passed")
  echo "GPU tests: nothing collected from ${TESTS:-tests}:" | tee "$OUT/tests_summary.txt"
  tail -5 "$W/collect.txt" | tee -a "$OUT/tests_summary.txt"
  exit 2
fi
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$W/ids.txt" > "$W/shard_$i.ids"
  mapfile -t ids < "$W/shard_$i.ids"
  [ ${#ids[@]} -eq 0 ] && continue
  ATTEND_TEST_REPORT_NOW="$W/shard_$i.running" timeout -s INT -k 30 "$LIMIT" python3 -m pytest -q -o addopts= \
    -o faulthandler_timeout="$HANG" -p no:cacheprovider --durations=5 "${ids[@]}" > "$W/shard_$i.txt" 2>&1 &
done
wait
passed=0; failed=0
{
  for f in "$W"/shard_*.txt; do
    # pytest's last line, "3 failed, 70 passed, 1 skipped in 12.34s (0:00:12)", exists only where it finished
    last=$(grep -E ' in [0-9.]+s( \(|$)' "$f" | tail -1)
    if [ -n "$last" ]; then
      p=$(grep -Eo '[0-9]+ passed' <<< "$last" | grep -Eo '[0-9]+' || true)
      fl=0
      for n in $(grep -Eo '[0-9]+ (failed|errors?)' <<< "$last" | grep -Eo '^[0-9]+'); do fl=$((fl + n)); done
      passed=$((passed + ${p:-0})); failed=$((failed + fl))
      grep -E '^(FAILED|ERROR) tests/' "$f" || true
    else  # killed: its results from the progress line, its failures from the lines printed as they happened
      n=$(grep -c '^FAILED NOW' "$f")
      p=$(grep -oE '^[.sxXFE]+' "$f" | tr -cd '.' | wc -c)
      passed=$((passed + p)); failed=$((failed + n))
      grep '^FAILED NOW' "$f" || true
      running="${f%.txt}.running"
      echo "UNFINISHED $(basename "$f") (killed at its time limit): $p passed, $n failed; it was in" \
        "$(cat "$running" 2>/dev/null || echo 'no test yet')"
    fi
  done
  echo "GPU tests: $total collected; $passed passed, $failed failed"
} | tee "$OUT/tests_summary.txt"
for f in "$W"/shard_*.txt; do echo "== $(basename "$f")"; cat "$f"; echo; done > "$OUT/pytest.txt"

#!/usr/bin/env bash
# Run the test suite on the lent GPU, sharded over N processes: the GPU run is bound by Triton
# compiling each kernel specialization, which is CPU work, and the device machine has 16 cores.
#   PYTHONPATH=src bash benchmarks/gpu_tests.sh [N]   -> prints one "N passed, M failed" line
#   TESTS="tests/test_varlen.py ..." limits it to those files or node ids.
set -uo pipefail
N=${1:-8}
OUT=${OUT:-/tmp/attend_out}
mkdir -p "$OUT"
python3 -m pytest ${TESTS:-tests} --collect-only -q -o addopts= -p no:cacheprovider 2>/dev/null | grep '::' > /tmp/attend_ids.txt
total=$(wc -l < /tmp/attend_ids.txt)
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' /tmp/attend_ids.txt > "/tmp/attend_shard_$i.txt"
  mapfile -t ids < "/tmp/attend_shard_$i.txt"
  python3 -m pytest -q -o addopts= -p no:cacheprovider "${ids[@]}" > "$OUT/pytest_shard_$i.txt" 2>&1 &
done
wait
passed=0; failed=0
for i in $(seq 0 $((N - 1))); do
  p=$(grep -Eo '[0-9]+ passed' "$OUT/pytest_shard_$i.txt" | grep -Eo '[0-9]+' || echo 0)
  f=0
  for n in $(grep -Eo '[0-9]+ (failed|errors?)' "$OUT/pytest_shard_$i.txt" | grep -Eo '^[0-9]+'); do f=$((f + n)); done
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
  grep -E '^(FAILED|ERROR)' "$OUT/pytest_shard_$i.txt" || true
done
echo "GPU tests: $total collected; $passed passed, $failed failed"
cat "$OUT"/pytest_shard_*.txt > "$OUT/pytest.txt"; rm -f "$OUT"/pytest_shard_*.txt

#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root:
#   CASES="d128-causal padding" SWEEP_ARGS="--kinds bwd --short --tma both" bash benchmarks/gpu_sweep.sh
# Compiles every candidate config of each case in parallel processes (warming Triton's disk
# cache), then times them all in one process. Writes $OUT/sweep.json, sweep.log, compile.log
# (failures only) and progress.txt: few files, since the device tool returns only a handful.
set -u
OUT=${OUT:-/tmp/attend-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
CASES=${CASES:-"d64-noncausal d64-causal d128-noncausal d128-causal bias-grad padding varlen-causal varlen-window"}
ARGS=${SWEEP_ARGS:-}
start=$(date +%s)
for c in $CASES; do
  timeout "${COMPILE_TIMEOUT:-300}" python benchmarks/sweep.py --compile-only --case "$c" $ARGS > "$LOGS/compile-$c.log" 2>&1 &
done
wait
grep -l -i "error\|Traceback" "$LOGS"/compile-*.log | while read -r f; do echo "== $f"; tail -5 "$f"; done > "$OUT/compile.log"
echo "compiled in $(( $(date +%s) - start )) s" > "$OUT/progress.txt"
for c in $CASES; do
  timeout "${CASE_TIMEOUT:-120}" python benchmarks/sweep.py --case "$c" $ARGS --json "$LOGS/sweep-$c.json" >> "$OUT/sweep.log" 2>&1
  echo "$c done at $(( $(date +%s) - start )) s" >> "$OUT/progress.txt"
done
python - "$LOGS" "$OUT/sweep.json" <<'PY'
import glob, json, sys
merged = {}
for f in sorted(glob.glob(sys.argv[1] + "/sweep-*.json")):
    merged.update(json.load(open(f)))
json.dump(merged, open(sys.argv[2], "w"), indent=1)
PY
grep -h " S=" "$OUT/sweep.log" | grep -v "{" | tail -40

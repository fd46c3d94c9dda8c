#!/usr/bin/env bash
# On a CUDA machine, from the repo root:
#   CASES="d128-causal padding" SWEEP_ARGS="--kinds bwd --short --tma both" bash benchmarks/gpu_sweep.sh
#   PLAN=jobs.txt bash benchmarks/gpu_sweep.sh   # one "case [sweep args]" per line (# comments allowed)
# Compiles every candidate config of each job in parallel processes (warming Triton's disk
# cache), then times them all one job after another (never two at once: they would share the
# GPU). Writes $OUT/sweep.json (keyed "case" or "case [args]"), sweep.log, compile.log (failures
# only) and progress.txt: few files, so the results stay small.
set -u
OUT=${OUT:-/tmp/attend-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${PLAN:-}" ]; then
  grep -v '^\s*\(#\|$\)' "$PLAN" > "$LOGS/jobs.txt"
else
  for c in ${CASES:-d64-noncausal d64-causal d128-noncausal d128-causal bias-grad padding varlen-causal varlen-window}; do
    echo "$c ${SWEEP_ARGS:-}" >> "$LOGS/jobs.txt"
  done
fi
mapfile -t JOBS < "$LOGS/jobs.txt"
start=$(date +%s)
for i in "${!JOBS[@]}"; do
  read -r -a job <<< "${JOBS[$i]}"
  timeout "${COMPILE_TIMEOUT:-300}" python benchmarks/sweep.py --compile-only --case "${job[@]}" > "$LOGS/compile-$i.log" 2>&1 &
done
wait
grep -l -i "error\|Traceback" "$LOGS"/compile-*.log | while read -r f; do echo "== $f"; tail -5 "$f"; done > "$OUT/compile.log"
echo "compiled in $(( $(date +%s) - start )) s" > "$OUT/progress.txt"
for i in "${!JOBS[@]}"; do
  read -r -a job <<< "${JOBS[$i]}"
  timeout "${CASE_TIMEOUT:-120}" python benchmarks/sweep.py --case "${job[@]}" --json "$LOGS/sweep-$i.json" >> "$OUT/sweep.log" 2>&1
  echo "${JOBS[$i]} done at $(( $(date +%s) - start )) s" >> "$OUT/progress.txt"
done
python - "$LOGS" "$OUT/sweep.json" <<'PY'
import glob, json, sys
merged = {}
jobs = open(sys.argv[1] + "/jobs.txt").read().splitlines()
for i, line in enumerate(jobs):
    try:
        res = json.load(open(f"{sys.argv[1]}/sweep-{i}.json"))
    except OSError:
        continue
    for case, rows in res.items():
        merged[line.strip() if line.split()[1:] else case] = rows
json.dump(merged, open(sys.argv[2], "w"), indent=1)
PY
grep -h " S=" "$OUT/sweep.log" | grep -v "{" | tail -60

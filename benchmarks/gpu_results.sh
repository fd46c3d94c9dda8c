#!/usr/bin/env bash
# Regenerate benchmarks/RESULTS.md's GPU tables in one call on a CUDA machine, from the repo root:
#   OUT=/tmp/attend-results bash benchmarks/gpu_results.sh
#   STEPS="core masks" bash benchmarks/gpu_results.sh      # a subset (to fit a time limit)
# Steps, each bounded by STEP_TIMEOUT seconds (default 900) and written to $OUT as it finishes:
#   machine   nvidia-smi and `python -m attend info`           -> machine.txt
#   core      the dense table with every peer, decode rows too -> core.json, core.txt
#   views     D=128 contiguous against a model's (B, S, H, D) views, attend and PyTorch -> views.json, views.txt
#   masks     bias, key padding, varlen, sliding window        -> masks.json, masks.txt
#   backends  every attend backend and flash impl, D=128 16k   -> backends.json, backends.txt
#   flex      attend.flex_attention against compiled flex      -> flex.json, flex.txt
#   models    transformers training step and generation        -> models.json, models.txt
#             (each training row's first step again in a fresh process: about 2 minutes more)
#   plot      the README's figure from core.json and masks.json -> summary.png
#   cpu       (not in the default STEPS) the CPU table on this host's CPU -> cpu.txt
# FA4 rows need flash-attn-4 installed (else they show its error). Copy the JSON into
# benchmarks/results/ as <date>-<card>-<suite>.json, then the tables into RESULTS.md.
set -uo pipefail
OUT=${OUT:-/tmp/attend-results}
STEPS=${STEPS:-machine core views masks backends flex models plot}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
T=${STEP_TIMEOUT:-900}

bench() {  # name, then `python -m attend bench` arguments
  local name=$1; shift
  echo "== $name: python -m attend bench $*"
  timeout "$T" python3 -m attend bench --device cuda "$@" > "$OUT/$name.txt" 2> "$OUT/$name.progress.txt"
  echo "$name exit $?"; cat "$OUT/$name.txt"
}

for step in $STEPS; do
  case $step in
    machine)
      { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m attend info; } \
        > "$OUT/machine.txt" 2>&1; cat "$OUT/machine.txt" ;;
    core)
      bench core --seqs 1024,4096,16384 --dims 128,64 --no-views \
        --impls attend,attend-fa4,torch-flash,torch-efficient,torch-cudnn,flex-compiled \
        --json "$OUT/core.json" --png "$OUT/core.png" ;;
    views)
      bench views --seqs 1024,4096,16384 --dims 128 --no-decode --impls attend,torch-flash,torch-cudnn \
        --json "$OUT/views.json" --png "$OUT/views.png" ;;
    masks)
      bench masks --suite masks --masks-json "$OUT/masks.json" ;;
    backends)
      bench backends --impls backends --seqs 16384 --dims 128 --no-gqa --no-decode \
        --json "$OUT/backends.json" --png "$OUT/backends.png" ;;
    flex)
      bench flex --suite flex --flex-json "$OUT/flex.json" ;;
    models)
      bench models --suite models --models-json "$OUT/models.json" ;;
    plot)
      python3 benchmarks/plot.py --core "$OUT/core.json" --masks "$OUT/masks.json" --out "$OUT/summary.png" ;;
    cpu)
      timeout "$T" python3 benchmarks/cpu_attention.py --reps 7 > "$OUT/cpu.txt" 2>&1; cat "$OUT/cpu.txt" ;;
    *)
      echo "unknown step $step (known: machine core views masks backends flex models plot cpu)"; exit 2 ;;
  esac
done

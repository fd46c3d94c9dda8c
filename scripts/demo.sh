#!/usr/bin/env bash
# Set up, then show what attend can do here: versions and backends, one decision, one benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
step() { printf '\n$ %s\n' "$*"; "$@"; }
step python -m attend info
step python -m attend explain --batch 2 --heads 8 --q-len 1024 --head-dim 64 --mask padding
# Two untimed calls per implementation first (thread pools, allocator), then the median of five:
# fewer repetitions, on a fresh process, time the one-off costs instead of the kernels.
step python -m attend bench --seq 1024 --causal --warmup 2 --reps 5

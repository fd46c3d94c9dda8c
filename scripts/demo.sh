#!/usr/bin/env bash
# Set up, then show what attend can do here: versions and backends, one decision, one benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m attend info
python -m attend explain --batch 2 --heads 8 --q-len 1024 --head-dim 64 --mask padding
python -m attend bench --seq 1024 --causal --reps 2

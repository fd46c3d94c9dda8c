#!/usr/bin/env bash
# The oldest supported transformers beside the newest: a venv that sees this Python's packages
# (torch, pytest, attend installed editable by setup.sh) but has its own transformers, runs the
# integration tests that only it can run: continuous batching through "paged|attend"
# (transformers 5.17-5.22; later versions run only their own implementations there).
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS_OLDEST=${TRANSFORMERS_OLDEST:-5.17.0}
VENV=${TRANSFORMERS_OLDEST_VENV:-.venv-transformers-oldest}
bash scripts/side_venv.sh "$VENV" transformers "$TRANSFORMERS_OLDEST"
"$VENV/bin/python" -m pytest tests/test_transformers.py -k "paged or generate_batch or registered or batch_phase" "$@"

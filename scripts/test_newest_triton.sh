#!/usr/bin/env bash
# The newest supported Triton beside the pinned one: a venv that sees this Python's packages
# (torch, pytest, attend installed editable by setup.sh) but has its own Triton, runs the sm_90 /
# sm_80 build check of every shipped config and the Gluon kernels, an interpreter subset, and the
# compiles handed to forked children through Triton's private async-compile hook.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_NEWEST=${TRITON_NEWEST:-3.9.0}
VENV=${TRITON_NEWEST_VENV:-.venv-triton-newest}
bash scripts/side_venv.sh "$VENV" triton "$TRITON_NEWEST"
"$VENV/bin/python" -m pytest tests/test_triton_build.py tests/test_versions.py tests/test_ops.py \
  tests/test_fastlaunch.py tests/test_varlen.py tests/test_forkcompile.py -k "not gpu" "$@"

#!/usr/bin/env bash
# Install attend (editable) with its dev requirements into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps -e .

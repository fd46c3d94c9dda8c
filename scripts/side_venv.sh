#!/usr/bin/env bash
# A venv beside this Python's packages (torch, pytest, attend installed editable by setup.sh) with
# one package pinned to another version; prints nothing, fails if that version did not install.
#   bash scripts/side_venv.sh VENV PACKAGE VERSION   then run VENV/bin/python
set -euo pipefail
VENV=$1 PACKAGE=$2 VERSION=$3
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q "$PACKAGE==$VERSION"
"$VENV/bin/python" -c "import $PACKAGE; assert $PACKAGE.__version__ == '$VERSION', $PACKAGE.__version__"

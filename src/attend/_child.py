"""The environment of a Python child process that must run this copy of attend."""

from __future__ import annotations

import os


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with the directory this ``attend`` package was imported from
    first on ``PYTHONPATH``: a child started with ``sys.executable`` then imports the same tree as
    its parent, not whichever checkout an editable install points at."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env

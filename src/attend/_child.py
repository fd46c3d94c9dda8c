"""The environment of a Python child process that must run this copy of attend, and the Triton
toolchain that attend's benchmark rows build with."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# The variables that choose Triton's toolchain, and so the machine code of every kernel it builds.
# Inductor sets them the first time it compiles, where they are unset: TRITON_PTXAS_PATH to torch's
# own ptxas (CUDA 13.0 in torch 2.11+cu130, against Triton 3.6's 12.8), TRITON_LIBDEVICE_PATH under
# its eager-numerics options. Every Triton build after that in the process, attend's included, runs
# that ptxas (Triton reads the variable per build, but keys its disk cache by the ptxas version it
# found first: ``get_ptxas_version``'s cache), and a child process inherits it: its keys then differ
# from its parent's, and it builds every kernel again (RESULTS.md, "H100, 2026-12-07 (late)").
# Inductor's eager-numerics options (off by default) set Triton's libdevice knob itself, not only
# the variable: that one ``started_toolchain`` does not undo.
TOOLCHAIN_VARS = ("TRITON_PTXAS_PATH", "TRITON_LIBDEVICE_PATH")
# As they were when this module was first imported: before any row of a benchmark ran.
_AT_START = {v: os.environ.get(v) for v in TOOLCHAIN_VARS}


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with the directory this ``attend`` package was imported from
    first on ``PYTHONPATH``: a child started with ``sys.executable`` then imports the same tree as
    its parent, not whichever checkout an editable install points at."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def started_child_env(**extra: str) -> dict[str, str]:
    """``child_env``, with the toolchain variables as they were at the start (``_AT_START``): a
    benchmark's fresh process is a user's new process, whatever its parent compiled since."""
    env = child_env(**extra)
    _assign(env, _AT_START)
    return env


@contextlib.contextmanager
def started_toolchain() -> Iterator[None]:
    """Inside, the toolchain variables are as they were at the start; outside, as they were before.
    A benchmark runs attend's rows in it, so that their kernels build with the same ptxas whichever
    peer ran first (compiled FlexAttention points TRITON_PTXAS_PATH at torch's), and its peers keep
    what they set for themselves."""
    before = {v: os.environ.get(v) for v in TOOLCHAIN_VARS}
    _use(_AT_START)
    try:
        yield
    finally:
        _use(before)


def _use(values: dict) -> None:
    """Set the toolchain variables of this process to ``values``; where that changes one, drop
    Triton's memo of the ptxas version first, so the next build is keyed by the ptxas that builds it."""
    if any(os.environ.get(n) != v for n, v in values.items()):
        _forget_ptxas_version()
    _assign(os.environ, values)


def _forget_ptxas_version() -> None:
    """Drop Triton's per-process memo of the ptxas version, part of every compile's cache key, so
    that the next build keys its kernel by the ptxas that builds it (a private function of Triton's
    NVIDIA backend: where it is missing, nothing is done)."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return
    clear = getattr(getattr(compiler, "get_ptxas_version", None), "cache_clear", None)
    if clear is not None:
        clear()


def row_toolchain(impl: str) -> contextlib.AbstractContextManager:
    """A benchmark row's toolchain: ``started_toolchain`` for attend's rows (``impl`` named
    ``attend...``), so that they build their kernels with the ptxas in force when the bench
    started, whichever peer ran before them; a peer's row keeps what it set."""
    return started_toolchain() if impl.startswith("attend") else contextlib.nullcontext()


def _assign(env, values: dict) -> None:
    """``values`` into the mapping ``env``, a None removing its variable."""
    for name, value in values.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value

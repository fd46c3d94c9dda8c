"""Which backends may run, and in what order: the ``sdpa_kernel`` state (no torch import).

The state lives in a ``ContextVar`` so that threads and asyncio tasks do not leak settings
into each other, unlike PyTorch's global flags.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ._enums import ALL_BACKENDS, SDPBackend


@dataclass(frozen=True)
class BackendState:
    enabled: frozenset[SDPBackend]
    # User priority from ``sdpa_kernel(..., set_priority=True)``; None = the device default.
    priority: tuple[SDPBackend, ...] | None = None


_STATE: contextvars.ContextVar[BackendState] = contextvars.ContextVar(
    "attend_sdpa_backends", default=BackendState(frozenset(ALL_BACKENDS))
)


def current_state() -> BackendState:
    return _STATE.get()


def order_backends(state: BackendState, default_order: Sequence[SDPBackend]) -> list[SDPBackend]:
    """The full priority order: the user's order first (if set), then the device default."""
    head = list(state.priority or ())
    return head + [b for b in default_order if b not in head]


def as_backend(b: object) -> SDPBackend | None:
    """attend's member for ``b``: an attend ``SDPBackend``, or PyTorch's
    ``torch.nn.attention.SDPBackend`` member of the same name (a pybind enum, matched by its
    type's module so this layer needs no torch import); None for anything else."""
    if isinstance(b, SDPBackend):
        return b
    name = getattr(b, "name", None)
    if type(b).__module__.partition(".")[0] == "torch" and name in SDPBackend.__members__:
        return SDPBackend[name]
    return None


def _normalize(backends: object) -> list[SDPBackend]:
    if as_backend(backends) is not None:
        backends = [backends]
    if not isinstance(backends, (list, tuple)):
        raise TypeError(
            "backends must be an SDPBackend or a list of SDPBackend (attend's or torch.nn.attention's), "
            f"got {type(backends).__name__}: {backends!r}"
        )
    chosen = []
    for b in backends:
        member = as_backend(b)
        if member is None:
            raise TypeError(f"backends must contain SDPBackend members, got {type(b).__name__}: {b!r}")
        if member is SDPBackend.ERROR:
            raise ValueError("SDPBackend.ERROR is not a backend that can be enabled")
        chosen.append(member)
    return list(dict.fromkeys(chosen))


@contextlib.contextmanager
def sdpa_kernel(backends: SDPBackend | Sequence[SDPBackend], set_priority: bool = False) -> Iterator[None]:
    """Restrict scaled dot-product attention to ``backends`` inside the ``with`` block.

    Args:
        backends: one :class:`SDPBackend` or a list of them (attend's members or PyTorch's
            ``torch.nn.attention.SDPBackend``); only these may run.
        set_priority: if True, the list order is the priority order (first = tried first);
            backends not listed keep their default relative order behind them.

    The previous state is restored on exit, also when the block raises, and blocks nest.
    The state is per thread and per asyncio task (a ``ContextVar``).

    Example::

        with attend.sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            out = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    """
    if not isinstance(set_priority, int):  # a bool, or 0 / 1 as PyTorch takes; never a string
        raise TypeError(f"set_priority must be a bool, got {type(set_priority).__name__}: {set_priority!r}")
    chosen = _normalize(backends)
    prev = _STATE.get()
    priority = tuple(chosen) if set_priority else prev.priority
    token = _STATE.set(BackendState(frozenset(chosen), priority))
    try:
        yield
    finally:
        _STATE.reset(token)

"""The one registry of attend's fused kernels: which launchers serve each ``Kernel``, for the
dense op pair (``attention.py``) and the packed one (``varlen.py``) alike."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..cpu import blocked
from ..cpu import varlen as cpu_varlen


class Kernel(str, enum.Enum):
    """A launcher family; the custom ops carry its value ("blocked", "triton")."""

    BLOCKED = "blocked"  # torch ops on any device (attend.cpu)
    TRITON = "triton"  # attend's Triton core (attend.kernels.launch)


@dataclass(frozen=True)
class Launchers:
    """One kernel's launchers: dense ``forward`` / ``backward`` with ``attend.cpu.blocked``'s
    signatures, packed ``varlen_forward`` / ``varlen_backward`` with ``attend.cpu.varlen``'s."""

    forward: Callable
    backward: Callable
    varlen_forward: Callable
    varlen_backward: Callable


KERNELS: dict[Kernel, Launchers] = {
    Kernel.BLOCKED: Launchers(blocked.forward, blocked.backward, cpu_varlen.varlen_forward,
                              cpu_varlen.varlen_backward)}
TRITON_IMPORT_ERROR: str | None = None
try:
    from ..kernels import launch as _launch
    from ..kernels.versions import EXPERIMENTAL, experimental_status
except ImportError as e:  # no triton installed
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    EXPERIMENTAL = {}

    def experimental_status() -> dict[str, str]:
        return {}
else:
    KERNELS[Kernel.TRITON] = Launchers(_launch.forward, _launch.backward, _launch.varlen_forward,
                                       _launch.varlen_backward)


def launchers(kernel: str) -> Launchers:
    """The launchers of ``kernel`` (a ``Kernel`` or its value); a ValueError names the kernels
    there are, and why Triton's is missing when it is."""
    try:
        return KERNELS[Kernel(kernel)]
    except (ValueError, KeyError):
        why = f" (attend's Triton core is unavailable: {TRITON_IMPORT_ERROR})" if kernel == Kernel.TRITON else ""
        raise ValueError(f"unknown attend kernel {kernel!r}; known: {sorted(k.value for k in KERNELS)}{why}") from None

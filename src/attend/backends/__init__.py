"""The backends and the default priority order per device type.

``DEFAULT_PRIORITY`` is the order tried when ``sdpa_kernel(..., set_priority=True)`` has not
set one. CPU: the blocked FLASH path keeps memory linear (2% of MATH's peak) at 1.2-1.9x
PyTorch's CPU kernel time (benchmarks/RESULTS.md), so it goes first, MATH last. CUDA: attend's
Triton FLASH, then PyTorch's cuDNN, then EFFICIENT (which takes masks), then MATH. The H100
table of 2026-11-27 measured cuDNN faster than attend's FLASH for prefill (0.7-0.97x) and equal
for decode; CUDA's order moves to measurement once the CUDNN backend has its GPU tests.
"""

from __future__ import annotations

from .._enums import SDPBackend
from ._base import Backend
from .cudnn import CudnnBackend
from .efficient import EfficientBackend
from .flash import FlashBackend
from . import flash_impls  # noqa: F401  (registers "FA2" and "FA4"; never activates them)
from .math import MathBackend, math_attention
from .overrideable import OverrideableBackend, register_overrideable

B = SDPBackend

BACKENDS: dict[SDPBackend, Backend] = {
    B.MATH: MathBackend(),
    B.FLASH_ATTENTION: FlashBackend(),
    B.EFFICIENT_ATTENTION: EfficientBackend(),
    B.CUDNN_ATTENTION: CudnnBackend(),
    B.OVERRIDEABLE: OverrideableBackend(),
}

DEFAULT_PRIORITY: dict[str, tuple[SDPBackend, ...]] = {
    "cuda": (B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH, B.OVERRIDEABLE),
    "cpu": (B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH, B.OVERRIDEABLE, B.CUDNN_ATTENTION),
}
# Any other device type: a registered implementation first, then the portable reference.
OTHER_DEVICE_PRIORITY = (B.OVERRIDEABLE, B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION)


def default_priority(device_type: str) -> tuple[SDPBackend, ...]:
    return DEFAULT_PRIORITY.get(device_type, OTHER_DEVICE_PRIORITY)


__all__ = [
    "BACKENDS", "DEFAULT_PRIORITY", "default_priority", "register_overrideable", "math_attention",
]

"""The backends and the default priority order per device type.

``DEFAULT_PRIORITY`` is the order tried when ``sdpa_kernel(..., set_priority=True)`` has not
set one, per device class (``device_class``):

- ``cpu``: the blocked FLASH path keeps memory linear in S (peak 2% of MATH's at 1x8x4096x64
  causal) at 1.2-1.9x PyTorch's CPU kernel time (benchmarks/RESULTS.md, "CPU"), so it
  goes first, then EFFICIENT (masks), MATH, OVERRIDEABLE; CUDNN, never usable on the CPU, last.
- ``cuda-sm90`` (Hopper): measured on an H100 (``benchmarks/gpu_results.sh``; benchmarks/RESULTS.md,
  "Dense attention against every peer", with its decode rows): PyTorch's cuDNN is the best
  built-in peer in most prefill cells, backward above all (attend reaches 0.80-1.07x of it), and
  within 2% of attend for decode, so CUDNN goes first (FA4, faster still, is an optional package
  the user activates as a flash implementation); calls it refuses
  (masks with grad, dropout on some versions, head dims) go to attend's FLASH, then EFFICIENT
  (which takes masks), then MATH.
- ``cuda`` (other GPUs, not measured): attend's FLASH, then cuDNN, EFFICIENT, MATH.
"""

from __future__ import annotations


import torch

from .._enums import SDPBackend
from ._base import Backend
from ._kernels import kernel_for, kernel_notes
from .cudnn import CudnnBackend
from .efficient import EfficientBackend
from .flash import FlashBackend
from . import flash_impls  # noqa: F401  (registers "FA2" and "FA4"; never activates them)
from .math import MathBackend, math_attention
from .overrideable import OverrideableBackend, register_overrideable, registry_version

B = SDPBackend

BACKENDS: dict[SDPBackend, Backend] = {
    B.MATH: MathBackend(),
    B.FLASH_ATTENTION: FlashBackend(),
    B.EFFICIENT_ATTENTION: EfficientBackend(),
    B.CUDNN_ATTENTION: CudnnBackend(),
    B.OVERRIDEABLE: OverrideableBackend(),
}

DEFAULT_PRIORITY: dict[str, tuple[SDPBackend, ...]] = {
    "cuda-sm90": (B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH, B.OVERRIDEABLE),
    "cuda": (B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH, B.OVERRIDEABLE),
    "cpu": (B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH, B.OVERRIDEABLE, B.CUDNN_ATTENTION),
}
# Any other device type: a registered implementation first, then the portable reference.
OTHER_DEVICE_PRIORITY = (B.OVERRIDEABLE, B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION)


# device -> its class: a dict, not functools.lru_cache, which Dynamo warns about where it traces
# an SDPA call (it ignores the wrapper and traces the function)
_DEVICE_CLASSES: dict[str, str] = {}


def device_class(device: torch.device | str) -> str:
    """The key into ``DEFAULT_PRIORITY``: ``cuda-sm90`` for Hopper GPUs, else the device type."""
    key = str(device)
    hit = _DEVICE_CLASSES.get(key)
    if hit is None:
        device = torch.device(device)
        hit = device.type
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) == (9, 0):
            hit = "cuda-sm90"
        _DEVICE_CLASSES[key] = hit
    return hit


def default_priority(device: torch.device | str) -> tuple[SDPBackend, ...]:
    """The default order for ``device`` (a device, or a device type string)."""
    return DEFAULT_PRIORITY.get(device_class(device), OTHER_DEVICE_PRIORITY)


__all__ = [
    "BACKENDS", "DEFAULT_PRIORITY", "default_priority", "device_class", "kernel_for", "kernel_notes",
    "register_overrideable", "registry_version", "math_attention",
]

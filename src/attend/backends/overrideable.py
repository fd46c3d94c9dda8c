"""OVERRIDEABLE: attention implementations registered per device type by users or vendors.

Register a function with the SDPA signature and, optionally, a check returning reasons::

    def my_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False): ...

    handle = attend.register_overrideable("my_device", my_sdpa, check=lambda params: [])
    ...
    handle.remove()

It then takes part in dispatch, ``explain`` and ``sdpa_kernel`` like any backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .._enums import SDPBackend
from .._params import SDPAParams


@dataclass
class _Entry:
    fn: Callable[..., torch.Tensor]
    check: Callable[[SDPAParams], list[str]] | None


_impls: dict[str, _Entry] = {}
_version = 0  # bumped whenever _impls changes: the dispatcher's decision cache keys on it


def registry_version() -> int:
    """A number that changes whenever an implementation is registered or removed."""
    return _version


class _Handle:
    def __init__(self, device_type: str, entry: _Entry) -> None:
        self._device_type, self._entry = device_type, entry

    def remove(self) -> None:
        global _version
        if _impls.get(self._device_type) is self._entry:
            del _impls[self._device_type]
            _version += 1


def register_overrideable(
    device_type: str,
    fn: Callable[..., torch.Tensor],
    check: Callable[[SDPAParams], list[str]] | None = None,
) -> _Handle:
    """Register ``fn`` as the OVERRIDEABLE implementation for ``device_type``; returns a handle."""
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f"device_type must be a non-empty str like 'cuda' or 'xpu', got {device_type!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"check must be callable or None, got {type(check).__name__}")
    global _version
    entry = _Entry(fn, check)
    _impls[device_type] = entry
    _version += 1
    return _Handle(device_type, entry)


class OverrideableBackend:
    backend = SDPBackend.OVERRIDEABLE

    def cacheable_check(self, p: SDPAParams) -> bool:
        # A registered check is the user's: it may read anything of the call.
        entry = _impls.get(p.device_type)
        return entry is None or entry.check is None

    def key_length_class(self, p: SDPAParams) -> bool:
        return self.cacheable_check(p)  # no check, or none registered: nothing of the call is read

    def check(self, p: SDPAParams) -> list[str]:
        entry = _impls.get(p.device_type)
        if entry is None:
            return [f"no OVERRIDEABLE implementation is registered for device type {p.device_type!r}"]
        return list(entry.check(p)) if entry.check is not None else []

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        return _impls[p.device_type].fn(
            p.query, p.key, p.value, attn_mask=p.attn_mask, dropout_p=p.dropout, is_causal=p.is_causal,
            scale=scale, enable_gqa=p.enable_gqa,
        )

"""What every backend provides, and the shared front door into the fused op."""

from __future__ import annotations

import warnings
from typing import Callable, Protocol

import torch

from .._enums import SDPBackend
from .._layout import Band
from .._params import SDPAParams, default_scale, to_4d
from ..bias import CausalVariant
from ..ops import fused_attention


class Backend(Protocol):
    backend: SDPBackend

    def check(self, p: SDPAParams) -> list[str]:
        """Reasons this backend cannot run the call, one readable sentence each; [] = it can."""

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor: ...


def band_of(p: SDPAParams) -> Band:
    """The band of keys each query sees: none, or causal top-left (``is_causal``) or bottom-right."""
    v = p.causal_variant
    return Band() if v is None else Band.causal(bottom_right=v is CausalVariant.LOWER_RIGHT)


def mask_for_kernel(p: SDPAParams) -> torch.Tensor | None:
    """The dense mask in a shape that broadcasts against the 4-D (B, H, L, S) layout."""
    m = p.dense_mask
    if m is None or p.query.dim() <= 4:
        return m
    full = (*p.query.shape[:-1], p.key.shape[-2])
    return m.expand(full).reshape(-1, *full[-3:])


def run_fused(p: SDPAParams, scale: float | None, kernel: str) -> torch.Tensor:
    """Normalize to (B, H, L, E), run ``attend::fused_fwd`` and restore the caller's shape."""
    q, k, v = p.query, p.key, p.value
    out, _ = fused_attention(
        to_4d(q), to_4d(k), to_4d(v), mask_for_kernel(p), p.dropout, band_of(p),
        default_scale(q.shape[-1], scale), kernel,
    )
    return out.reshape(*q.shape[:-1], v.shape[-1])


def dtype_reasons(p: SDPAParams, allowed: tuple[torch.dtype, ...], what: str) -> list[str]:
    if p.query.dtype in allowed:
        return []
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    return [f"{what} supports dtypes {names}; got {str(p.query.dtype).removeprefix('torch.')}"]


def torch_check_reasons(can_use: Callable[..., bool], params, refused: str) -> list[str]:
    """Run one of PyTorch's ``can_use_*(params, debug=True)`` checks and return its warnings as
    reasons (PyTorch reports each failed condition as a warning); [] when it passes. A passing
    call is asked without debug first: recording warnings costs more than the check itself, on
    every call (a decode step's)."""
    if can_use(params, False):
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = can_use(params, True)
    if ok:
        return []
    return [m for m in (str(w.message).strip() for w in caught) if m] or [refused]

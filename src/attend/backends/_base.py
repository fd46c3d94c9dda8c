"""What every backend provides, the shared front door into the fused op, and the one into
PyTorch's own SDPA kernels."""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Protocol

import torch
import torch.nn.attention as torch_attention

from .._enums import SDPBackend
from .._layout import Band
from .._params import SDPAParams, default_scale, to_4d
from ..bias import CausalVariant
from ..ops import fused_attention


class Backend(Protocol):
    backend: SDPBackend

    def check(self, p: SDPAParams) -> list[str]:
        """Reasons this backend cannot run the call, one readable sentence each; [] = it can."""

    # Optional: ``cacheable_check(p) -> bool``, whether ``check(p)`` reads only what
    # ``attend._dispatch.signature`` keys on (False: it is asked on every call). Absent: True.
    # Optional: ``key_length_class(p) -> bool``, whether ``check(p)`` reads the key length and K / V's
    # strides only through their class (``attend._dispatch``, Note [key length class]); the answer
    # may depend on the kernel registries and ``p``'s device type only. Absent: False.

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


def _torch_sdp_flags() -> dict | None:
    """For each backend, PyTorch's global SDPA flags as ``torch.nn.attention.sdpa_kernel(backend)``
    sets them: (the getters, (setter, value) pairs), from its ``_backend_names`` table and the
    ``torch._C`` accessors it calls. None where this PyTorch has other names (then ``sdpa_kernel``
    itself is used). Built once: reading a pybind enum's ``.name`` costs a microsecond."""
    try:
        accessors = [(name, getattr(torch._C, f"_get_{flag}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{flag}"))
                     for flag, name in torch_attention._backend_names.items()]
    except AttributeError:
        return None
    getters = tuple(get for _, get, _ in accessors)
    return {b: (getters, tuple((set_, name == b.name) for name, _, set_ in accessors))
            for b in SDPBackend if b is not SDPBackend.ERROR}


_TORCH_SDP_FLAGS = _torch_sdp_flags()
# PyTorch's SDPA flags are process-global: while torch_sdpa_only holds them changed (HELD > 0),
# another thread's backend choice may read them, so _dispatch.choose caches a choice only where
# none was held when it began and none changed (EPOCH) before it ended.
TORCH_FLAGS = {"HELD": 0, "EPOCH": 0}
_FLAGS_LOCK = threading.Lock()


def _flags_changing(step: int) -> None:
    with _FLAGS_LOCK:
        TORCH_FLAGS["HELD"] += step
        TORCH_FLAGS["EPOCH"] += 1


def torch_sdpa_only(backend: SDPBackend, *args, **kwargs) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)`` with only PyTorch's
    ``backend`` enabled: what it runs inside ``torch.nn.attention.sdpa_kernel(backend)``, whose
    global flags this sets and restores the same way, without the context manager's Python layers,
    which cost a decode step's call more host time than SDPA itself (one call per layer and token).
    Under torch.compile, and where PyTorch names its flags otherwise, the context manager itself."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if _TORCH_SDP_FLAGS is None or torch.compiler.is_compiling():
        with torch_attention.sdpa_kernel(getattr(torch_attention.SDPBackend, backend.name)):
            return sdpa(*args, **kwargs)
    getters, settings = _TORCH_SDP_FLAGS[backend]
    saved = [get() for get in getters]
    _flags_changing(+1)
    try:
        for set_, value in settings:
            set_(value)
        return sdpa(*args, **kwargs)
    finally:
        for (set_, _), was in zip(settings, saved):
            set_(was)
        _flags_changing(-1)

"""Built-in flash implementations for the registry: "FA2" (PyTorch's bundled flash kernels) and
"FA4" (the ``flash-attn-4`` package, ``flash_attn.cute.interface``).

Both register on import and never activate on import. Activating one checks that its package
and GPU are there and raises ``RuntimeError`` naming what is missing; once active, its
``check`` states the calls it cannot take, so dispatch moves on to the next backend.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .. import _registry
from .._enums import SDPBackend
from .._params import SDPAParams, default_scale
from ..bias import CausalVariant
from ._base import dtype_reasons, torch_check_reasons, torch_sdpa_only

_HALF = (torch.float16, torch.bfloat16)


def _common_reasons(p: SDPAParams, name: str) -> list[str]:
    reasons = []
    if p.device_type != "cuda":
        reasons.append(f"{name} runs on cuda tensors only; got {p.device_type}")
    reasons += dtype_reasons(p, _HALF, name)
    if p.dense_mask is not None:
        reasons.append(f"{name} takes no attn_mask tensor")
    return reasons


class TorchFlash:
    """PyTorch's own flash-attention kernels (FlashAttention-2), through its SDPA dispatcher."""

    name = "FA2"
    # reads the call's signature and PyTorch's flash flag and device; on ROCm also its preferred
    # flash library, which the decision cache does not key on
    cacheable_check = torch.version.hip is None
    key_length_class = cacheable_check  # S == L only (attend._dispatch, Note [key length class])

    def check(self, p: SDPAParams) -> list[str]:
        reasons = _common_reasons(p, self.name)
        L, S = p.query.shape[-2], p.key.shape[-2]
        if p.causal_variant is CausalVariant.LOWER_RIGHT and L != S:
            reasons.append(f"{self.name} through SDPA aligns causal masks top-left; bottom-right with L={L} != S={S}")
        if reasons:
            return reasons
        params = torch.backends.cuda.SDPAParams(p.query, p.key, p.value, None, p.dropout,
                                                p.causal_variant is not None, p.enable_gqa)
        return torch_check_reasons(torch.backends.cuda.can_use_flash_attention, params,
                                   "PyTorch's flash kernel refused the call")

    def forward(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        return torch_sdpa_only(SDPBackend.FLASH_ATTENTION, p.query, p.key, p.value, dropout_p=p.dropout,
                               is_causal=p.causal_variant is not None, scale=default_scale(p.query.shape[-1], scale),
                               enable_gqa=p.enable_gqa)


class FA4:
    """FlashAttention-4 (CuTe DSL). Its causal mask is bottom-right aligned, its layout
    ``(B, S, H, D)``; attend's ``(B, H, L, D)`` tensors are passed as transposed views."""

    name = "FA4"
    cacheable_check = True
    key_length_class = True  # S == L only
    HEAD_DIMS = (64, 96, 128)  # the Hopper head dims the package lists as supported

    def __init__(self, flash_attn_func: Callable) -> None:
        self._fn = flash_attn_func

    def check(self, p: SDPAParams) -> list[str]:
        reasons = _common_reasons(p, self.name)
        if p.query.dim() != 4:
            reasons.append(f"{self.name} takes 4-D (B, H, L, D) inputs; got {p.query.dim()}-D")
        if p.dropout > 0.0:
            reasons.append(f"{self.name} has no dropout; got dropout_p={p.dropout}")
        e, ev = p.query.shape[-1], p.value.shape[-1]
        if e != ev or e not in self.HEAD_DIMS:
            reasons.append(f"{self.name} supports head dims {self.HEAD_DIMS} (same for value); got {e}/{ev}")
        L, S = p.query.shape[-2], p.key.shape[-2]
        if p.causal_variant is CausalVariant.UPPER_LEFT and L != S:
            reasons.append(f"{self.name} aligns causal masks bottom-right; top-left with L={L} != S={S}")
        return reasons

    def forward(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (p.query, p.key, p.value))  # (B, S, H, D) views
        res = self._fn(q, k, v, softmax_scale=default_scale(p.query.shape[-1], scale),
                       causal=p.causal_variant is not None)
        out = res[0] if isinstance(res, tuple) else res
        return out.transpose(1, 2)


def _require_cuda(name: str, min_major: int) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{name} needs a CUDA GPU; torch.cuda.is_available() is False (torch {torch.__version__})")
    major, minor = torch.cuda.get_device_capability()
    if major < min_major:
        raise RuntimeError(f"{name} needs compute capability >= {min_major}.0; this GPU is sm_{major}{minor}")


def _register_fa2():
    _require_cuda("FA2", 8)
    if not torch.backends.cuda.is_flash_attention_available():
        raise RuntimeError(f"FA2 needs PyTorch built with flash attention; torch {torch.__version__} is not")
    return _registry.install_flash_kernel(TorchFlash())


def _register_fa4():
    try:
        interface = importlib.import_module("flash_attn.cute.interface")
    except ImportError as e:
        raise RuntimeError(
            "FA4 needs the flash-attn-4 package (module flash_attn.cute.interface) and its CuTe DSL "
            f"dependencies (nvidia-cutlass-dsl); importing it failed: {e}"
        ) from e
    _require_cuda("FA4", 9)
    return _registry.install_flash_kernel(FA4(interface.flash_attn_func))


_registry.register_flash_attention_impl("FA2", register_fn=_register_fa2)
_registry.register_flash_attention_impl("FA4", register_fn=_register_fa4)

"""FLASH: no arbitrary mask; the active flash implementation, or attend's own kernels.

Default implementation: attend's Triton core on CUDA tensors (and on CPU tensors when
Triton's interpreter is on); the blocked torch-ops path on other CPU calls. An implementation
activated through ``attend.activate_flash_attention_impl`` replaces it and supplies its own
``check``.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._enums import SDPBackend
from .._params import SDPAParams, fused_reasons
from ._base import dtype_reasons, run_fused
from ._kernels import TRITON_DTYPES, kernel_for, triton_reasons


class FlashBackend:
    backend = SDPBackend.FLASH_ATTENTION

    def cacheable_check(self, p: SDPAParams) -> bool:
        impl = _registry.active_flash_kernel()
        return impl is None or getattr(impl, "cacheable_check", False) is True

    def key_length_class(self, p: SDPAParams) -> bool:
        impl = _registry.active_flash_kernel()
        return impl is None or getattr(impl, "key_length_class", False) is True

    def check(self, p: SDPAParams) -> list[str]:
        reasons = fused_reasons(p, "FLASH")
        impl = _registry.active_flash_kernel()
        if impl is not None:
            return reasons + list(impl.check(p))
        if p.dense_mask is not None:
            reasons.append("FLASH takes no attn_mask tensor (only is_causal or an attend.bias.CausalBias)")
        kernel = kernel_for(p.query)
        if kernel == "triton":
            reasons += dtype_reasons(p, TRITON_DTYPES, "FLASH (attend Triton)")
            reasons += triton_reasons(p)
        elif kernel is None:
            reasons.append(f"FLASH has no kernel for device type {p.device_type!r}")
        return reasons

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        impl = _registry.active_flash_kernel()
        if impl is not None:
            return impl.forward(p, scale)
        return run_fused(p, scale, kernel_for(p.query))

"""EFFICIENT: the fused path that also takes bool/float masks (and their gradient)."""

from __future__ import annotations

import torch

from .._enums import SDPBackend
from .._params import SDPAParams, fused_reasons
from ._base import dtype_reasons, run_fused
from ._kernels import TRITON_MASK_DTYPES, kernel_for, triton_mask_reasons


class EfficientBackend:
    backend = SDPBackend.EFFICIENT_ATTENTION

    def key_length_class(self, p: SDPAParams) -> bool:
        return True  # the key length only with a mask, which keys exactly

    def check(self, p: SDPAParams) -> list[str]:
        reasons = fused_reasons(p, "EFFICIENT")
        kernel = kernel_for(p.query)
        if kernel == "triton":
            return reasons + dtype_reasons(p, TRITON_MASK_DTYPES, "EFFICIENT (attend Triton)") + triton_mask_reasons(p)
        if kernel is None:
            return reasons + [f"EFFICIENT has no kernel for device type {p.device_type!r}"]
        return reasons

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        return run_fused(p, scale, kernel_for(p.query))

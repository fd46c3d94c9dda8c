"""CUDNN_ATTENTION: PyTorch's own cuDNN attention, reached through PyTorch's dispatcher.

The check asks PyTorch's ``can_use_cudnn_attention(params, debug=True)`` and turns each
warning it raises into one reason, so the constraints are the installed PyTorch's real ones.
The call is PyTorch's SDPA with only its cuDNN backend enabled (``_base.torch_sdpa_only``), so
PyTorch's own handling of masks (its bool-to-additive conversion for cuDNN has changed between
releases), GQA, dropout, autocast and autograd applies unchanged.
"""

from __future__ import annotations

import torch

from .._enums import SDPBackend
from .._params import SDPAParams, default_scale, fused_reasons
from ._base import torch_check_reasons, torch_sdpa_only


_CUDNN_AVAILABLE = torch.backends.cudnn.is_available()


class CudnnBackend:
    backend = SDPBackend.CUDNN_ATTENTION

    def key_length_class(self, p: SDPAParams) -> bool:
        return True  # PyTorch's check as read in attend._dispatch, Note [key length class]

    def check(self, p: SDPAParams) -> list[str]:
        if p.device_type != "cuda":
            return [f"CUDNN runs on cuda tensors only; got {p.device_type}"]
        if torch.compiler.is_compiling():
            # PyTorch's predicate is C++ returning a bool, which dynamo cannot trace; attend's
            # own kernels are custom ops and trace cleanly, so the call moves on to them.
            return ["CUDNN is not selected under torch.compile (PyTorch's cuDNN check cannot be traced); "
                    "attend's fused kernels take the call"]
        if not _CUDNN_AVAILABLE:
            return ["cuDNN is not available in this PyTorch build"]
        if p.query.dim() != 4:
            return [f"CUDNN needs 4-D inputs; got {p.query.dim()}-D"]
        if reasons := fused_reasons(p, "CUDNN"):
            return reasons
        if p.query.shape[-1] == 0:
            return ["CUDNN takes no head dim 0"]
        if p.causal_variant is not None and not p.is_causal:
            return ["CUDNN takes an attend.bias.CausalBias only as a dense L x S mask; attend's fused kernels need none"]
        params = torch.backends.cuda.SDPAParams(p.query, p.key, p.value, p.dense_mask, p.dropout, p.is_causal,
                                                p.enable_gqa)
        return torch_check_reasons(torch.backends.cuda.can_use_cudnn_attention, params,
                                   "PyTorch's cuDNN attention refused the call")

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        return torch_sdpa_only(SDPBackend.CUDNN_ATTENTION, p.query, p.key, p.value, attn_mask=p.dense_mask,
                               dropout_p=p.dropout, is_causal=p.is_causal,
                               scale=default_scale(p.query.shape[-1], scale), enable_gqa=p.enable_gqa)

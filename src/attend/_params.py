"""Call parameters and up-front validation, shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .bias import CausalBias, CausalVariant


@dataclass
class SDPAParams:
    """The arguments of one attention call, as the backends' checks see them.

    Mirrors ``torch.backends.cuda.SDPAParams(query, key, value, attn_mask, dropout,
    is_causal, enable_gqa)``. ``attn_mask`` may be a bool or float tensor, a
    :class:`attend.bias.CausalBias`, or ``None``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: Any = None
    dropout: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False

    @property
    def device_type(self) -> str:
        return self.query.device.type

    @property
    def causal_variant(self) -> CausalVariant | None:
        """The causal alignment the call asks for (``is_causal`` or a ``CausalBias``), if any."""
        if isinstance(self.attn_mask, CausalBias):
            return self.attn_mask.variant
        return CausalVariant.UPPER_LEFT if self.is_causal else None

    @property
    def dense_mask(self) -> torch.Tensor | None:
        """The mask as a tensor, or None when there is none or it is a CausalBias."""
        return self.attn_mask if isinstance(self.attn_mask, torch.Tensor) else None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate(p: SDPAParams, scale: float | None) -> None:
    """Raise a clear error for every call that no backend may accept."""
    q, k, v = p.query, p.key, p.value
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims (..., seq, dim), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(
            f"query, key and value must have the same rank; got shapes {_shape(q)}, {_shape(k)}, {_shape(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query head dim {q.shape[-1]} != key head dim {k.shape[-1]}; they must match")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key has {k.shape[-2]} positions but value has {v.shape[-2]}; they must match")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key {_shape(k)} and value {_shape(v)} must agree on all dims but the last")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"query {_shape(q)} and key {_shape(k)} must have the same batch dims")
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        if not p.enable_gqa:
            raise ValueError(
                f"query has {hq} heads and key has {hkv}; pass enable_gqa=True for grouped-query attention"
            )
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"key has {hkv} heads, query has {hq}; {hq} is not a multiple of {hkv}")
    if not isinstance(p.dropout, (int, float)) or not (0.0 <= p.dropout < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {p.dropout!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    mask = p.attn_mask
    if mask is None:
        return
    if p.is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (use attend.bias.causal_* for causal masks)")
    if isinstance(mask, CausalBias):
        L, S = q.shape[-2], k.shape[-2]
        if (mask.seq_len_q, mask.seq_len_kv) != (L, S):
            raise ValueError(
                f"attn_mask is a CausalBias for ({mask.seq_len_q}, {mask.seq_len_kv}) but query/key "
                f"lengths are ({L}, {S})"
            )
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a Tensor, a CausalBias or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise TypeError(f"attn_mask has dtype {mask.dtype}; expected torch.bool or the query dtype {q.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device} but query is on {q.device}")
    target = (*q.shape[:-1], k.shape[-2])
    try:
        if torch.broadcast_shapes(mask.shape, target) != torch.Size(target):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {_shape(mask)} does not broadcast to (..., L, S) = {tuple(target)}"
        ) from None


def to_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) -> (B, H, L, E); 3-D inputs become one batch of their first dim as heads."""
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

"""MATH: the reference backend. Materializes the scores; any device and dtype."""

from __future__ import annotations

import torch

from .._enums import SDPBackend
from .._params import SDPAParams, default_scale
from ..bias import CausalBias


def _safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives 0 (and 0 gradients) for rows with no finite score."""
    if s.shape[-1] == 0:
        return s
    m = s.detach().amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    return e / denom.masked_fill(denom == 0, 1.0)


def _share_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped heads: query head h reads head h // (heads // t's heads), so each of ``t``'s heads
    serves a run of consecutive query heads (``repeat_interleave``, not ``repeat``)."""
    h = t.shape[-3]
    return t if h == heads else t.repeat_interleave(heads // h, dim=-3)


def math_attention(p: SDPAParams, scale: float | None) -> torch.Tensor:
    """Takes the normalized layout of ``_params.prepare``: key and value heads each divide the
    query's (they may differ from each other)."""
    q, k, v = p.query, p.key, p.value
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    L, S = q.shape[-2], k.shape[-2]
    heads = q.shape[-3]
    qc, kc, vc = q.to(cdt), _share_heads(k.to(cdt), heads), _share_heads(v.to(cdt), heads)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * default_scale(q.shape[-1], scale)
    mask = p.attn_mask
    if isinstance(mask, CausalBias):
        mask = mask.materialize(q.device)
    elif p.is_causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(cdt)
    a = _safe_softmax(s)
    if p.dropout > 0.0:
        a = torch.nn.functional.dropout(a, p.dropout, training=True)
    return torch.matmul(a, vc).to(q.dtype)


class MathBackend:
    backend = SDPBackend.MATH

    def check(self, p: SDPAParams) -> list[str]:
        return []

    def key_length_class(self, p: SDPAParams) -> bool:
        return True

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        return math_attention(p, scale)

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


def math_attention(p: SDPAParams, scale: float | None) -> torch.Tensor:
    q, k, v = p.query, p.key, p.value
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    L, S = q.shape[-2], k.shape[-2]
    hq, hkv = q.shape[-3], k.shape[-3]
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if hq != hkv:  # GQA: query head h reads key head h // (hq // hkv)
        kc = kc.repeat_interleave(hq // hkv, dim=-3)
        vc = vc.repeat_interleave(hq // hkv, dim=-3)
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

    def run(self, p: SDPAParams, scale: float | None) -> torch.Tensor:
        return math_attention(p, scale)

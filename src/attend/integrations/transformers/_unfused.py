"""The unfused path: torch ops over blocks of query rows, for attention dropout with a feature the fused
kernels serve without it."""

from __future__ import annotations

import math

import torch

from ._common import _Call
from ._packing import _ids_from_cu


def _allowed_rows(call: _Call, L: int, S: int, mask, kwargs, device):
    """A function ``(q0, q1) -> bool mask`` of query rows ``q0:q1`` (broadcastable to
    ``(B, 1, q1 - q0, S)``, True = may attend) for the unfused path, or None for all keys."""
    if call.mask_kind in ("keys", "dense"):
        return mask if mask.dtype == torch.bool else None
    ids = None
    if call.mask_kind == "packed":
        ids = mask if mask is not None else _ids_from_cu(kwargs["cu_seq_lens_q"], L)
    if not call.causal and call.window is None and call.mask_kind not in ("padding", "packed"):
        return None

    def rows(q0: int, q1: int) -> torch.Tensor:
        allowed = torch.ones(1, 1, q1 - q0, S, dtype=torch.bool, device=device)
        i = torch.arange(q0, q1, device=device)[:, None] + (S - L)  # bottom-right
        j = torch.arange(S, device=device)[None, :]
        if call.causal:
            allowed = allowed & (j <= i)
        if call.window is not None:
            allowed = allowed & ((j > i - call.window) if call.causal else ((j - i).abs() < call.window))
        if call.mask_kind == "padding":
            allowed = allowed & mask.to(torch.bool)[:, None, None, -S:]
        elif ids is not None:
            allowed = allowed & (ids[:, None, q0:q1, None] == ids[:, None, None, :])
        return allowed
    return rows


def _rows(mask, q0: int, q1: int):
    """Query rows q0:q1 of a mask broadcastable to (B, 1 or H, L, S), or of a mask function."""
    if mask is None:
        return None
    if callable(mask):
        return mask(q0, q1)
    return mask if mask.shape[-2] == 1 else mask[..., q0:q1, :]


# Scores held at once by the unfused path: rows of fp32 (B, H, rows, S) blocks within this budget.
UNFUSED_BLOCK_BYTES = 1 << 28


def _scores(qb, k, scale, softcap, allowed, additive):
    """fp32 scores of query rows ``qb`` ``(B, H, m, D)`` against ``k`` ``(B, H_kv, S, D)``, with the
    softcap (and its tanh, for the backward) and the masks applied."""
    Hkv = k.shape[1]
    G = qb.shape[1] // Hkv
    raw = torch.matmul(qb.unflatten(1, (Hkv, G)), k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
    raw = raw.to(torch.float32) * scale                                  # (B, H, m, S)
    t = None
    if softcap is not None:
        t = torch.tanh(raw / softcap)
        raw = softcap * t
    if additive is not None:
        raw = raw + additive.to(torch.float32)
    if allowed is not None:
        raw = raw.masked_fill(~allowed, float("-inf"))
    return raw, t


def _grouped(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    return x.unflatten(1, (Hkv, x.shape[1] // Hkv))                     # (B, Hkv, G, ...)


class _UnfusedAttention(torch.autograd.Function):
    """Blocked over query rows: the forward keeps (out, lse), the backward recomputes each block's
    scores, so memory is O(rows * S), not O(L * S), in both directions."""

    @staticmethod
    def forward(ctx, q, k, v, s_aux, allowed, additive, scale, softcap, rows):
        B, H, L, _ = q.shape
        Hkv = k.shape[1]
        out = q.new_empty(B, H, L, v.shape[-1])
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
        sink = s_aux.to(torch.float32).view(1, H, 1) if s_aux is not None else None
        for q0 in range(0, L, rows):
            q1 = min(L, q0 + rows)
            s, _ = _scores(q[:, :, q0:q1], k, scale, softcap, _rows(allowed, q0, q1), _rows(additive, q0, q1))
            peak = s.amax(-1)                                            # (B, H, m)
            if sink is not None:
                peak = torch.maximum(peak, sink)
            peak = peak.masked_fill(torch.isinf(peak), 0.0)
            p = torch.exp(s - peak[..., None])
            total = p.sum(-1)
            if sink is not None:
                total = total + torch.exp(sink - peak)
            p = p / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
            out[:, :, q0:q1] = torch.matmul(_grouped(p.to(v.dtype), Hkv), v.unsqueeze(2)).flatten(1, 2)
            lse[:, :, q0:q1] = peak + torch.log(total)                  # -inf for a row that sees nothing
        ctx.save_for_backward(q, k, v, s_aux, out, lse)
        ctx.masks = (allowed, additive)
        ctx.args = (scale, softcap, rows)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, s_aux, out, lse = ctx.saved_tensors
        allowed, additive = ctx.masks
        scale, softcap, rows = ctx.args
        B, H, L, _ = q.shape
        Hkv = k.shape[1]
        kf, vf = k.to(torch.float32), v.to(torch.float32)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        dsink = torch.zeros(H, dtype=torch.float32, device=q.device) if s_aux is not None else None
        for q0 in range(0, L, rows):
            q1 = min(L, q0 + rows)
            qb = q[:, :, q0:q1]
            s, t = _scores(qb, k, scale, softcap, _rows(allowed, q0, q1), _rows(additive, q0, q1))
            row_lse = lse[:, :, q0:q1]
            p = torch.exp(s - row_lse.masked_fill(torch.isinf(row_lse), 0.0)[..., None])   # (B, H, m, S)
            do = dout[:, :, q0:q1].to(torch.float32)
            delta = (do * out[:, :, q0:q1].to(torch.float32)).sum(-1)    # (B, H, m)
            dp = torch.matmul(_grouped(do, Hkv), vf.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
            ds = p * (dp - delta[..., None])
            if dsink is not None:  # the sink's weight is exp(s_aux - lse); it adds no value
                dsink -= (torch.exp(s_aux.to(torch.float32).view(1, H, 1) - row_lse) * delta).sum((0, 2))
            if t is not None:
                ds = ds * (1 - t * t)
            ds = ds * scale
            dq[:, :, q0:q1] = torch.matmul(_grouped(ds, Hkv), kf.unsqueeze(2)).flatten(1, 2)
            dk += torch.matmul(_grouped(ds, Hkv).transpose(-1, -2), _grouped(qb.to(torch.float32), Hkv)).sum(2)
            dv += torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(do, Hkv)).sum(2)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink.to(s_aux.dtype) if dsink is not None else None,
                None, None, None, None, None)


def unfused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed=None, *,
                      additive: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
                      s_aux: torch.Tensor | None = None, dropout: float = 0.0, block_rows: int | None = None) -> torch.Tensor:
    """Attention in torch ops with dropout, for the calls the fused kernels do not serve: attention
    dropout with a softcap, sinks, padding, packing or a sliding window (flex_attention and
    varlen_attn have no dropout).

    ``query`` ``(B, H, L, D)``, ``key`` / ``value`` ``(B, H_kv, S, D)`` (``H`` a multiple of ``H_kv``;
    K/V heads are broadcast, not repeated); ``allowed``: bool, broadcastable to ``(B, 1, L, S)``
    (True = may attend), or a function ``(q0, q1) -> `` that mask's rows ``q0:q1``; ``additive``: a
    float mask added to the scores (no gradient); ``softcap``: scores become
    ``softcap * tanh(scores / softcap)`` (Gemma 2); ``s_aux`` ``(H,)``: one learnable sink logit per
    head that joins the softmax and adds no value (gpt-oss). A row that sees no key is 0.

    Runs over blocks of ``block_rows`` query rows (default: fp32 score blocks of
    ``UNFUSED_BLOCK_BYTES``) with a hand-written backward that recomputes them, so memory stays
    ``O(block_rows * S)``; gradients reach query, key, value and ``s_aux``. With ``dropout`` the
    probabilities are kept for autograd instead (``O(L * S)``). Returns ``(B, H, L, D)``.
    """
    B, H, L, D = query.shape
    S = key.shape[-2]
    if H % key.shape[1]:
        raise ValueError(f"query has {H} heads and key {key.shape[1]}; {H} is not a multiple of {key.shape[1]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if additive is not None:
        additive = additive.detach()
    if dropout:
        return _unfused_with_dropout(query, key, value, _rows(allowed, 0, L), _rows(additive, 0, L), scale, softcap,
                                     s_aux, dropout)
    rows = block_rows or max(1, min(L, UNFUSED_BLOCK_BYTES // max(1, 4 * B * H * S)))
    return _UnfusedAttention.apply(query, key, value, s_aux, allowed, additive, scale, softcap, int(rows))


def _unfused_with_dropout(q, k, v, allowed, additive, scale, softcap, s_aux, dropout):
    s, _ = _scores(q, k, scale, softcap, allowed, additive)
    H = q.shape[1]
    peak = s.amax(-1, keepdim=True)
    if s_aux is not None:
        sink = s_aux.to(torch.float32).view(1, H, 1, 1)
        peak = torch.maximum(peak, sink)
    peak = peak.detach().masked_fill(torch.isinf(peak), 0.0)
    p = torch.exp(s - peak)
    total = p.sum(-1, keepdim=True)
    if s_aux is not None:
        total = total + torch.exp(sink - peak)
    p = torch.nn.functional.dropout(p / total.clamp_min(torch.finfo(torch.float32).tiny), p=dropout)
    return torch.matmul(_grouped(p.to(v.dtype), k.shape[1]), v.unsqueeze(2)).flatten(1, 2)


def _unfused(call: _Call, q, k, v, mask, kwargs, *, dropout, scale, softcap, s_aux):
    L, S = q.shape[-2], k.shape[-2]
    allowed = _allowed_rows(call, L, S, mask, kwargs, q.device)
    additive = mask if call.mask_kind == "dense" and mask.dtype != torch.bool else None
    return unfused_attention(q, k, v, allowed, additive=additive, scale=scale, softcap=softcap, s_aux=s_aux,
                             dropout=dropout)

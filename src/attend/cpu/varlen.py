"""Packed (varlen) attention on the CPU without Triton: the blocked kernel, one sequence at a time.

Same signatures as ``attend.kernels.launch.varlen_forward`` / ``varlen_backward``. A causal band
uses the blocked kernel's bottom-right causal mode; a sliding window (``left >= 0``) or a
two-sided band is passed as a ``(L_b, S_b)`` bool mask, so memory for a windowed sequence is
quadratic in its length here (the Triton core skips blocks instead).
"""

from __future__ import annotations

import torch

from .._layout import Band
from . import blocked


def _band_mask(L: int, S: int, band: Band, device=None) -> torch.Tensor:
    left, right = band.left, band.right
    i = torch.arange(L, device=device).unsqueeze(-1) + (S - L if band.bottom_right else 0)
    j = torch.arange(S, device=device)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def _plan(band: Band, L: int, S: int, device=None) -> tuple[torch.Tensor | None, Band]:
    """(mask, the blocked kernel's band) for one sequence's band: a causal band as one (varlen's is
    bottom-right aligned); any other bound (a window, keys right of the diagonal) as an (L, S) bool mask."""
    if band.is_causal_only:
        return None, band
    return _band_mask(L, S, band, device), Band()


def _sequences(packed):
    cu_q = packed.cu_q.tolist()
    cu_k = packed.cu_k.tolist() if packed.cu_k is not None else None
    used = packed.seqused_k.tolist() if packed.seqused_k is not None else None
    for b in range(len(cu_q) - 1):
        k0 = 0 if packed.table is not None else cu_k[b]
        S = used[b] if used is not None else cu_k[b + 1] - cu_k[b]
        yield b, cu_q[b], cu_q[b + 1], k0, S


def _keys(t: torch.Tensor, packed, b: int, k0: int, S: int) -> torch.Tensor:
    """Sequence b's keys (or values) as (1, Hkv, S, D): a slice, or gathered from pages."""
    if packed.table is None:
        return t[k0:k0 + S].transpose(0, 1).unsqueeze(0)
    pages = packed.table[b, : -(-S // packed.page_size)].long()
    rows = t[pages].flatten(0, 1)[:S]  # (S, Hkv, D)
    return rows.transpose(0, 1).unsqueeze(0)


def varlen_forward(q, k, v, packed, max_q: int, max_k: int, scale: float, band):
    T, H, _ = q.shape
    out = torch.zeros((T, H, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    for b, q0, q1, k0, S in _sequences(packed):
        if q1 == q0 or S == 0:  # nothing to attend to: out 0, lse -inf
            continue
        mask, seq_band = _plan(band, q1 - q0, S, q.device)
        qb = q[q0:q1].transpose(0, 1).unsqueeze(0)
        ob, lb = blocked.forward(qb, _keys(k, packed, b, k0, S), _keys(v, packed, b, k0, S), mask, 0.0, seq_band,
                                 scale, 0)
        out[q0:q1] = ob[0].transpose(0, 1)
        lse[:, q0:q1] = lb[0].float()
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, packed, max_q: int, max_k: int, scale: float, band, dlse=None):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, q0, q1, k0, S in _sequences(packed):
        if q1 == q0 or S == 0:
            continue
        mask, seq_band = _plan(band, q1 - q0, S, q.device)
        t4 = lambda t: t[q0:q1].transpose(0, 1).unsqueeze(0)  # noqa: E731
        lb = lse[:, q0:q1].unsqueeze(0)
        db = dlse[:, q0:q1].unsqueeze(0) if dlse is not None else None
        g = blocked.backward(t4(dout), t4(q), _keys(k, packed, b, k0, S), _keys(v, packed, b, k0, S), t4(out), lb,
                             mask, 0.0, seq_band, scale, 0, False, dlse=db)
        dq[q0:q1] = g[0][0].transpose(0, 1)
        dk[k0:k0 + S] = g[1][0].transpose(0, 1)
        dv[k0:k0 + S] = g[2][0].transpose(0, 1)
    return dq, dk, dv

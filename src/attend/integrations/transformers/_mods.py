"""The flex mods' bodies, module-level so that a compiled graph hands them to flex as ``BoundMod``s over
its tensors (``_traced``); the eager closures (``_routes._score_mod``) call the same bodies."""

from __future__ import annotations

import torch


def _capped(score, cap: float | None):
    """Gemma 2's logit softcap, ``cap * tanh(score / cap)``; the score itself for no cap."""
    return score if cap is None else cap * torch.tanh(score / cap)


def _capped_mod(score, b, h, q_idx, kv_idx, cap):
    return _capped(score, cap)


def _additive_mod(score, b, h, q_idx, kv_idx, additive, cap):
    return _capped(score, cap) + additive[b, h, q_idx, kv_idx]


def _keys_mod(score, b, h, q_idx, kv_idx, keys, cap):
    return torch.where(keys[b, kv_idx], _capped(score, cap), float("-inf"))


def _tensor_mask_mod(b, h, q_idx, kv_idx, m):
    return m[b, h, q_idx, kv_idx]


def _band_mod(b, h, q_idx, kv_idx, off: int, window: int | None, causal: bool):
    """Query i at key position i + off: causal keys j <= i + off, and j > i + off - window; without
    causal, |j - (i + off)| < window."""
    if not causal:
        return (kv_idx - (q_idx + off)).abs() < window
    keep = kv_idx <= q_idx + off
    return keep & (kv_idx > q_idx + off - window) if window is not None else keep

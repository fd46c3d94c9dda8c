"""FlexAttention with PyTorch's contract, fused without ``torch.compile``.

The mask helpers (``noop_mask``, ``and_masks``, ``or_masks``, ``create_mask``) work now. The
fused ``flex_attention`` and ``BlockMask`` need the score/mask hooks of attend's Triton core
(the mods traced with ``torch.fx`` and generated into Triton) and raise
``NotImplementedError`` until that lands.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["flex_attention", "BlockMask", "create_block_mask", "create_mask", "and_masks", "or_masks", "noop_mask"]

_MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_MISSING = "the score/mask hooks of attend's Triton core (mods generated into Triton), not built yet"


def noop_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """A mask_mod that masks nothing."""
    return q_idx.new_ones((), dtype=torch.bool).expand(torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape))


def and_masks(*mask_mods: _MaskMod) -> _MaskMod:
    """A mask_mod that keeps a position only where every ``mask_mod`` keeps it."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"and_masks takes mask_mod callables, got {mask_mods!r}")

    def mask_mod(b, h, q_idx, kv_idx):
        out = noop_mask(b, h, q_idx, kv_idx)
        for m in mask_mods:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def or_masks(*mask_mods: _MaskMod) -> _MaskMod:
    """A mask_mod that keeps a position where any ``mask_mod`` keeps it."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"or_masks takes mask_mod callables, got {mask_mods!r}")

    def mask_mod(b, h, q_idx, kv_idx):
        out = ~noop_mask(b, h, q_idx, kv_idx)
        for m in mask_mods:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def create_mask(mask_mod: _MaskMod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device="cpu") -> torch.Tensor:
    """The dense ``(B, H, Q_LEN, KV_LEN)`` bool mask of ``mask_mod`` (``None`` B/H = 1)."""
    B, H = B or 1, H or 1
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(Q_LEN, device=device).view(1, 1, Q_LEN, 1)
    kv = torch.arange(KV_LEN, device=device).view(1, 1, 1, KV_LEN)
    return mask_mod(b, h, q, kv).expand(B, H, Q_LEN, KV_LEN).to(torch.bool)


class BlockMask:
    """Block-sparse description of a mask (needs the Triton core's block-sparse iteration)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"attend.flex_attention.BlockMask needs {_MISSING}")


def create_block_mask(mask_mod: _MaskMod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128):
    """Build a :class:`BlockMask` from ``mask_mod`` (not yet implemented)."""
    raise NotImplementedError(f"attend.flex_attention.create_block_mask needs {_MISSING}")


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None):
    """FlexAttention fused without torch.compile (not yet implemented)."""
    raise NotImplementedError(f"attend.flex_attention.flex_attention needs {_MISSING}")

"""Variable-length (packed) attention: ``varlen_attn`` with PyTorch's contract.

Packed ``(T, H, D)`` tensors with ``cu_seq_q`` / ``cu_seq_k`` offsets. The fused
implementation is a feature of attend's Triton core (variable-length offsets, windows, paged
KV) and lands with the masks work; until then ``varlen_attn`` raises ``NotImplementedError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["varlen_attn", "AuxRequest"]


@dataclass(frozen=True)
class AuxRequest:
    """Extra outputs to return from :func:`varlen_attn`: ``lse=True`` adds the log-sum-exp."""

    lse: bool = False


def varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
):
    """Attention over packed sequences (not yet implemented: needs the core's varlen offsets)."""
    raise NotImplementedError(
        "attend.varlen.varlen_attn needs the variable-length feature of attend's Triton core, "
        "which is not built yet"
    )

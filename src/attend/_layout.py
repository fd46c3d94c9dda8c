"""How a fused call is laid out beyond (B, H, L, D): the band of keys each query sees, and
where packed (varlen) sequences live. Shared by the Triton launchers and the CPU path."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Band:
    """Which keys a query sees: query ``i`` sees key ``j`` iff ``i + d - left <= j <= i + d + right``,
    a bound < 0 meaning unbounded on that side, with ``d = S - L`` when ``bottom_right`` (each
    sequence's last query and key aligned) and 0 otherwise (``is_causal``)."""

    left: int = -1
    right: int = -1
    bottom_right: bool = False

    @staticmethod
    def from_causal(causal: int) -> "Band":
        """attend's causal code: 0 none, 1 top-left (``is_causal``), 2 bottom-right."""
        return Band() if causal == 0 else Band(-1, 0, causal == 2)


@dataclass(frozen=True)
class Packed:
    """Packed sequences: ``cu_q``/``cu_k`` int32 offsets into ``(T, H, D)`` tensors; optional
    ``seqused_k`` (keys used per sequence) and ``table`` (paged KV pool, forward only)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor | None
    seqused_k: torch.Tensor | None = None
    table: torch.Tensor | None = None
    page_size: int = 16

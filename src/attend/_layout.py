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
    def causal(bottom_right: bool = False) -> "Band":
        """Keys up to the diagonal: top-left aligned (``is_causal``) or bottom-right."""
        return Band(-1, 0, bottom_right)

    @property
    def is_causal_only(self) -> bool:
        """No band, or a causal one (no window, no keys right of the diagonal)."""
        return self.left < 0 and self.right in (-1, 0)

    def to_op(self) -> list[int]:
        """The custom ops' encoding (their schemas carry ints, not objects): [left, right,
        bottom_right]. ``from_op`` is its inverse; nothing else converts."""
        return [int(self.left), int(self.right), int(self.bottom_right)]

    @staticmethod
    def from_op(band: list[int]) -> "Band":
        left, right, bottom_right = band
        return Band(int(left), int(right), bool(bottom_right))


@dataclass(frozen=True)
class Packed:
    """Packed sequences: ``cu_q``/``cu_k`` int32 offsets into ``(T, H, D)`` tensors; optional
    ``seqused_k`` (keys used per sequence) and ``table`` (paged KV pool, forward only)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor | None
    seqused_k: torch.Tensor | None = None
    table: torch.Tensor | None = None
    page_size: int = 16

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
    ``seqused_k`` (keys used per sequence) and ``table`` (paged KV pool, forward only).
    ``uniform``: every sequence has the call's L queries and S keys (a row call's, made only by
    ``launch._offsets`` from the L and S its launches pass on), so the Gluon kernels compute
    sequence b's offsets as b * L and b * S instead of loading them per tile."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor | None
    seqused_k: torch.Tensor | None = None
    table: torch.Tensor | None = None
    page_size: int = 16
    uniform: bool = False


# ---- model layouts ----------------------------------------------------------------------------
# A model projects to (B, L, H * D), views it as (B, L, H, D) and hands attention the
# .transpose(1, 2) view: (B, H, L, D) whose rows of H * D elements are one token's heads. The
# Triton launchers serve such "row" views as B packed sequences of one length (the Hopper Gluon
# kernels read (T, H * D) rows through TMA), and give back outputs in the same layout, so the
# model's .transpose(1, 2).reshape(B, L, H * Dv) after attention is free.


def is_rows(t: torch.Tensor) -> bool:
    """Whether the 4-D ``t`` (B, H, L, E) is laid out as the .transpose(1, 2) view of a contiguous
    (B, L, H, E) tensor: strides (L * H * E, E, H * E, 1), but any on a dim of size 1 (a reshape
    of one sequence's view, B = 1, may give its batch dim another)."""
    if t.dim() != 4:
        return False
    B, H, L, E = t.shape
    return all(n == 1 or s == w for n, s, w in zip(t.shape, t.stride(), (L * H * E, E, H * E, 1)))


def rows_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float) -> bool:
    """Whether a dense fused call's q is laid out as a model's projection (``is_rows``, and not also
    contiguous: more than one head and row), with k and v either so too or contiguous (a KV
    cache's), no mask and no dropout: the Triton launchers then return out and lse in
    ``empty_in_layout`` / ``rows_lse``'s layouts, and their backward dq / dk / dv laid out as q / k / v."""
    return (mask is None and dropout_p == 0.0 and q.shape[1] > 1 and q.shape[2] > 1 and is_rows(q)
            and all(is_rows(t) or t.is_contiguous() for t in (k, v)))


def empty_in_layout(q: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An empty (B, H, L, E) tensor of ``shape`` in q's dtype whose first three dims are laid out as
    q's are (E innermost): a row call's output is the model's (B, L, H, E) layout, a contiguous q's
    contiguous. Made by strides, not as a view (an op's output takes in-place ops only if it is
    none)."""
    order = sorted(range(3), key=lambda d: -q.stride(d))  # b, h, l from outermost to innermost
    strides, step = [0, 0, 0, 1], shape[3]
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=q.dtype, device=q.device)


def rows_lse(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty LSE (B, H, L) of a ``rows_call`` over (H, B, L) storage, whose (H, B * L) view is the
    packed LSE the varlen launchers write (one row of T = B * L tokens per head)."""
    B, H, L, _ = q.shape
    return torch.empty_strided((B, H, L), (L, B * L, 1), dtype=dtype, device=q.device)

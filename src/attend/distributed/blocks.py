"""One ring step's work: which (query rows, key rows, band) attention calls a step makes, the
calls themselves (attend's fused op pair), and the exact merge of partial results by LSE.

Pure functions of shapes and positions (no process group), so they are tested without one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

import torch

from .._layout import Band
from .layout import chunk_ids, chunks_per_rank


@dataclass(frozen=True)
class Mask:
    """The global mask of a call: query at position ``p`` sees key ``r`` iff
    ``p - left <= r <= p + right`` (a bound < 0: unbounded; ``right == 0``: causal) and both are
    below ``seq_len`` (the unpadded length; positions past it are padding) and, with
    ``cu_seqlens`` (document offsets, ``0 = cu[0] <= ... <= cu[-1] = seq_len``), in one document."""

    left: int
    right: int
    seq_len: int
    cu_seqlens: tuple[int, ...] | None = None

    @property
    def documents(self) -> tuple[tuple[int, int], ...]:
        """Each document's ``[start, end)`` positions (one, ``[0, seq_len)``, without ``cu_seqlens``)."""
        cu = self.cu_seqlens or (0, self.seq_len)
        return tuple((a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a)


@dataclass(frozen=True)
class Block:
    """One attention call of a ring step: local query rows ``[q0, q1)`` against rows ``[k0, k1)`` of
    the visiting K/V shard, over ``band`` (top-left aligned, in the block's own coordinates).
    ``q_runs`` / ``k_runs``: ``(global start, length)`` of each contiguous run of positions the
    rows cover, in order; what a score_mod / mask_mod implementation needs to index globally."""

    q0: int
    q1: int
    k0: int
    k1: int
    band: Band
    q_runs: tuple[tuple[int, int], ...]
    k_runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class StepPlan:
    """The blocks of one ring step (K/V from rank ``source``) and how many chunk pairs the mask left
    empty (skipped, never computed)."""

    source: int
    blocks: tuple[Block, ...]
    pairs: int
    empty_pairs: int


def _pair(qs: int, qe: int, ks: int, ke: int, left: int, right: int):
    """The visible part of queries ``[qs, qe)`` x keys ``[ks, ke)`` (global positions, one document)
    under the band ``left``/``right``: ``(p0, p1, r0, r1, band)`` trimmed to the rows and keys
    that see anything, or None when empty.

    The trimmed block's band is top-left aligned: local query ``i`` sees local key ``j`` iff
    ``j >= i - left'`` and ``j <= i + right'``, with ``d = p0 - r0``, ``left' = left - d`` and
    ``right' = right + d``; trimming makes both >= 0, and a bound the block never reaches is
    dropped (-1), so a fully visible block is ``Band()`` and a diagonal one ``Band.causal()``.
    """
    p0 = max(qs, ks - right) if right >= 0 else qs
    p1 = min(qe, ke + left) if left >= 0 else qe
    if p0 >= p1 or ks >= ke:
        return None
    r0 = max(ks, p0 - left) if left >= 0 else ks
    r1 = min(ke, p1 + right) if right >= 0 else ke
    L, S, d = p1 - p0, r1 - r0, p0 - r0
    bl = left - d if left >= 0 else -1
    br = right + d if right >= 0 else -1
    bl = -1 if bl >= L - 1 else bl
    br = -1 if br >= S - 1 else br
    return p0, p1, r0, r1, Band(bl, br)


def plan_step(rank: int, source: int, world_size: int, shard_len: int, layout: str, mask: Mask) -> StepPlan:
    """The blocks rank ``rank`` computes with the K/V shard of rank ``source``."""
    per = chunks_per_rank(layout)
    c = shard_len // per
    q_ids, k_ids = chunk_ids(rank, world_size, layout), chunk_ids(source, world_size, layout)
    docs = mask.documents
    ends = [e for _, e in docs]
    blocks, empty = [], 0
    for a, qa in enumerate(q_ids):
        for b, kb in enumerate(k_ids):
            found = False
            # the documents that overlap the query chunk (ends are sorted; a document may be split
            # over several chunks and ranks, and a chunk may hold several documents)
            for d0, d1 in docs[bisect.bisect_right(ends, qa * c):]:
                if d0 >= (qa + 1) * c:
                    break
                hit = _pair(max(qa * c, d0), min((qa + 1) * c, d1), max(kb * c, d0), min((kb + 1) * c, d1),
                            mask.left, mask.right)
                if hit is None:
                    continue
                found = True
                p0, p1, r0, r1, band = hit
                blocks.append(Block(a * c + p0 - qa * c, a * c + p1 - qa * c, b * c + r0 - kb * c,
                                    b * c + r1 - kb * c, band, ((p0, p1 - p0),), ((r0, r1 - r0),)))
            empty += not found
    return StepPlan(source, _coalesce(blocks), len(q_ids) * len(k_ids), empty)


def _coalesce(blocks: list[Block]) -> tuple[Block, ...]:
    """Fully visible blocks that share query rows and touch in key rows (or share key rows and touch
    in query rows) become one call: fewer, larger kernel launches and merges."""
    for key, lo, hi, runs in (("q", "k0", "k1", "k_runs"), ("k", "q0", "q1", "q_runs")):
        out: list[Block] = []
        for blk in blocks:
            prev = out[-1] if out else None
            same = prev is not None and ((prev.q0, prev.q1) == (blk.q0, blk.q1) if key == "q"
                                         else (prev.k0, prev.k1) == (blk.k0, blk.k1))
            if same and prev.band == Band() and blk.band == Band() and getattr(prev, hi) == getattr(blk, lo):
                merged = dict(prev.__dict__)
                merged[hi] = getattr(blk, hi)
                merged[runs] = getattr(prev, runs) + getattr(blk, runs)
                out[-1] = Block(**merged)
            else:
                out.append(blk)
        blocks = sorted(out, key=lambda b: (b.k0, b.q0)) if key == "q" else out
    return tuple(sorted(blocks, key=lambda b: (b.q0, b.k0)))


def plan(rank: int, world_size: int, shard_len: int, layout: str, mask: Mask) -> tuple[StepPlan, ...]:
    """Every step of rank ``rank``'s ring: step ``t`` attends to the K/V shard of rank ``rank - t``."""
    return tuple(plan_step(rank, (rank - t) % world_size, world_size, shard_len, layout, mask)
                 for t in range(world_size))


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's ``(block_out, block_lse)`` into the running ``(out, lse)`` in place, exactly:
    ``lse' = log(e^lse + e^block_lse)``, ``out' = e^(lse-lse') out + e^(block_lse-lse') block_out``.

    ``out`` ``(..., L, Ev)`` and ``lse`` ``(..., L)`` are the accumulators (float32, float64 for
    float64 inputs; natural log). A row that has seen no key has lse ``-inf`` and out 0; merging
    two such rows leaves them so (the weights use a finite reference, never ``-inf - -inf``).
    """
    new = torch.logaddexp(lse, block_lse.to(lse.dtype))
    ref = new.masked_fill(new == float("-inf"), 0.0)
    w_old = torch.exp(lse - ref).unsqueeze(-1)
    w_new = torch.exp(block_lse.to(lse.dtype) - ref).unsqueeze(-1)
    out.mul_(w_old).add_(block_out.to(out.dtype) * w_new)
    lse.copy_(new)


class BlockAttention(Protocol):
    """How a ring step attends one ``Block``: the hook a score_mod / mask_mod implementation
    (FlexAttention's) plugs into, evaluating its mods at the block's global positions
    (``Block.q_runs`` / ``k_runs``). Shapes: q ``(B, Hq, Lb, E)``, k/v ``(B, Hkv, Sb, E/Ev)``."""

    def forward(self, q, k, v, block: Block, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: out in q's dtype, lse natural log (B, Hq, Lb)."""

    def backward(self, dout, q, k, v, out, lse, block: Block, scale: float):
        """``(dq, dk, dv)`` of the block, from the GLOBAL ``out`` and ``lse`` of its query rows."""


def _band_mask(band: Band, L: int, S: int, device) -> torch.Tensor:
    i = torch.arange(L, device=device).unsqueeze(-1)
    j = torch.arange(S, device=device)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if band.right >= 0:
        ok &= j <= i + band.right
    if band.left >= 0:
        ok &= j >= i - band.left
    return ok


class FusedBlocks:
    """The default ``BlockAttention``: attend's fused op pair (``attend::fused_fwd`` /
    ``attend::fused_bwd``, what FLASH and EFFICIENT run) on ``kernel`` ("triton" or "blocked").
    The blocked kernel has no window mode (its varlen path passes windows as masks too), so a band
    it cannot take goes to it as the block's (Lb, Sb) bool mask."""

    def __init__(self, kernel: str):
        self.kernel = kernel

    def _mask_and_band(self, band: Band, L: int, S: int, device):
        if self.kernel == "blocked" and not band.is_causal_only:
            return _band_mask(band, L, S, device), Band()
        return None, band

    def forward(self, q, k, v, block: Block, scale: float):
        from ..ops.attention import fused_fwd

        mask, band = self._mask_and_band(block.band, q.shape[2], k.shape[2], q.device)
        return fused_fwd(q, k, v, mask, 0.0, band.to_op(), float(scale), None, self.kernel)

    def backward(self, dout, q, k, v, out, lse, block: Block, scale: float):
        from ..ops.attention import fused_bwd

        mask, band = self._mask_and_band(block.band, q.shape[2], k.shape[2], q.device)
        # The row slices of q, dout and out go as strided views; the Triton launcher reads lse as a
        # dense (B, H, Lb) tensor, so its slice is copied.
        dq, dk, dv, _ = fused_bwd(dout, q, k, v, out, lse.contiguous(), mask, 0.0, band.to_op(), float(scale), None,
                                  self.kernel, False)
        return dq, dk, dv


"""Host-side schedules for packed (varlen) launches: the list of (sequence, block) items that
exist, heaviest first, which the core reads under its WORKLIST feature (``launch._work_list``
decides when). An item is ``sequence << ITEM_BITS | block``.
"""

from __future__ import annotations

import functools

import torch

from .._hostcache import host_values
from .._layout import Band, Packed
from . import core

ITEM_BITS = core.ITEM_BITS.value  # fewer than 2^(31 - ITEM_BITS) sequences (sign bit clear), 2^ITEM_BITS blocks each


def packed_lengths(packed: Packed) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Per-sequence (query, key) lengths from the host copies of ``cu_seq_*`` (read once per
    tensor version, shared with the public layer's validation); None for paged or seqused_k calls."""
    if packed.table is not None or packed.seqused_k is not None:
        return None
    cq = host_values(packed.cu_q)
    ck = host_values(packed.cu_k) if packed.cu_k is not None else cq
    return tuple(b - a for a, b in zip(cq, cq[1:])), tuple(b - a for a, b in zip(ck, ck[1:]))


def key_span(r0: int, r1: int, L: int, S: int, band: Band) -> int:
    """How many keys rows [r0, r1) of one sequence see together (the key blocks a program visits)."""
    d = S - L if band.bottom_right else 0
    lo = max(0, r0 + d - band.left) if band.left >= 0 else 0
    hi = min(S, r1 + d + band.right) if band.right >= 0 else S
    return max(0, hi - lo)


def query_span(c0: int, c1: int, L: int, S: int, band: Band) -> int:
    """How many queries see keys [c0, c1) of one sequence (query i sees key j iff
    j - d - right <= i <= j - d + left)."""
    d = S - L if band.bottom_right else 0
    lo = max(0, c0 - d - band.right) if band.right >= 0 else 0
    hi = min(L, c1 - d + band.left) if band.left >= 0 else L
    return max(0, hi - lo)


@functools.lru_cache(maxsize=64)
def work_tensor(lens_q: tuple, lens_k: tuple, band: Band, spec: tuple, device: torch.device):
    """(int32 tensor of every list in ``spec`` back to back, their lengths), or None when an item
    would not fit. ``spec``: (kind, block) pairs; kind "q" lists query blocks (forward / dQ
    programs), "k" key blocks (dK/dV programs). Each list holds every block of every sequence,
    sorted by the work its program does (its visible span), heaviest first: longest-processing-
    time order, so the grid's tail is short blocks whatever order the sequences were packed in."""
    lists = []
    for kind, block in spec:
        items = []
        for b, (L, S) in enumerate(zip(lens_q, lens_k)):
            n = L if kind == "q" else S
            for i in range(-(-n // block)):
                r0, r1 = i * block, min(n, (i + 1) * block)
                work = key_span(r0, r1, L, S, band) if kind == "q" else query_span(r0, r1, L, S, band)
                items.append((-work, b, i))
        if not items or len(lens_q) >= 1 << (31 - ITEM_BITS) or max(i for _, _, i in items) >= 1 << ITEM_BITS:
            return None
        items.sort()
        lists.append([b << ITEM_BITS | i for _, b, i in items])
    flat = [x for lst in lists for x in lst]
    with torch.inference_mode(False):  # cached for later calls: never an inference tensor
        return torch.tensor(flat, dtype=torch.int32, device=device), tuple(len(lst) for lst in lists)

"""The block lists one flex call iterates: a validated, call-shaped view of a BlockMask.

This is what the fused core will take (docs/flex.md): int32 ``[B', H', rows, cols]`` lists with
``B'`` in (1, B) and ``H'`` in (1, Hq) broadcasting, ``BLOCK_SIZE = (BQ, BKV)``, and the block
counts ``n_q = cdiv(L, BQ)``, ``n_kv = cdiv(S, BKV)`` of the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_mask import DEFAULT_BLOCK, BlockMask


@dataclass
class BlockLists:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None
    q_num_blocks: torch.Tensor | None
    q_indices: torch.Tensor | None
    full_q_num_blocks: torch.Tensor | None
    full_q_indices: torch.Tensor | None
    BLOCK_SIZE: tuple[int, int]
    seq_lengths: tuple[int, int]

    @property
    def n_q(self) -> int:
        return -(-self.seq_lengths[0] // self.BLOCK_SIZE[0])

    @property
    def n_kv(self) -> int:
        return -(-self.seq_lengths[1] // self.BLOCK_SIZE[1])


_DENSE: dict[tuple, tuple] = {}  # (device, nq, nk) -> dense's eight tensors, never evicted
DENSE_CACHE_SIZE = 4096  # past it, new counts' lists are made per call (an entry is O(nq + nk) ints)


def dense(L: int, S: int, device, block: int = DEFAULT_BLOCK, cache: bool = True) -> BlockLists:
    """Every block full: the lists of a call without a block_mask. The tensors depend on the block
    counts alone and the kernels only read them, so they are made once per device and counts (six
    allocations and fills a call otherwise: a decode loop's no-mask calls, one per layer and
    token). Never kept from a CUDA graph capture or a fake-tensor trace, and never evicted: a
    graph captured with an entry replays its addresses. ``cache=False`` (the custom op that
    torch.compile runs, whose CUDA graph trees own the memory of their warmup runs): made per call."""
    nq, nk = -(-L // block), -(-S // block)
    key = (str(device), nq, nk)
    parts = _DENSE.get(key) if cache else None
    if parts is None:
        i32 = dict(dtype=torch.int32, device=device)
        with torch.inference_mode(False):  # later calls reuse them, with grad or without
            full_kv = torch.arange(nk, **i32).expand(1, 1, nq, nk)
            full_q = torch.arange(nq, **i32).expand(1, 1, nk, nq)
            parts = (torch.zeros(1, 1, nq, **i32), full_kv, torch.full((1, 1, nq), nk, **i32), full_kv,
                     torch.zeros(1, 1, nk, **i32), full_q, torch.full((1, 1, nk), nq, **i32), full_q)
        capturing = full_kv.is_cuda and torch.cuda.is_current_stream_capturing()
        if cache and type(full_kv) is torch.Tensor and not capturing and len(_DENSE) < DENSE_CACHE_SIZE:
            _DENSE[key] = parts
    return BlockLists(*parts, (block, block), (L, S))


def from_block_mask(bm: BlockMask) -> BlockLists:
    return BlockLists(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks,
                      bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, tuple(bm.BLOCK_SIZE),
                      tuple(bm.seq_lengths))


def coarsen(blocks: BlockLists, block_q: int, block_kv: int) -> BlockLists:
    """The same lists at coarser blocks (``block_q`` / ``block_kv`` multiples of BLOCK_SIZE), for a
    kernel whose tiles are larger than the mask's blocks: a coarse block is full only when every
    fine block under it is full and present (a ragged end counts as masked, PyTorch's rule), empty
    when every one is empty, else partial. Equals create_block_mask at the coarse size."""
    from .block_mask import FULL, PARTIAL, _dense, _ordered

    BQ, BKV = blocks.BLOCK_SIZE
    if block_q % BQ or block_kv % BKV:
        raise ValueError(f"coarsen: blocks ({block_q}, {block_kv}) are not multiples of BLOCK_SIZE ({BQ}, {BKV})")
    fq, fk = block_q // BQ, block_kv // BKV
    status = _dense(blocks.kv_num_blocks, blocks.kv_indices, blocks.n_kv) * PARTIAL
    if blocks.full_kv_num_blocks is not None:
        status = torch.maximum(status, _dense(blocks.full_kv_num_blocks, blocks.full_kv_indices, blocks.n_kv) * FULL)
    status = status[..., :blocks.n_q, :blocks.n_kv]
    nq, nk = -(-blocks.n_q // fq), -(-blocks.n_kv // fk)
    pad = torch.zeros(*status.shape[:-2], nq * fq, nk * fk, dtype=status.dtype, device=status.device)
    pad[..., :status.shape[-2], :status.shape[-1]] = status
    cells = pad.unflatten(-1, (nk, fk)).unflatten(-3, (nq, fq)).transpose(-3, -2)  # [.., nq, nk, fq, fk]
    full = (cells == FULL).flatten(-2).all(-1)
    any_ = (cells != 0).flatten(-2).any(-1)
    kv = _ordered(any_ & ~full)
    fkv = _ordered(full)
    from .block_mask import _transpose

    return BlockLists(*kv, *fkv, *_transpose(*kv), *_transpose(*fkv), (block_q, block_kv), blocks.seq_lengths)

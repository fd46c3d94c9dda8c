"""Triton kernels of the flex foundation: block classification for ``create_block_mask``, and a
one-tile kernel that calls the generated score hooks the way the core will (the seam's proof).

Hooks are ``tl.constexpr`` arguments (generated ``@triton.jit`` functions); captured tensors
arrive as a tuple of pointers and an int tensor of their strides and the mod's numbers (``META``,
read by the generated ``load_meta``), runtime arguments both. Indices
passed to a hook are clamped into range (a ragged block's rows past ``Q_LEN`` read row
``Q_LEN - 1``); the caller masks those positions itself, so a hook may load captures at any
position the mod could see in eager PyTorch.
"""

from __future__ import annotations

import triton
import triton.language as tl

EMPTY, PARTIAL, FULL = 0, 1, 2


@triton.jit(do_not_specialize=["stride_sb", "stride_sh", "stride_sm", "stride_pm", "H", "Q_LEN", "KV_LEN", "NK"])
def classify_blocks(Status, stride_sb, stride_sh, stride_sm, Pre, stride_pm, H, Q_LEN, KV_LEN, NK, ptrs, META,
                    MASK_MOD: tl.constexpr, LOAD_META: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_KV: tl.constexpr):
    """Status[b, h, m, n] = EMPTY / PARTIAL / FULL for query block m and key block n.

    A block is FULL only when every one of its BLOCK_Q x BLOCK_KV positions is in range and kept
    (PyTorch pads ragged ends with masked positions; the same rule keeps the lists identical).
    Pre[m, n]: the status interval arithmetic decided for every (b, h) (``bounds.block_bounds``),
    or UNDECIDED (3): only those blocks evaluate the mask at every position.
    Grid: (query blocks, B * H); each program walks its row of key blocks.
    """
    meta = LOAD_META(META)
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_idx = m * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]  # [BQ, 1]
    q_in = q_idx < Q_LEN
    q_c = tl.minimum(q_idx, Q_LEN - 1)
    row = Status + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + m.to(tl.int64) * stride_sm
    pre_row = Pre + m.to(tl.int64) * stride_pm
    for n in range(0, NK):
        status = tl.load(pre_row + n).to(tl.int32)
        if status == 3:
            kv_idx = n * BLOCK_KV + tl.arange(0, BLOCK_KV)[None, :]  # [1, BKV]
            valid = q_in & (kv_idx < KV_LEN)  # [BQ, BKV]
            keep = MASK_MOD(b, h, q_c, tl.minimum(kv_idx, KV_LEN - 1), ptrs, meta)
            kept = tl.sum((keep & valid).to(tl.int32))
            status = tl.where(kept == BLOCK_Q * BLOCK_KV, 2, tl.where(kept > 0, 1, 0))
        tl.store(row + n, status.to(tl.int8))


@triton.jit(do_not_specialize=["b", "h", "q0", "kv0", "Q_LEN", "KV_LEN"])
def mod_tile(Score, Out, DScore, DS, b, h, q0, kv0, Q_LEN, KV_LEN, stride_m, ptrs, META, grad_ptrs,
             SCORE_MOD: tl.constexpr, SCORE_DSCORE: tl.constexpr, SCORE_GRAD: tl.constexpr,
             LOAD_META: tl.constexpr, LOAD_GRAD_STRIDES: tl.constexpr, HAS_GRAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of scores at rows q0.., keys kv0..: the modded scores, their
    derivative in the score, and (HAS_GRAD) the captures' gradient contributions of DS."""
    meta = LOAD_META(META)
    rm = tl.arange(0, BLOCK_M)[:, None]
    rn = tl.arange(0, BLOCK_N)[None, :]
    q_idx = q0 + rm
    kv_idx = kv0 + rn
    valid = (q_idx < Q_LEN) & (kv_idx < KV_LEN)
    q_c = tl.minimum(q_idx, Q_LEN - 1)
    kv_c = tl.minimum(kv_idx, KV_LEN - 1)
    offs = rm * stride_m + rn
    s = tl.load(Score + offs)  # [BM, BN] fp32
    out = SCORE_MOD(s, b, h, q_c, kv_c, ptrs, meta)
    tl.store(Out + offs, tl.broadcast_to(out, (BLOCK_M, BLOCK_N)))
    d = SCORE_DSCORE(s, b, h, q_c, kv_c, ptrs, meta)
    tl.store(DScore + offs, tl.broadcast_to(d, (BLOCK_M, BLOCK_N)))
    if HAS_GRAD:
        ds = tl.where(valid, tl.load(DS + offs), 0.0)
        SCORE_GRAD(ds, s, b, h, q_c, kv_c, ptrs, meta, grad_ptrs, LOAD_GRAD_STRIDES(META))

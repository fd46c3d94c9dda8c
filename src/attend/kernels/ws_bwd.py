"""The Hopper backward's dK / dV half in Gluon, warp-specialized and persistent, as ws.py is for the
forward: one producer warp issues every TMA load and two consumer warpgroups of 64 keys each
accumulate dK and dV of their keys over the query blocks the band (or a BlockMask's lists) lets see
them. dQ comes from the ``tl`` core's dQ programs (``core.attn_bwd`` with DQ_ONLY), launched after
this kernel, or, with FUSED_DQ, from this kernel's TMA reduce-adds (``_consumer``).

A tile is one 128-key block of one KV head. The producer loads the tile's K and V halves (two
buffers, so the next tile's load overlaps the current one's last steps), then streams Q and dO
blocks of 64 rows through a ring for every query head of the group. Per step a consumer computes,
for its 64 keys and the block's 64 queries, in the log2 domain with the rows' NLSE2 / Delta from
``attn_bwd_preprocess``:

    S^T = K Q^T,  P^T = exp2(S^T * scale / ln 2 + NLSE2),  dV += P^T dO,
    dP^T = V dO^T,  dS^T = P^T (dP^T - Delta),  dK += dS^T Q

and at the tile's end stores dK * scale and dV. Query rows past a sequence's end have NLSE2 = -inf
(the stats are padded), so their P and dS are 0 and need no mask; steps on a band's edge (outside
[a, c) of ``core.query_blocks``) mask by key and query index. Programs take tiles from a counter,
as the forward's do: under a band, sections of KV heads whose Q / dO fit the L2, heads fastest and
the longest key blocks (the first) first.

It serves (``eligible``) what the Gluon forward serves without a mask: D = 128, fp16 / bf16, no
dropout, dense contiguous tensors of any lengths and band, and packed sequences (contiguous, no
pages) whose query and key sequences all have one length each. Every other backward is the core's.
"""

from __future__ import annotations

import torch

from .._layout import is_rows
from .core import RCP_LN2, STAT_PAD, query_blocks
from .fastlaunch import Launcher
from .versions import (COMPILE_OPTIONS, TensorDescriptor, await_compile_key, fence_async_shared, gl, gluon, mbarrier,
                       thread_barrier, tma, tma_atomic_add, tma_load, warpgroup_mma, warpgroup_mma_wait)
from .ws_common import (GL_DTYPE, HEAD_DIM, LIST_BLOCK, TBUF, build_descriptor, checked_layout, cu_seqs, deal,
                        descriptor, hook_args, hook_constexprs, list_args, list_constexprs, list_row, listed_start,
                        model_rows, next_tile, persistent, publish, row_view, section, sequence, take, tile_ring,
                        varlen_mode)

KEYS = 64  # keys per consumer warpgroup; a tile covers BLOCK_N = 2 * KEYS
BLOCK_N = 2 * KEYS
BLOCK_M = 64  # query rows per step
STAGES = 2  # ring slots for Q and dO
KBUFS = 2  # K / V tile buffers: the next tile's load overlaps the current tile's last steps
FUSED_KBUFS = 1  # with dQ fused: one K / V buffer, so that dS and the dQ tiles fit in shared memory


@gluon.jit
def _kv_tile(t, n_n, n_bhk, sec, Hkv, L_max, S_max, cu_q, cu_k, diag, win_right, win_left,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
             VARLEN: gl.constexpr):
    """Tile ``t`` of n_n key blocks by n_bhk = B * Hkv KV heads. Without a band, key block fastest
    (programs running together read one head's Q / dO). With one, sections of ``sec`` KV heads,
    heads fastest and key block 0 first within a section (it sees the most queries). Returns
    (n0, L, S, b, hk, q0, kv_row, lo, a, c, hi, causal_off, window_off): kv_row the tile's first
    key row in the 2-D K / V views (``ws.row_view``), q0 the sequence's first packed query row;
    query rows [lo, hi) visited, [a, c) unmasked (``core.query_blocks``). n0 >= S: no keys."""
    bhk, pid_n = deal(t, n_n, n_bhk, sec, CAUSAL or WINDOW)
    b = bhk // Hkv
    hk = bhk % Hkv
    n0 = pid_n * BLOCK_N
    if VARLEN:
        q0, L, k0, S = sequence(b, cu_q, cu_k, L_max, S_max, VARLEN)
        kv_row = k0 + n0
    else:
        q0 = b * 0
        L = L_max
        S = S_max
        kv_row = bhk * S + n0
    causal_off = diag * (S - L) + win_right
    window_off = diag * (S - L) - win_left
    lo, a, c, hi = query_blocks(n0, L, causal_off, window_off, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    return n0, L, S, b, hk, q0, kv_row, lo, a, c, hi, causal_off, window_off


@gluon.jit
def _q_row(b, h, H, L, q0, VARLEN: gl.constexpr, Q_ROWS: gl.constexpr):
    """Row of query 0 of head h in the 2-D Q / dO views: (b * H + h) * L dense, q0 packed, b * L in
    a model's (B * L, H * D) rows (Q_ROWS)."""
    if VARLEN:
        r = q0
    elif Q_ROWS:
        r = b * L
    else:
        r = (b * H + h) * L
    return r


@gluon.jit
def _stat_off(b, h, q0, stride_statb, stride_stath, STAT_PAD: gl.constexpr, VARLEN: gl.constexpr):
    """Offset of row 0 of (sequence or batch b, head h) in NLSE2 / Delta (``core._stat_row0``)."""
    if VARLEN:
        off = h * stride_stath + (q0 // STAT_PAD + b) * STAT_PAD
    else:
        off = b * stride_statb + h * stride_stath
    return off


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_full, kv_empty, kv_row, kv_col, tcount, KEYS: gl.constexpr,
             KBUFS: gl.constexpr):
    """The producer loads a tile's K / V halves into buffer ``tcount % KBUFS`` once both consumers
    released the tile KBUFS before."""
    kb = tcount % KBUFS
    mbarrier.wait(kv_empty.index(kb), ((tcount // KBUFS) & 1) ^ 1, pred=tcount >= KBUFS)
    for cid in gl.static_range(2):
        mbarrier.expect(kv_full.index(2 * kb + cid), 2 * k_desc.block_type.nbytes)
        tma_load(k_desc, [kv_row + cid * KEYS, kv_col], kv_full.index(2 * kb + cid), k_smem.index(2 * kb + cid))
        tma_load(v_desc, [kv_row + cid * KEYS, kv_col], kv_full.index(2 * kb + cid), v_smem.index(2 * kb + cid))


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, nl_desc, dl_desc, q_smem, do_smem, k_smem, v_smem, nl_smem, dl_smem,
              qd_full, qd_empty, kv_full, kv_empty, tid_smem, tid_full, tid_empty, counter_ptr, stride_statb,
              stride_stath, n_tiles, n_n, sec, H, G, L_max, S_max, cu_q, cu_k, diag, win_right, win_left, list_ptrs,
              KEYS: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, KBUFS: gl.constexpr,
              STAT_PAD: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, VARLEN: gl.constexpr,
              Q_ROWS: gl.constexpr, TBUF: gl.constexpr, LISTS: gl.constexpr, SPARSE_BQ: gl.constexpr):
    """Takes tiles (its own id, then the counter's next) and publishes each; loads the tile's K / V
    halves (``_load_kv``), then each (query head, query block) step's Q and dO, and its rows' NLSE2
    and Delta, into ring slot ``count % STAGES``, the count running over tiles. With one K / V
    buffer (KBUFS = 1), whose load waits until both consumers finished the tile before, the K / V
    load comes after the tile's first STAGES steps' Q / dO loads, which need only free ring slots."""
    P = gl.num_programs(0)
    Hkv = H // G
    n_bhk = n_tiles // n_n
    tcount = 0
    qd = 0
    it = 0
    t = gl.program_id(0)
    publish(tid_smem, tid_full, tid_empty, t, it, TBUF)
    while t < n_tiles:
        n0, L, S, b, hk, q0, kv_row, lo, a, c, hi, causal_off, window_off = _kv_tile(
            t, n_n, n_bhk, sec, Hkv, L_max, S_max, cu_q, cu_k, diag, win_right, win_left, BLOCK_M, 2 * KEYS,
            CAUSAL, WINDOW, VARLEN)
        if n0 < S:
            kv_col = hk * 0
            if VARLEN:  # packed (T, H * D) views: a head is a column offset
                kv_col = hk * D
            if KBUFS > 1:
                _load_kv(k_desc, v_desc, k_smem, v_smem, kv_full, kv_empty, kv_row, kv_col, tcount, KEYS, KBUFS)
            issued = 0  # one K / V buffer: its load waits for the tile before, so the first steps' Q / dO go first
            for g in range(G):
                h = hk * G + g
                q_row = _q_row(b, h, H, L, q0, VARLEN, Q_ROWS)
                stat = _stat_off(b, h, q0, stride_statb, stride_stath, STAT_PAD, VARLEN)
                q_col = h * 0
                if VARLEN:
                    q_col = h * D
                if Q_ROWS:  # a model's (B * L, H * D) rows: a head is a column offset
                    q_col = h * D
                if LISTS:  # the BlockMask's query blocks of this key block, as steps [0, hi)
                    n_part, idx, step, fidx, fstep, hi = list_row(list_ptrs, b, h, n0 // (2 * KEYS), SPARSE_BQ)
                for m0v in range(lo, hi, BLOCK_M):
                    if LISTS:
                        m0, _ = listed_start(list_ptrs, m0v, n_part, idx, step, fidx, fstep, SPARSE_BQ)
                    else:
                        m0 = m0v
                    slot = qd % STAGES
                    mbarrier.wait(qd_empty.index(slot), ((qd // STAGES) & 1) ^ 1, pred=qd >= STAGES)
                    mbarrier.expect(qd_full.index(slot),
                                    2 * q_desc.block_type.nbytes + 2 * nl_desc.block_type.nbytes)
                    tma_load(q_desc, [q_row + m0, q_col], qd_full.index(slot),
                                                    q_smem.index(slot))
                    tma_load(do_desc, [q_row + m0, q_col], qd_full.index(slot),
                                                    do_smem.index(slot))
                    tma_load(nl_desc, [stat + m0], qd_full.index(slot), nl_smem.index(slot))
                    tma_load(dl_desc, [stat + m0], qd_full.index(slot), dl_smem.index(slot))
                    qd += 1
                    if KBUFS == 1:
                        issued += 1
                        if issued == STAGES:
                            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_full, kv_empty, kv_row, kv_col, tcount, KEYS,
                                     KBUFS)
            if KBUFS == 1:
                if issued < STAGES:  # a tile of fewer steps
                    _load_kv(k_desc, v_desc, k_smem, v_smem, kv_full, kv_empty, kv_row, kv_col, tcount, KEYS, KBUFS)
            tcount += 1
        it += 1
        t = next_tile(counter_ptr, P, n_tiles, tid_smem, tid_full, tid_empty, it, TBUF)


@gluon.jit
def _consumer(q_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, nl_smem, dl_smem, ds_smem, dq_smem, qd_full, qd_empty,
              kv_full, kv_empty, ds_ready, tid_smem, tid_full, tid_empty, dk_ptr, dv_ptr, stride_dk, stride_dv,
              n_tiles, n_n, sec, H, G, L_max, S_max, cu_q, cu_k, diag, win_right, win_left, qk_scale, sm_scale,
              score_ptrs, score_meta, list_ptrs, mask_ptrs, mask_meta, CID: gl.constexpr, KEYS: gl.constexpr,
              BLOCK_M: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, KBUFS: gl.constexpr, CAUSAL: gl.constexpr,
              WINDOW: gl.constexpr, VARLEN: gl.constexpr, Q_ROWS: gl.constexpr, TBUF: gl.constexpr,
              FUSED_DQ: gl.constexpr, HAS_SCORE: gl.constexpr, SCORE_MOD: gl.constexpr, SCORE_DSCORE: gl.constexpr,
              LOAD_SCORE_META: gl.constexpr, LISTS: gl.constexpr, SPARSE_BQ: gl.constexpr, HAS_MASK_MOD: gl.constexpr,
              MASK_MOD: gl.constexpr, LOAD_MASK_META: gl.constexpr):
    """dK and dV of keys [CID * KEYS, (CID + 1) * KEYS) of each tile the producer publishes, over
    its steps (module docstring); stored at the tile's end, rows past the sequence's keys left.
    HAS_SCORE: SCORE_MOD / SCORE_DSCORE (flex over a band): P from the modded natural-unit score, dS times its
    derivative (0 where dS is), the hooks at clamped indices in the transposed tile's shapes (as the
    core's ``_flex_scores2`` with KEYS_FIRST); a ragged last query block's rows past L are -inf
    before exp2 (a hook may not be finite on their zero-filled Q).

    FUSED_DQ: dQ too, as FlashAttention 3 takes it. Each step's dS^T goes to shared memory (a ring of
    two steps by two consumers, ``ds_ready`` counting both consumers' writes); once both halves are
    there, consumer CID takes dQ's columns [CID * D / 2, (CID + 1) * D / 2) of the tile's 128 keys,
    dS (both halves, transposed) times the matching columns of both K halves, and adds them, times
    the scale, into the fp32 dQ by a TMA reduce-add of a shared-memory tile (``dq_desc``; two 32-column
    messages of the 128-byte swizzle), left in flight until its next step needs the tile. The order
    is FlashAttention 3's: dV's product, dQ's two, then dK's, whose product runs while dQ's tile is
    staged. Rows past a sequence's end add zeros (their P and dS are 0) into whatever rows follow;
    keys past its end are masked, as their K rows may be another head's (an infinite value there
    would still reach this head's dQ as 0 * inf: the dense K / V descriptors are 2-D over every
    head)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
    DH: gl.constexpr = D // 2  # dQ columns per consumer (FUSED_DQ)
    q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DH, 16])
    zero_s = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
    s_rows = gl.arange(0, KEYS, gl.SliceLayout(1, s_layout))
    s_cols = gl.arange(0, BLOCK_M, gl.SliceLayout(0, s_layout))
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    if HAS_SCORE:
        meta = LOAD_SCORE_META(score_meta)
    else:
        meta = 0
    if HAS_MASK_MOD:
        mmeta = LOAD_MASK_META(mask_meta)
    else:
        mmeta = 0
    Hkv = H // G
    n_bhk = n_tiles // n_n
    tcount = 0
    qd = 0
    it = 0
    t = take(tid_smem, tid_full, tid_empty, it, TBUF)
    while t < n_tiles:
        n0, L, S, b, hk, q0, kv_row, lo, a, c, hi, causal_off, window_off = _kv_tile(
            t, n_n, n_bhk, sec, Hkv, L_max, S_max, cu_q, cu_k, diag, win_right, win_left, BLOCK_M, 2 * KEYS,
            CAUSAL, WINDOW, VARLEN)
        if n0 < S:
            kb = tcount % KBUFS
            k_tile = k_smem.index(2 * kb + CID)
            v_tile = v_smem.index(2 * kb + CID)
            keys = n0 + CID * KEYS + s_rows  # the sequence's key indices
            dk = gl.zeros([KEYS, D], gl.float32, a_layout)
            dv = gl.zeros([KEYS, D], gl.float32, a_layout)
            mbarrier.wait(kv_full.index(2 * kb + CID), (tcount // KBUFS) & 1)
            if FUSED_DQ:  # dQ reads the other half of K too
                mbarrier.wait(kv_full.index(2 * kb + 1 - CID), (tcount // KBUFS) & 1)
            for g in range(G):
                if FUSED_DQ:
                    h_q = hk * G + g
                    dq_row = _q_row(b, h_q, H, L, q0, VARLEN, Q_ROWS)
                    dq_col = CID * DH
                    if VARLEN or Q_ROWS:  # a head is a column offset
                        dq_col = h_q * D + CID * DH
                if LISTS:  # the BlockMask's query blocks of this key block, as steps [0, hi)
                    n_part, idx, step, fidx, fstep, hi = list_row(list_ptrs, b, hk * G + g, n0 // (2 * KEYS),
                                                                   SPARSE_BQ)
                for m0v in range(lo, hi, BLOCK_M):
                    if LISTS:
                        m0, partial = listed_start(list_ptrs, m0v, n_part, idx, step, fidx, fstep, SPARSE_BQ)
                    else:
                        m0 = m0v
                    slot = qd % STAGES
                    mbarrier.wait(qd_full.index(slot), (qd // STAGES) & 1)
                    q_t = q_smem.index(slot)
                    do_t = do_smem.index(slot)
                    s = warpgroup_mma(k_tile, q_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                    nlse2 = nl_smem.index(slot).load(col_layout)  # padded rows: -inf
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                    if HAS_SCORE:
                        h = hk * G + g
                        q_idx = gl.minimum(m0 + s_cols, L - 1)[None, :]
                        kv_idx = gl.minimum(keys, S - 1)[:, None]
                        raw = s * sm_scale
                        s_mod, raw = gl.broadcast(SCORE_MOD(raw, b, h, q_idx, kv_idx, score_ptrs, meta), raw)
                        # d score_mod / d score now, beside the hook (a softcap's one tanh serves both),
                        # so the raw score and the indices are not live across dP's product: the
                        # softcap variant's sm_90 build spills 332 bytes, against 420 taking it after
                        dmod, raw = gl.broadcast(SCORE_DSCORE(raw, b, h, q_idx, kv_idx, score_ptrs, meta), raw)
                        x = s_mod * RCP_LN2 + nlse2[None, :]
                        if m0 + BLOCK_M > L:
                            x = gl.where((m0 + s_cols < L)[None, :], x, float("-inf"))
                    else:
                        x = s * qk_scale + nlse2[None, :]
                    if FUSED_DQ:
                        if n0 + 2 * KEYS > S:  # keys past the sequence's end (another head's rows) add no dQ
                            x = gl.where((keys < S)[:, None], x, float("-inf"))
                    if LISTS:
                        if not HAS_SCORE:  # (the score hooks' branch masks them)
                            if m0 + BLOCK_M > L:  # a ragged last block: its rows past L read another head's stats
                                x = gl.where((m0 + s_cols < L)[None, :], x, float("-inf"))
                        if HAS_MASK_MOD:
                            if partial:  # the mask_mod, at clamped indices in the transposed tile's shapes
                                keep = MASK_MOD(b, hk * G + g, gl.minimum(m0 + s_cols, L - 1)[None, :],
                                                gl.minimum(keys, S - 1)[:, None], mask_ptrs, mmeta)
                                keep, x = gl.broadcast(keep, x)
                                x = gl.where(keep, x, float("-inf"))
                    if CAUSAL or WINDOW:
                        # A band edge: mask by index, both bounds (testing each bound per block, as
                        # ws._mask_edges does, spilled here and slowed the window: docs/kernels.md,
                        # "Tuning: the Gluon dK / dV kernel").
                        if (m0 < a) | (m0 >= c):
                            d = (keys - m0)[:, None] - s_cols[None, :]  # key - query
                            if CAUSAL:
                                x = gl.where(d <= causal_off, x, float("-inf"))
                            if WINDOW:
                                x = gl.where(d >= window_off, x, float("-inf"))
                    p = gl.exp2(x)
                    dp = warpgroup_mma(v_tile, do_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                    delta = dl_smem.index(slot).load(col_layout)
                    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
                    ds = p * (dp - delta[None, :])  # fp32 P, as the core's
                    if LISTS:  # a listed block's rows past L: another head's dO, stats (0 * inf would be NaN)
                        if m0 + BLOCK_M > L:
                            ds = gl.where((m0 + s_cols < L)[None, :], ds, 0.0)
                    if HAS_SCORE:  # to the raw score: times d score_mod / d score
                        ds = gl.where(ds != 0.0, ds * dmod, 0.0)
                    p16 = gl.convert_layout(p.to(q_desc.dtype), op_layout)
                    ds16 = gl.convert_layout(ds.to(q_desc.dtype), op_layout)
                    dv = warpgroup_mma(p16, do_t, dv, is_async=True)
                    if FUSED_DQ:  # FlashAttention 3's order: dQ's products before dK's, its tile staged while dK's runs
                        buf = qd % 2
                        ds_smem.index(2 * buf + CID).store(ds.to(q_desc.dtype))
                        fence_async_shared()
                        thread_barrier()  # the warpgroup's whole tile, before the other consumer reads it
                        mbarrier.arrive(ds_ready.index(buf))
                        mbarrier.wait(ds_ready.index(buf), (qd // 2) & 1)
                        dq = warpgroup_mma(ds_smem.index(2 * buf).permute((1, 0)),
                                           k_smem.index(2 * kb).slice(CID * DH, DH, 1),
                                           gl.zeros([BLOCK_M, DH], gl.float32, q_layout), use_acc=False, is_async=True)
                        dq = warpgroup_mma(ds_smem.index(2 * buf + 1).permute((1, 0)),
                                           k_smem.index(2 * kb + 1).slice(CID * DH, DH, 1), dq, is_async=True)
                        dk = warpgroup_mma(ds16, q_t, dk, is_async=True)
                        dv, dq, _ = warpgroup_mma_wait(num_outstanding=1, deps=(dv, dq, p16))  # dK's still runs
                        tma.store_wait(0)  # the previous step's reduce-add has read the tile
                        thread_barrier()
                        dq_smem.index(CID).store(dq * sm_scale)
                        fence_async_shared()
                        thread_barrier()
                        tma_atomic_add(dq_desc, [dq_row + m0, dq_col], dq_smem.index(CID))
                        dk, _ = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ds16))
                        mbarrier.arrive(qd_empty.index(slot))
                    else:
                        dk = warpgroup_mma(ds16, q_t, dk, is_async=True)
                        dv, dk, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, p16, ds16))
                        mbarrier.arrive(qd_empty.index(slot))
                    qd += 1
            mbarrier.arrive(kv_empty.index(kb))  # the producer may load a later tile's K / V here
            kv_col = hk * 0
            if VARLEN:
                kv_col = hk * D
            a_rows = gl.arange(0, KEYS, gl.SliceLayout(1, a_layout))
            a_cols = gl.arange(0, D, gl.SliceLayout(0, a_layout))
            row = (kv_row + CID * KEYS + a_rows).to(gl.int64)[:, None]
            ok = (n0 + CID * KEYS + a_rows < S)[:, None]
            gl.store(dk_ptr + row * stride_dk + kv_col + a_cols[None, :], (dk * sm_scale).to(q_desc.dtype), mask=ok)
            gl.store(dv_ptr + row * stride_dv + kv_col + a_cols[None, :], dv.to(q_desc.dtype), mask=ok)
            tcount += 1
        it += 1
        t = take(tid_smem, tid_full, tid_empty, it, TBUF)
    if FUSED_DQ:
        tma.store_wait(0)  # the last reduce-add reads shared memory the kernel is about to give up


# tile counts: one build for every count (their divisibility changes no instruction of the sm_90 build)
@gluon.jit(do_not_specialize=["n_tiles", "n_n", "sec"])
def attn_bwd_dkdv_ws(q_desc, do_desc, k_desc, v_desc, nl_desc, dl_desc, dq_desc, dk_ptr, dv_ptr, cu_q, cu_k,
                     counter_ptr, stride_dk, stride_dv, stride_statb, stride_stath, n_tiles, n_n, sec, H, G, L_max,
                     S_max, qk_scale, sm_scale, diag, win_right, win_left, score_ptrs, score_meta, list_ptrs,
                     mask_ptrs, mask_meta, KEYS: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                     KBUFS: gl.constexpr, STAT_PAD: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                     VARLEN: gl.constexpr, TBUF: gl.constexpr, Q_ROWS: gl.constexpr, FUSED_DQ: gl.constexpr = False,
                     HAS_SCORE: gl.constexpr = False,
                     SCORE_MOD: gl.constexpr = False,
                     SCORE_DSCORE: gl.constexpr = False, LOAD_SCORE_META: gl.constexpr = False,
                     LISTS: gl.constexpr = False, SPARSE_BQ: gl.constexpr = 128, HAS_MASK_MOD: gl.constexpr = False,
                     MASK_MOD: gl.constexpr = False, LOAD_MASK_META: gl.constexpr = False):
    """Persistent: grid (programs,); program i runs tile i, then takes the next untaken tile of the
    n_tiles = n_n * B * Hkv (``_kv_tile``) from the int32 at ``counter_ptr`` (0 at launch). Dense:
    2-D row views Q / dO (b * H + h) * L + i, K / V / dK / dV (b * Hkv + hk) * S + j. VARLEN: Q /
    dO (T, H * D), K / V / dK / dV (T_k, Hkv * D), sequences from cu_q / cu_k (VARLEN == UNIFORM:
    every sequence L_max queries and S_max keys, cu_q / cu_k not read). NLSE2 / Delta as
    ``core.attn_bwd`` reads them, through 1-D descriptors (strides stride_statb, stride_stath; packed
    rows ``_stat_off``). Q_ROWS (dense): Q / dO the (B * L, H * D) rows of a model's views.
    FUSED_DQ: dQ added, times the scale, into the fp32 tensor of ``dq_desc`` ([BLOCK_M, D / 2] boxes
    over rows laid out as Q's), which the caller zeroed (``_consumer``); else ``dq_desc`` is not read.
    HAS_SCORE, SCORE_MOD / SCORE_DSCORE / LOAD_SCORE_META: a flex score_mod's generated hooks over the band,
    reading the captures at ``score_ptrs`` (a tuple) and its meta at ``score_meta``; without one,
    ``ws_common.hook_constexprs`` / ``hook_args``' placeholders, never read."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2 * KBUFS] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2 * KBUFS] + v_desc.block_type.shape, v_desc.layout)
    nl_smem = gl.allocate_shared_memory(nl_desc.dtype, [STAGES] + nl_desc.block_type.shape, nl_desc.layout)
    dl_smem = gl.allocate_shared_memory(dl_desc.dtype, [STAGES] + dl_desc.block_type.shape, dl_desc.layout)
    qd_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qd_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_full = gl.allocate_shared_memory(gl.int64, [2 * KBUFS, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [KBUFS, 1], mbarrier.MBarrierLayout())
    if FUSED_DQ:  # dS^T of two steps by two consumers; each consumer's dQ tile
        ds_smem = gl.allocate_shared_memory(k_desc.dtype, [4, KEYS, BLOCK_M], k_desc.layout)
        dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2] + dq_desc.block_type.shape, dq_desc.layout)
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)  # both consumers' halves written
    else:  # placeholders, never read
        ds_smem = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        dq_smem = ds_smem
        ds_ready = ds_smem
    tid_smem, tid_full, tid_empty = tile_ring(TBUF)
    for i in gl.static_range(STAGES):
        mbarrier.init(qd_full.index(i), count=1)
        mbarrier.init(qd_empty.index(i), count=2)  # both consumers release a slot
    for i in gl.static_range(2 * KBUFS):
        mbarrier.init(kv_full.index(i), count=1)
    for i in gl.static_range(KBUFS):
        mbarrier.init(kv_empty.index(i), count=2)
    gl.warp_specialize([
        (_consumer, (q_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, nl_smem, dl_smem, ds_smem, dq_smem, qd_full,
                     qd_empty, kv_full, kv_empty, ds_ready, tid_smem, tid_full, tid_empty, dk_ptr, dv_ptr, stride_dk,
                     stride_dv, n_tiles, n_n, sec, H, G, L_max, S_max, cu_q, cu_k, diag, win_right, win_left,
                     qk_scale, sm_scale, score_ptrs, score_meta, list_ptrs, mask_ptrs, mask_meta, 0, KEYS,
                     BLOCK_M, D, STAGES, KBUFS, CAUSAL, WINDOW, VARLEN, Q_ROWS, TBUF, FUSED_DQ, HAS_SCORE, SCORE_MOD,
                     SCORE_DSCORE, LOAD_SCORE_META, LISTS, SPARSE_BQ, HAS_MASK_MOD, MASK_MOD, LOAD_MASK_META)),
        (_consumer, (q_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, nl_smem, dl_smem, ds_smem, dq_smem, qd_full,
                     qd_empty, kv_full, kv_empty, ds_ready, tid_smem, tid_full, tid_empty, dk_ptr, dv_ptr, stride_dk,
                     stride_dv, n_tiles, n_n, sec, H, G, L_max, S_max, cu_q, cu_k, diag, win_right, win_left,
                     qk_scale, sm_scale, score_ptrs, score_meta, list_ptrs, mask_ptrs, mask_meta, 1, KEYS,
                     BLOCK_M, D, STAGES, KBUFS, CAUSAL, WINDOW, VARLEN, Q_ROWS, TBUF, FUSED_DQ, HAS_SCORE, SCORE_MOD,
                     SCORE_DSCORE, LOAD_SCORE_META, LISTS, SPARSE_BQ, HAS_MASK_MOD, MASK_MOD, LOAD_MASK_META)),
        (_producer, (q_desc, do_desc, k_desc, v_desc, nl_desc, dl_desc, q_smem, do_smem, k_smem, v_smem, nl_smem,
                     dl_smem, qd_full, qd_empty, kv_full, kv_empty, tid_smem, tid_full, tid_empty, counter_ptr,
                     stride_statb, stride_stath, n_tiles, n_n, sec, H, G, L_max, S_max, cu_q, cu_k, diag, win_right,
                     win_left, list_ptrs, KEYS, BLOCK_M, D, STAGES, KBUFS, STAT_PAD, CAUSAL, WINDOW, VARLEN, Q_ROWS,
                     TBUF, LISTS, SPARSE_BQ)),
    ], [4, 1], [232, 40])


# a flex score_mod's captures and meta; a BlockMask's lists; a mask_mod's captures and meta
_LAUNCH = Launcher(attn_bwd_dkdv_ws, nested=("score_ptrs", "score_meta", "list_ptrs", "mask_ptrs", "mask_meta"))


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, mask, dropout_p: float, packed,
             L_max: int, S_max: int, q_rows: bool = False) -> bool:
    """Whether ``dkdv`` serves a backward on an sm_90 device (the caller checks the device and that
    dQ comes from dQ programs): D = 128, fp16 / bf16, no mask or dropout; dense contiguous (B, H, L,
    D) / (B, Hkv, S, D) tensors, or packed (1, H, T, D) views of contiguous (T, H, D) tensors with
    no pages or seqused_k whose query sequences are all L_max long and key sequences S_max; ``q_rows``
    (KernelOptions.rows_q_gluon): also dense calls whose q and dout are a model's row views
    (``_layout.is_rows``) with contiguous k / v, served with Q_ROWS."""
    if mask is not None or dropout_p > 0.0 or q.shape[-1] != HEAD_DIM or q.dtype not in GL_DTYPE:
        return False
    if k.numel() == 0 or q.numel() == 0 or not all(t.data_ptr() % 16 == 0 for t in (q, k, v, dout)):
        return False
    if max(q.numel(), k.numel()) // HEAD_DIM >= 2**31 - 2 * BLOCK_N:
        return False  # TMA coordinates and tile rows are int32
    if packed is not None:
        if packed.table is not None or packed.seqused_k is not None:
            return False
        n = packed.cu_q.numel() - 1
        if q.shape[2] != n * L_max or k.shape[2] != n * S_max:
            return False  # mixed lengths: tiles past a sequence's end would be dealt (as in ws.eligible)
        return all(t.stride(1) == HEAD_DIM and t.stride(2) == t.shape[1] * HEAD_DIM and t.stride(3) == 1
                   for t in (q, k, v, dout))
    if q_rows and is_rows(q) and is_rows(dout) and k.is_contiguous() and v.is_contiguous():
        return True
    return all(t.is_contiguous() for t in (q, k, v, dout))


def _row_descriptor(stat: torch.Tensor) -> TensorDescriptor:
    """A 1-D descriptor of BLOCK_M-element boxes over a contiguous NLSE2 / Delta buffer."""
    flat = stat.view(-1)
    return build_descriptor(flat, [flat.numel()], [1], [BLOCK_M], ROW_LAYOUT)


ROW_LAYOUT = checked_layout(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1), [BLOCK_M],
                            torch.float32)


def dkdv(q, k, v, dout, nlse2, delta, stat_strides: tuple, dk, dv, scale: float, band_args: dict,
         band_flags: dict, packed, n_seq: int, L_max: int, S_max: int, score=None, warmup: bool = False,
         dq: torch.Tensor | None = None, lists: tuple | None = None, mask=None) -> None:
    """dK and dV of an ``eligible`` backward into ``dk`` / ``dv`` (laid out like k / v), from the
    preprocess's NLSE2 / Delta (``launch._row_stats``): dense q / dout (B, H, L, D), k / v (B, Hkv, S,
    D); packed, their (1, H, T, D) views, ``n_seq`` sequences of L_max queries and S_max keys.
    ``band_args``: diag, win_right, win_left (launch.band_args). ``score``: a flex score_mod's
    (generated functions, ``codegen.CaptureArgs``) over the band; its captures' gradients are the
    core's (the caller sends a call with any to the core). ``warmup``: compile the kernel this call
    would launch and launch nothing (dout, the statistics and dk / dv may be meta tensors: what the
    flex backward's warmup compiles while its forward runs). ``dq``: an fp32 tensor laid out like q,
    zeroed, into which the kernel adds dQ (FUSED_DQ; then no dQ programs run); None: dQ is the dQ
    programs'. ``lists`` (dense, no band): a BlockMask's query-side lists of 128-query blocks over
    128-key blocks, (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, their strides as
    ``launch._list_strides`` makes them): only the listed steps run (LISTS), with ``mask``, a flex
    mask_mod's (generated functions, ``codegen.CaptureArgs``), on the partial blocks."""
    H, D, Hkv = q.shape[1], q.shape[3], k.shape[1]
    varlen = packed is not None
    q_rows = not varlen and is_rows(q) and not q.is_contiguous()  # eligible's q_rows case
    n_n = -(-S_max // BLOCK_N)
    n_tiles = n_n * n_seq * Hkv
    q2, do2 = (model_rows(q), model_rows(dout)) if q_rows else (row_view(q, varlen), row_view(dout, varlen))
    k2, v2 = row_view(k, varlen), row_view(v, varlen)
    dk2, dv2 = row_view(dk, varlen), row_view(dv, varlen)
    cu_q, cu_k = cu_seqs(packed, nlse2)
    if warmup:  # nothing runs: no counter on the device (a warmup thread may run beside a graph capture)
        grid, counter = (1,), torch.zeros(1, dtype=torch.int32, device="meta")
    else:
        grid, counter = persistent(n_tiles, q.device)
    q_desc = descriptor(q2, BLOCK_M, D)
    fused = dq is not None
    if fused:
        dq2 = model_rows(dq) if q_rows else row_view(dq, varlen)  # dq is laid out as q
        if dq2.data_ptr() != dq.data_ptr() or dq.dtype != torch.float32:  # (a reshape's copy would take the adds)
            raise ValueError(f"dq must be fp32 and laid out as q (rows viewable as the kernel's); got {dq.dtype}, "
                             f"shape {tuple(dq.shape)}, strides {dq.stride()} for q's {q.stride()}")
    args = dict(q_desc=q_desc, do_desc=descriptor(do2, BLOCK_M, D), k_desc=descriptor(k2, KEYS, D),
                v_desc=descriptor(v2, KEYS, D), nl_desc=_row_descriptor(nlse2), dl_desc=_row_descriptor(delta),
                dq_desc=descriptor(dq2, BLOCK_M, D // 2) if fused else q_desc,
                dk_ptr=dk2, dv_ptr=dv2, cu_q=cu_q, cu_k=cu_k, counter_ptr=counter, stride_dk=dk2.stride(0),
                stride_dv=dv2.stride(0), stride_statb=stat_strides[0], stride_stath=stat_strides[1], n_tiles=n_tiles,
                # a band's heads per section: their Q and dO, and with dQ fused its fp32 rows too, in L2
                n_n=n_n, sec=section(n_seq * Hkv, L_max, H // Hkv * (2 if fused else 1), q), H=H, G=H // Hkv,
                L_max=L_max, S_max=S_max,
                qk_scale=scale * RCP_LN2.value, sm_scale=scale, **band_args, **hook_args(score, counter),
                **list_args(lists, mask, counter))
    constexprs = dict(KEYS=KEYS, BLOCK_M=BLOCK_M, D=D, STAGES=STAGES, KBUFS=FUSED_KBUFS if fused else KBUFS,
                      STAT_PAD=STAT_PAD.value, CAUSAL=band_flags["CAUSAL"], WINDOW=band_flags["WINDOW"],
                      VARLEN=varlen_mode(packed), TBUF=TBUF, Q_ROWS=q_rows, FUSED_DQ=fused,
                      **hook_constexprs(score and score[0], derivative=True), **list_constexprs(lists, mask),
                      SPARSE_BQ=LIST_BLOCK)
    if warmup:  # into Triton's cache, where the launcher's first launch finds it
        await_compile_key()
        attn_bwd_dkdv_ws.warmup(grid=grid, **args, **constexprs, num_warps=4, num_stages=3, **COMPILE_OPTIONS)
        return
    _LAUNCH(grid, args, constexprs, 4, 3)

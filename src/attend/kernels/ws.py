"""The Hopper forward in Gluon, warp-specialized and persistent: one producer warp issues every
TMA load (Q, K, V and a float bias's tiles) into shared-memory buffers, and two consumer
warpgroups of 64 query rows each run the QK product, the softmax and the PV product on their own.
The consumers release buffers through mbarriers and never meet at a CTA barrier, so one's softmax
runs while the other's MMAs do: the overlap the ``tl`` core cannot express (its warpgroups meet at
a ``bar.sync`` per iteration, and Triton 3.6 waits for an asynchronous QK product at once). Each
consumer also keeps the next key block's QK product in flight during a block's softmax (``PIPE``,
KernelOptions.fwd_ws_pipeline; docs/kernels.md, "Tuning: the Gluon forward").

One program per SM takes tiles (128 query rows of one head) from a counter until none is left,
and its producer loads the next tile's Q and first K / V blocks while the consumers finish the
current one: a tile's start pays no load latency, the ~9 us per program that kept the core's
sliding window at 2.02-2.07x its full causal time. A band (causal top-left
or bottom-right, sliding window) visits only the key blocks it covers and masks the blocks on
its edges and a sequence's ragged end, as the core does.

H100, bf16, ``benchmarks/ab.py`` (KernelOptions.fwd_ws on / off), TFLOP/s: sliding window 4096 of
16k 503 against 442; full causal 16k 547 against 514, 4k 494 against 434, 1k 357 against 339; no
mask 4k 545 against 496, 1k 469 against 419; a float bias 403 against 365. The output's TMA store
and the per-bound edge masks then took the window to 536 and one 16k causal sequence to 571
(docs/kernels.md, "Tuning: the Gluon forward").

It serves (``eligible``): D = 128, fp16 / bf16, no dropout; dense contiguous tensors with any
lengths and band, and no mask or a full-size float bias; packed sequences (varlen, contiguous
(T, H, D), no pages or seqused_k) whose query lengths are all equal (mixed lengths leave tiles
empty; they stay on the core, whose grid skips them for free). Every other call takes the core
(``core.attn_fwd``). The backward reads this kernel's output and LSE: its dK / dV from the Gluon
kernel of ``ws_bwd.py`` where that serves, else from the core. Gluon kernels do not run under the
interpreter: the CPU tests compile this one for sm_90
(``build.py``) and the GPU suite checks it against float64.
"""

from __future__ import annotations

import torch

from .._layout import is_rows
from .core import LN2, RCP_LN2, key_blocks
from .fastlaunch import Launcher
from .versions import (fence_async_shared, gl, gluon, mbarrier, tma, tma_load, tma_store, warpgroup_mma,
                       warpgroup_mma_wait)
from .ws_common import (GL_DTYPE, HEAD_DIM, TBUF, cu_seqs, deal, descriptor, hook_args, hook_constexprs, list_args,
                        list_constexprs, list_row, listed_start, model_rows, next_tile, persistent, publish, row_view,
                        section, sequence, take, tile_ring, varlen_mode)

ROWS = 64  # query rows per consumer warpgroup; a tile covers BLOCK_M = 2 * ROWS
BLOCK_M = 2 * ROWS
BLOCK_N = 128  # keys per block
STAGES = 2  # ring slots for K, V and the bias


@gluon.jit
def _tile(t, n_m, n_bh, sec, H, G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
          VARLEN: gl.constexpr, Q_ROWS: gl.constexpr, LISTS: gl.constexpr = False):
    """Tile ``t`` of n_m query blocks by n_bh = B * H heads. Without a band, query block fastest:
    programs running together read the same heads' K / V (the L2 keeps them). With one, sections
    of ``sec`` heads (as many as the L2 holds the K / V of; ``section``) one after the other, and
    in a section heads fastest and the longest blocks first (the last under a causal band), so the
    tiles in flight are alike in length and read the same heads' K / V. Returns
    (m0, L, S, q_row, kv_row, b, h, hk, lo, a, c, hi, causal_off, window_off, lse_row); b the batch or
    packed sequence. q_row / kv_row:
    the tile's first row in the 2-D views of Q / K (``row_view``), whose columns start at h * D /
    hk * D when VARLEN; Q_ROWS (dense): Q / O rows b * L + i of a model's (B * L, H * D) views,
    columns from h * D, LSE (B, H, L) over (H, B, L) storage (``stride_lseh`` = B * L). Key blocks
    from core.key_blocks: [lo, hi) visited, [a, c) unmasked. A tile past its sequence's end has
    m0 >= L."""
    bh, pid_m = deal(t, n_m, n_bh, sec, CAUSAL or WINDOW)
    if CAUSAL or LISTS:  # the last query blocks first: the longest under a causal band (or causal-like lists)
        pid_m = n_m - 1 - pid_m
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    if VARLEN:
        q0, L, k0, S = sequence(b, cu_q, cu_k, L_max, S_max, VARLEN)
        q_row = q0 + m0
        kv_row = k0
        lse_row = h * stride_lseh + q0 + m0  # lse (H, T)
    else:
        L = L_max
        S = S_max
        kv_row = (b * (H // G) + hk) * S
        if Q_ROWS:
            q_row = b * L + m0
            lse_row = h * stride_lseh + q_row
        else:
            q_row = bh * L + m0
            lse_row = q_row
    causal_off = diag * (S - L) + win_right
    window_off = diag * (S - L) - win_left
    lo, a, c, hi = key_blocks(m0, 0, S, causal_off, window_off, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    return m0, L, S, q_row, kv_row, b, h, hk, lo, a, c, hi, causal_off, window_off, lse_row


@gluon.jit
def _mask_edges(s, k_start, r0, rows, s_cols, S, causal_off, window_off, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
    """Scores of rows [r0, r0 + ROWS) (``rows``) against keys [k_start, k_start + BLOCK_N), -inf where
    a key is past S, right of the causal diagonal or left of the window. Each bound is tested per
    block and applied only where some row crosses it: a window's diagonal block pays one compare
    per score, its lower-edge block one (testing all three everywhere was slower: docs/kernels.md,
    "Tuning: the Gluon forward")."""
    cols = k_start + s_cols
    if k_start + BLOCK_N > S:
        s = gl.where(cols[None, :] < S, s, float("-inf"))
    if CAUSAL:
        if k_start + BLOCK_N - 1 > r0 + causal_off:
            s = gl.where(cols[None, :] <= rows[:, None] + causal_off, s, float("-inf"))
    if WINDOW:
        if k_start < r0 + ROWS - 1 + window_off:
            s = gl.where(cols[None, :] >= rows[:, None] + window_off, s, float("-inf"))
    return s


@gluon.jit
def _producer(q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, q_full, q_empty, k_full, v_full,
              b_full, k_empty, v_empty, b_empty, tid_smem, tid_full, tid_empty, counter_ptr, n_tiles, n_m, sec, H,
              G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, list_ptrs, ROWS: gl.constexpr,
              BLOCK_N: gl.constexpr, D: gl.constexpr,
              STAGES: gl.constexpr, QBUFS: gl.constexpr, HAS_BIAS: gl.constexpr, CAUSAL: gl.constexpr,
              WINDOW: gl.constexpr, VARLEN: gl.constexpr, Q_ROWS: gl.constexpr, TBUF: gl.constexpr,
              LISTS: gl.constexpr):
    """Takes tiles, the program's own id first, then the next untaken one from the counter at
    ``counter_ptr`` (a program that finishes early takes more, so none idles while another runs
    long tiles), and publishes each to the consumers (``publish``). For each, its two Q halves
    into Q buffer ``tiles % QBUFS`` once both consumers are done with the tile QBUFS before, then
    key block j's K and V (and each consumer's bias tile) into ring slot ``count % STAGES``, the
    count running over tiles: the next tile's Q and first blocks load while the consumers finish
    this one, so a tile's start costs no load latency (the ~9 us per program of the core,
    docs/kernels.md, "Tuning: the Gluon forward")."""
    P = gl.num_programs(0)
    n_bh = n_tiles // n_m
    tcount = 0
    kv = 0
    it = 0
    t = gl.program_id(0)
    publish(tid_smem, tid_full, tid_empty, t, it, TBUF)
    while t < n_tiles:
        m0, L, S, q_row, kv_row, b, h, hk, lo, a, c, hi, causal_off, window_off, lse_row = _tile(
            t, n_m, n_bh, sec, H, G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, 2 * ROWS,
            BLOCK_N, CAUSAL, WINDOW, VARLEN, Q_ROWS, LISTS)
        if m0 < L:
            q_col = h * 0
            kv_col = h * 0
            if VARLEN:  # packed (T, H * D) views: a head is a column offset
                q_col = h * D
                kv_col = hk * D
            if Q_ROWS:  # a model's (B * L, H * D) query rows
                q_col = h * D
            qb = tcount % QBUFS
            mbarrier.wait(q_empty.index(qb), ((tcount // QBUFS) & 1) ^ 1, pred=tcount >= QBUFS)
            for cid in gl.static_range(2):
                mbarrier.expect(q_full.index(2 * qb + cid), q_desc.block_type.nbytes)
                tma_load(q_desc, [q_row + cid * ROWS, q_col], q_full.index(2 * qb + cid),
                                                q_smem.index(2 * qb + cid))
            if LISTS:  # the BlockMask's key blocks of this query block, as blocks [0, hi) of a walk
                n_part, idx, step, fidx, fstep, hi = list_row(list_ptrs, b, h, m0 // (2 * ROWS), BLOCK_N)
                lo = hi * 0
            for j in range(lo // BLOCK_N, gl.cdiv(hi, BLOCK_N)):
                if LISTS:
                    k0, _ = listed_start(list_ptrs, j * BLOCK_N, n_part, idx, step, fidx, fstep, BLOCK_N)
                else:
                    k0 = j * BLOCK_N
                slot = kv % STAGES
                ph = ((kv // STAGES) & 1) ^ 1  # the first pass finds every slot free
                if HAS_BIAS:
                    for cid in gl.static_range(2):
                        mbarrier.wait(b_empty.index(2 * slot + cid), ph, pred=kv >= STAGES)
                        mbarrier.expect(b_full.index(2 * slot + cid), b_desc.block_type.nbytes)
                        tma_load(b_desc, [q_row + cid * ROWS, j * BLOCK_N],
                                                        b_full.index(2 * slot + cid), b_smem.index(2 * slot + cid))
                mbarrier.wait(k_empty.index(slot), ph, pred=kv >= STAGES)
                mbarrier.expect(k_full.index(slot), k_desc.block_type.nbytes)
                tma_load(k_desc, [kv_row + k0, kv_col], k_full.index(slot), k_smem.index(slot))
                mbarrier.wait(v_empty.index(slot), ph, pred=kv >= STAGES)
                mbarrier.expect(v_full.index(slot), v_desc.block_type.nbytes)
                tma_load(v_desc, [kv_row + k0, kv_col], v_full.index(slot), v_smem.index(slot))
                kv += 1
            tcount += 1
        it += 1
        t = next_tile(counter_ptr, P, n_tiles, tid_smem, tid_full, tid_empty, it, TBUF)


@gluon.jit
def _block_scores(s, k_start, partial, slot, ph, rows, s_cols, m0, L, S, a, c, b, h, causal_off, window_off, b_smem,
                  b_full, b_empty, score_ptrs, meta, mask_ptrs, mmeta, sm_scale, s_layout: gl.constexpr,
                  CID: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr,
                  HAS_SCORE: gl.constexpr, SCORE_MOD: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                  EDGES: gl.constexpr, HAS_MASK_MOD: gl.constexpr, MASK_MOD: gl.constexpr):
    """The scores of the key block from ``k_start`` from its raw products ``s`` (ring slot
    ``slot``, phase ``ph``): natural units with a bias (its tile from the ring), log2 units through a
    score hook, else the raw products; -inf where a partial listed block's mask_mod drops a score
    (HAS_MASK_MOD, ``partial``), outside the band and past S."""
    if HAS_BIAS:  # natural units, like the core's float masks
        mbarrier.wait(b_full.index(2 * slot + CID), ph)
        bias = b_smem.index(2 * slot + CID).load(s_layout).to(gl.float32)
        mbarrier.arrive(b_empty.index(2 * slot + CID))
        s = s * sm_scale + bias
    elif HAS_SCORE:
        q_idx = gl.minimum(rows, L - 1)[:, None]
        kv_idx = gl.minimum(k_start + s_cols, S - 1)[None, :]
        s_mod, s = gl.broadcast(SCORE_MOD(s * sm_scale, b, h, q_idx, kv_idx, score_ptrs, meta), s)
        s = s_mod * RCP_LN2  # log2 units, as before the one-FMA exponent (not yet timed with hooks)
    if HAS_MASK_MOD:
        if partial:  # the mask_mod at clamped indices (keys past S are masked below)
            keep = MASK_MOD(b, h, gl.minimum(rows, L - 1)[:, None], gl.minimum(k_start + s_cols, S - 1)[None, :],
                            mask_ptrs, mmeta)
            keep, s = gl.broadcast(keep, s)
            s = gl.where(keep, s, float("-inf"))
    if EDGES:
        if (k_start < a) | (k_start >= c):
            # Only the bounds this consumer's rows cross in this block: both consumers
            # meet the edge blocks together, so their extra ALU work idles the MMAs.
            s = _mask_edges(s, k_start, m0 + CID * ROWS, rows, s_cols, S, causal_off, window_off, ROWS, BLOCK_N,
                            CAUSAL, WINDOW)
    return s


@gluon.jit
def _key_block(list_ptrs, j, n_part, idx, step, fidx, fstep, BLOCK_N: gl.constexpr, LISTS: gl.constexpr):
    """(first key, whether the BlockMask lists the block as partial) of block j of a tile's walk: the
    j-th listed block (LISTS), else key block j of the band."""
    if LISTS:
        k0, partial = listed_start(list_ptrs, j * BLOCK_N, n_part, idx, step, fidx, fstep, BLOCK_N)
    else:
        k0 = j * BLOCK_N
        partial = False
    return k0, partial


@gluon.jit
def _softmax(s, m_i, l_i, log2_scale, dtype: gl.constexpr, p_layout: gl.constexpr):
    """One block's online-softmax step over scores ``s`` that ``log2_scale`` takes to the log2
    domain: P in ``dtype`` (the PV product's operand), the factor that rescales the rows'
    accumulators, and the rows' new maximum (log2 domain) and sum."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * log2_scale)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing finite yet
    p = gl.exp2(s * log2_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    l_i = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i


@gluon.jit
def _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, b_smem, q_full, q_empty, k_full, v_full, b_full, k_empty, v_empty,
              b_empty, tid_smem, tid_full, tid_empty, out_ptr, stride_o, lse_ptr, n_tiles, n_m, sec, H, G, L_max,
              S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, qk_scale, score_ptrs, score_meta, sm_scale,
              list_ptrs, mask_ptrs, mask_meta, CID: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr, QBUFS: gl.constexpr, HAS_BIAS: gl.constexpr,
              CAUSAL: gl.constexpr, WINDOW: gl.constexpr, VARLEN: gl.constexpr, Q_ROWS: gl.constexpr,
              EDGES: gl.constexpr, TBUF: gl.constexpr, O_TMA: gl.constexpr, HAS_SCORE: gl.constexpr,
              SCORE_MOD: gl.constexpr, LOAD_SCORE_META: gl.constexpr, PIPE: gl.constexpr, LISTS: gl.constexpr,
              HAS_MASK_MOD: gl.constexpr, MASK_MOD: gl.constexpr, LOAD_MASK_META: gl.constexpr):
    """Online softmax of rows [CID * ROWS, (CID + 1) * ROWS) of each tile the producer publishes over
    its key blocks; writes their output and LSE. A block's scores stay unscaled (the raw products;
    natural units with a bias) and its row maxima are scaled to the log2 domain (the scale is
    positive), so that the scale and the maximum's subtraction are one FMA per score in the
    exponent, as in the core's forward; a score hook's output is scaled first, as before.
    PIPE: block j+1's QK product is issued before block j's PV product, and block j+1's softmax
    runs while that PV product does. Blocks outside [a, c)
    (a band's edges, a sequence's ragged end; EDGES says whether any can exist) are masked. A row
    with no visible key, or whose every score is -inf, gets output 0 and LSE -inf, as in the core.
    HAS_SCORE: SCORE_MOD (flex over a band, ``_flex/codegen.py``'s hook): the score in natural units (the raw
    product times ``sm_scale``) through the hook at the sequence's query and key indices, clamped into
    range as the core's (keys past S are masked after it), ``meta`` read once per program."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_rows = gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    s_cols = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    o_rows = gl.arange(0, ROWS, gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    if HAS_SCORE:
        meta = LOAD_SCORE_META(score_meta)
    else:
        meta = 0
    if HAS_MASK_MOD:
        mmeta = LOAD_MASK_META(mask_meta)
    else:
        mmeta = 0
    if HAS_BIAS:
        log2_scale = RCP_LN2  # the scores in natural units
    elif HAS_SCORE:
        log2_scale = 1.0  # _block_scores scaled the hook's output already
    else:
        log2_scale = qk_scale  # the raw products
    n_bh = n_tiles // n_m
    tcount = 0
    kv = 0
    it = 0
    t = take(tid_smem, tid_full, tid_empty, it, TBUF)
    while t < n_tiles:
        m0, L, S, q_row, kv_row, b, h, hk, lo, a, c, hi, causal_off, window_off, lse_row = _tile(
            t, n_m, n_bh, sec, H, G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, 2 * ROWS,
            BLOCK_N, CAUSAL, WINDOW, VARLEN, Q_ROWS, LISTS)
        if m0 < L:
            qb = tcount % QBUFS
            q_tile = q_smem.index(2 * qb + CID)
            rows = m0 + CID * ROWS + s_rows  # the sequence's query indices
            m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
            acc = gl.zeros([ROWS, D], gl.float32, o_layout)
            mbarrier.wait(q_full.index(2 * qb + CID), (tcount // QBUFS) & 1)
            if LISTS:  # the BlockMask's key blocks of this query block, as blocks [0, hi) of a walk
                n_part, idx, step, fidx, fstep, hi = list_row(list_ptrs, b, h, m0 // (2 * ROWS), BLOCK_N)
                lo = hi * 0
            else:  # (not read)
                n_part, idx, step, fidx, fstep = 0, 0, 0, 0, 0
            j0 = lo // BLOCK_N
            j1 = gl.cdiv(hi, BLOCK_N)
            if PIPE:
                if j0 < j1:
                    slot = kv % STAGES
                    mbarrier.wait(k_full.index(slot), (kv // STAGES) & 1)
                    s = warpgroup_mma(q_tile, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                      is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                    mbarrier.arrive(k_empty.index(slot))
                    k0, partial = _key_block(list_ptrs, j0, n_part, idx, step, fidx, fstep, BLOCK_N, LISTS)
                    s = _block_scores(s, k0, partial, slot, (kv // STAGES) & 1, rows, s_cols, m0, L, S, a, c, b, h,
                                      causal_off, window_off, b_smem, b_full, b_empty, score_ptrs, meta, mask_ptrs,
                                      mmeta, sm_scale, s_layout, CID, ROWS, BLOCK_N, HAS_BIAS, HAS_SCORE, SCORE_MOD,
                                      CAUSAL, WINDOW, EDGES, HAS_MASK_MOD, MASK_MOD)
                    p16, alpha, m_i, l_i = _softmax(s, m_i, l_i, log2_scale, q_desc.dtype, p_layout)
                    for j in range(j0, j1 - 1):
                        slot = kv % STAGES
                        nslot = (kv + 1) % STAGES
                        nph = ((kv + 1) // STAGES) & 1
                        mbarrier.wait(k_full.index(nslot), nph)
                        s = warpgroup_mma(q_tile, k_smem.index(nslot).permute((1, 0)), zero_s, use_acc=False,
                                          is_async=True)
                        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                        mbarrier.wait(v_full.index(slot), (kv // STAGES) & 1)
                        acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
                        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # the QK product, issued first
                        mbarrier.arrive(k_empty.index(nslot))
                        k0, partial = _key_block(list_ptrs, j + 1, n_part, idx, step, fidx, fstep, BLOCK_N, LISTS)
                        s = _block_scores(s, k0, partial, nslot, nph, rows, s_cols, m0, L, S, a, c, b, h, causal_off,
                                          window_off, b_smem, b_full, b_empty, score_ptrs, meta, mask_ptrs, mmeta,
                                          sm_scale, s_layout, CID, ROWS, BLOCK_N, HAS_BIAS, HAS_SCORE, SCORE_MOD,
                                          CAUSAL, WINDOW, EDGES, HAS_MASK_MOD, MASK_MOD)
                        p16_next, alpha, m_i, l_i = _softmax(s, m_i, l_i, log2_scale, q_desc.dtype, p_layout)
                        acc, _ = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
                        mbarrier.arrive(v_empty.index(slot))
                        p16 = p16_next
                        kv += 1
                    slot = kv % STAGES
                    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                    mbarrier.wait(v_full.index(slot), (kv // STAGES) & 1)
                    acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
                    acc, _ = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
                    mbarrier.arrive(v_empty.index(slot))
                    kv += 1
            else:
                for j in range(j0, j1):
                    slot = kv % STAGES
                    ph = (kv // STAGES) & 1
                    mbarrier.wait(k_full.index(slot), ph)
                    s = warpgroup_mma(q_tile, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                      is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                    mbarrier.arrive(k_empty.index(slot))
                    k0, partial = _key_block(list_ptrs, j, n_part, idx, step, fidx, fstep, BLOCK_N, LISTS)
                    s = _block_scores(s, k0, partial, slot, ph, rows, s_cols, m0, L, S, a, c, b, h, causal_off,
                                      window_off, b_smem, b_full, b_empty, score_ptrs, meta, mask_ptrs, mmeta,
                                      sm_scale, s_layout, CID, ROWS, BLOCK_N, HAS_BIAS, HAS_SCORE, SCORE_MOD, CAUSAL,
                                      WINDOW, EDGES, HAS_MASK_MOD, MASK_MOD)
                    p16, alpha, m_i, l_i = _softmax(s, m_i, l_i, log2_scale, q_desc.dtype, p_layout)
                    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                    mbarrier.wait(v_full.index(slot), ph)
                    acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(v_empty.index(slot))
                    kv += 1
            if QBUFS == 1:
                mbarrier.arrive(q_empty.index(qb))  # the producer may load the next tile's Q here
            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
            gl.store(lse_ptr + lse_row + CID * ROWS + s_rows, lse, mask=rows < L)
            out = (acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]).to(q_desc.dtype)
            o_col = h * 0
            if VARLEN:
                o_col = h * D
            if Q_ROWS:
                o_col = h * D
            whole = m0 + (CID + 1) * ROWS <= L
            if (QBUFS == 1) | (not O_TMA):  # QBUFS 1: the next tile's Q is already loading into the buffer
                whole = False
            if whole:
                # Rows all inside the sequence: one TMA store through this consumer's Q buffer, whose
                # Q is read no more (a partial tile would overwrite the next head's or sequence's rows).
                q_tile.store(out)
                fence_async_shared()
                tma_store(o_desc, [q_row + CID * ROWS, o_col], q_tile)
                tma.store_wait(0)
            else:
                o_ptrs = (out_ptr + (q_row + CID * ROWS + o_rows).to(gl.int64)[:, None] * stride_o + o_col
                          + o_cols[None, :])
                gl.store(o_ptrs, out, mask=(m0 + CID * ROWS + o_rows < L)[:, None])
            if QBUFS > 1:
                mbarrier.arrive(q_empty.index(qb))  # the producer may load tile + QBUFS's Q here
            tcount += 1
        it += 1
        t = take(tid_smem, tid_full, tid_empty, it, TBUF)


# tile counts: one build for every count (their divisibility changes no instruction of the sm_90 build)
@gluon.jit(do_not_specialize=["n_tiles", "n_m", "sec"])
def attn_fwd_ws(q_desc, k_desc, v_desc, b_desc, o_desc, out_ptr, lse_ptr, cu_q, cu_k, counter_ptr, stride_o, stride_lseh,
                n_tiles, n_m, sec, H, G, L_max, S_max, qk_scale, diag, win_right, win_left, score_ptrs, score_meta,
                sm_scale, list_ptrs, mask_ptrs, mask_meta, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                QBUFS: gl.constexpr, HAS_BIAS: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                VARLEN: gl.constexpr, EDGES: gl.constexpr, TBUF: gl.constexpr, O_TMA: gl.constexpr,
                Q_ROWS: gl.constexpr, HAS_SCORE: gl.constexpr = False, SCORE_MOD: gl.constexpr = False,
                LOAD_SCORE_META: gl.constexpr = False, PIPE: gl.constexpr = False, LISTS: gl.constexpr = False,
                HAS_MASK_MOD: gl.constexpr = False, MASK_MOD: gl.constexpr = False,
                LOAD_MASK_META: gl.constexpr = False):
    """Persistent: grid (programs,); program i runs tile i, then takes the next untaken tile of
    the n_tiles = n_m * B * H (``_tile``) from the int32 at ``counter_ptr`` (0 at launch) until none
    is left. Dense: 2-D row views Q / O / the bias (b * H + h) * L + i,
    K / V (b * H / G + h / G) * S + j, LSE (B, H, L). VARLEN: Q / O (T, H * D), K / V (T_k, Hkv * D),
    LSE (H, T), sequences from cu_q / cu_k, L_max the longest query sequence (VARLEN == UNIFORM:
    every sequence L_max queries and S_max keys, cu_q / cu_k not read). Q_ROWS (dense, no
    bias): Q / O the (B * L, H * D) rows of a model's views, LSE over (H, B, L) storage. Out row
    stride stride_o. HAS_SCORE, SCORE_MOD / LOAD_SCORE_META (no bias): a flex score_mod's generated hooks over
    the band, reading the captures at ``score_ptrs`` (a tuple) and its meta at ``score_meta``;
    ``sm_scale`` the natural-units scale (``qk_scale`` without the log2 factor); without one,
    ``ws_common.hook_constexprs`` / ``hook_args``' placeholders, never read. PIPE: each consumer's
    next QK product overlaps its softmax (``_consumer``). LISTS (dense, no band or bias): a
    BlockMask's key-side lists of 128 x 128 blocks at ``list_ptrs`` (``ws_common.list_row``), only
    the listed key blocks visited, HAS_MASK_MOD / MASK_MOD / LOAD_MASK_META its mask_mod's hooks on
    the partial ones (captures at ``mask_ptrs``, meta at ``mask_meta``)."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * QBUFS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if HAS_BIAS:
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [2 * STAGES] + b_desc.block_type.shape, b_desc.layout)
    else:
        b_smem = q_smem
    q_full = gl.allocate_shared_memory(gl.int64, [2 * QBUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QBUFS, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_full = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    tid_smem, tid_full, tid_empty = tile_ring(TBUF)
    for i in gl.static_range(2 * QBUFS):
        mbarrier.init(q_full.index(i), count=1)
    for i in gl.static_range(QBUFS):
        mbarrier.init(q_empty.index(i), count=2)  # both consumers release a Q buffer
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2 * STAGES):
        mbarrier.init(b_full.index(i), count=1)
        mbarrier.init(b_empty.index(i), count=1)  # each consumer's own bias tile
    gl.warp_specialize([
        (_consumer, (q_desc, o_desc, q_smem, k_smem, v_smem, b_smem, q_full, q_empty, k_full, v_full, b_full, k_empty,
                     v_empty, b_empty, tid_smem, tid_full, tid_empty, out_ptr, stride_o, lse_ptr, n_tiles, n_m, sec,
                     H, G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, qk_scale, score_ptrs,
                     score_meta, sm_scale, list_ptrs, mask_ptrs, mask_meta, 0, ROWS, BLOCK_N, D, STAGES, QBUFS,
                     HAS_BIAS, CAUSAL, WINDOW, VARLEN, Q_ROWS, EDGES, TBUF, O_TMA, HAS_SCORE, SCORE_MOD,
                     LOAD_SCORE_META, PIPE, LISTS, HAS_MASK_MOD, MASK_MOD, LOAD_MASK_META)),
        (_consumer, (q_desc, o_desc, q_smem, k_smem, v_smem, b_smem, q_full, q_empty, k_full, v_full, b_full, k_empty,
                     v_empty, b_empty, tid_smem, tid_full, tid_empty, out_ptr, stride_o, lse_ptr, n_tiles, n_m, sec,
                     H, G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, qk_scale, score_ptrs,
                     score_meta, sm_scale, list_ptrs, mask_ptrs, mask_meta, 1, ROWS, BLOCK_N, D, STAGES, QBUFS,
                     HAS_BIAS, CAUSAL, WINDOW, VARLEN, Q_ROWS, EDGES, TBUF, O_TMA, HAS_SCORE, SCORE_MOD,
                     LOAD_SCORE_META, PIPE, LISTS, HAS_MASK_MOD, MASK_MOD, LOAD_MASK_META)),
        (_producer, (q_desc, k_desc, v_desc, b_desc, q_smem, k_smem, v_smem, b_smem, q_full, q_empty, k_full, v_full,
                     b_full, k_empty, v_empty, b_empty, tid_smem, tid_full, tid_empty, counter_ptr, n_tiles, n_m, sec,
                     H, G, L_max, S_max, cu_q, cu_k, stride_lseh, diag, win_right, win_left, list_ptrs, ROWS, BLOCK_N,
                     D, STAGES, QBUFS, HAS_BIAS, CAUSAL, WINDOW, VARLEN, Q_ROWS, TBUF, LISTS)),
    ], [4, 1], [232, 40])


# direct launches (fastlaunch.py): Triton's path took longer than a 1k kernel; a flex score_mod's
# captures (a tuple of tensors) and meta tensor, a BlockMask's lists and a mask_mod's come after the scalars
_LAUNCH = Launcher(attn_fwd_ws, nested=("score_ptrs", "score_meta", "list_ptrs", "mask_ptrs", "mask_meta"))


def pipelined(option: bool | None, score) -> bool:
    """Whether the forward runs PIPE: KernelOptions.fwd_ws_pipeline, whose None means on without a
    score hook (its longer build would delay a new flex mod's first call) and off with one."""
    return not score if option is None else option


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, mstr: tuple, mbool: bool,
             dropout_p: float, packed, L_max: int, q_rows: bool = False) -> bool:
    """Whether ``forward`` serves a call on an sm_90 device (the caller checks the device): D = 128,
    fp16 / bf16, no dropout, any band; dense (B, H, L, D) / (B, Hkv, S, D) contiguous tensors of any
    lengths with no mask or a full-size contiguous float one of the inputs' dtype; or packed ones
    (q the (1, H, T, D) view of a contiguous (T, H, D) tensor, k / v contiguous (T_k, Hkv, D)), no
    mask, pages or seqused_k, every query sequence L_max long. ``q_rows`` (KernelOptions.rows_q_gluon):
    also a dense call whose q is a model's row view (``_layout.is_rows``) with contiguous k / v (a KV
    cache's) and no mask, served with Q_ROWS."""
    if dropout_p > 0.0 or q.shape[-1] != HEAD_DIM or q.dtype not in GL_DTYPE or k.shape[-1] != HEAD_DIM:
        return False
    if k.numel() == 0 or not all(t.data_ptr() % 16 == 0 for t in (q, k, v)):
        return False
    if max(q.numel(), k.numel()) // HEAD_DIM >= 2**31 - 2 * BLOCK_M:
        return False  # TMA coordinates and tile rows are int32
    if packed is not None:  # q the (1, H, T, D) view, k / v (T_k, Hkv, D)
        if packed.table is not None or packed.seqused_k is not None or mask is not None:
            return False
        if q.shape[2] != (packed.cu_q.numel() - 1) * L_max:
            return False  # mixed lengths: the kernel would walk every (sequence, block) slot (docs/kernels.md, "Tuning: the Gluon forward")
        return (q.stride(1) == HEAD_DIM and q.stride(2) == q.shape[1] * HEAD_DIM and q.stride(3) == 1
                and k.is_contiguous() and v.is_contiguous())
    if q_rows and mask is None and is_rows(q) and k.is_contiguous() and v.is_contiguous():
        return True
    if not all(t.is_contiguous() for t in (q, k, v)):
        return False
    if mask is None:
        return True
    B, H, L, _ = q.shape
    S = k.shape[2]
    return (not mbool and mask.dtype == q.dtype and mstr == (H * L * S, L * S, S, 1) and S % 8 == 0
            and mask.data_ptr() % 16 == 0)


def forward(q, k, v, bias, out, lse, lse_strides: tuple, scale: float, band_args: dict, band_flags: dict,
            packed, n_seq: int, L_max: int, S_max: int, o_tma: bool = True, score=None,
            pipe: bool | None = None, lists: tuple | None = None, mask=None) -> None:
    """Out and LSE (fp32, natural log) of softmax(q k^T * scale + bias) v over the band for
    ``eligible`` inputs, ``scale`` > 0: dense q / out (B, H, L, D), lse (B, H, L); packed, the (1, H,
    T, D) views and lse (H, T) (``lse_strides`` (0, T)), ``n_seq`` sequences of at most L_max query
    and S_max keys. One persistent program per SM (fewer when there are fewer tiles). ``band_args``:
    diag, win_right, win_left (launch.band_args). ``o_tma``: whole 64-row output blocks leave by one
    TMA store through the Q buffer (KernelOptions.o_tma; False: gl.store). ``score`` (no bias): a flex
    score_mod's (generated functions, ``codegen.CaptureArgs``), applied to every score of the band.
    ``pipe``: KernelOptions.fwd_ws_pipeline (``pipelined``). ``lists`` (dense contiguous, no band or
    bias): a BlockMask's key-side lists of 128 x 128 blocks, (kv_num_blocks, kv_indices,
    full_kv_num_blocks, full_kv_indices, their strides as ``launch._list_strides`` makes them), with
    ``mask``, a flex mask_mod's (generated functions, ``codegen.CaptureArgs``), on partial blocks."""
    H, D = q.shape[1], q.shape[3]
    varlen = packed is not None
    q_rows = not varlen and is_rows(q) and not q.is_contiguous()  # eligible's q_rows case
    n_m = -(-L_max // BLOCK_M)
    n_tiles = n_m * n_seq * H
    q2, o2 = (model_rows(q), model_rows(out)) if q_rows else (row_view(q, True) if varlen else q, row_view(out, varlen))
    q_desc = descriptor(q2, ROWS, D)
    cu_q, cu_k = cu_seqs(packed, lse)
    causal, window = band_flags["CAUSAL"], band_flags["WINDOW"]
    grid, counter = persistent(n_tiles, q.device)
    args = dict(q_desc=q_desc, k_desc=descriptor(row_view(k, True) if varlen else k, BLOCK_N, D),
                v_desc=descriptor(row_view(v, True) if varlen else v, BLOCK_N, D),
                b_desc=q_desc if bias is None else descriptor(bias, ROWS, BLOCK_N), o_desc=descriptor(o2, ROWS, D),
                out_ptr=o2, lse_ptr=lse, cu_q=cu_q, cu_k=cu_k, counter_ptr=counter, stride_o=o2.stride(0),
                stride_lseh=lse_strides[1], n_tiles=n_tiles, n_m=n_m, sec=section(n_seq * H, S_max, k.shape[1] / H, q),
                H=H, G=H // k.shape[1], L_max=L_max, S_max=S_max, qk_scale=scale * RCP_LN2.value, **band_args,
                **hook_args(score, counter), sm_scale=float(scale), **list_args(lists, mask, counter))
    _LAUNCH(grid, args,
            dict(ROWS=ROWS, BLOCK_N=BLOCK_N, D=D, STAGES=STAGES, QBUFS=1 if bias is not None else 2,
                 HAS_BIAS=bias is not None, CAUSAL=causal, WINDOW=window, VARLEN=varlen_mode(packed),
                 # (a BlockMask's lists may list a block past S: the edges are masked wherever lists are walked)
                 EDGES=causal or window or (varlen and not packed.uniform) or S_max % BLOCK_N != 0 or lists is not None,
                 TBUF=TBUF, O_TMA=o_tma,
                 Q_ROWS=q_rows, PIPE=pipelined(pipe, score),
                 **hook_constexprs(score and score[0], derivative=False), **list_constexprs(lists, mask)), 4, 3)

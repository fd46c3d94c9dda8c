"""attend's attention core in Triton: one forward and one backward, specialised by constexpr
features. FLASH, EFFICIENT, the bias variants and varlen (and later flex) are front doors into
these kernels, never copies of them.

Conventions
- Layout: q/o ``(B, Hq, L, D)``, k/v ``(B, Hkv, S, D)``, any strides; every (b, h) base and
  every row offset is computed in int64 once, outside the hot loops, so tensors past 2^31
  elements index correctly. Query head ``h`` reads key head ``h // G`` in place (GQA).
- Scores live in the log2 domain: ``s2 = q.k * scale * RCP_LN2`` and ``exp2`` everywhere; the
  stored log-sum-exp is natural-log (``lse = (m2 + log2(l)) * LN2``).
- Band: query ``i`` sees key ``j`` iff ``i + window_off <= j <= i + causal_off`` (each bound
  only where CAUSAL / WINDOW is set), with ``causal_off = diag * (S - L) + win_right`` and
  ``window_off = diag * (S - L) - win_left``: ``diag`` 0 aligns the band top-left (``is_causal``),
  1 bottom-right (bias variants, varlen). Key blocks outside the band are skipped, not masked;
  only the blocks that straddle an edge (and the ragged tail) pay for masking, so a sliding
  window costs time in proportion to its width.
- Lengths: ``L_max``/``S_max`` are runtime ints (no recompile per length); Triton still
  specializes them by divisibility by 16 (and == 1), which lets the bounds-masked mask loads
  vectorize: the bias forward ran 371 vs 204 TFLOP/s with it (H100; docs/kernels.md, Tuning: masks).
- VARLEN: packed sequences. ``B`` is the number of sequences, ``L_max``/``S_max`` the longest
  ones (they size the grid); sequence ``b`` holds query rows ``[CU_Q[b], CU_Q[b+1])`` and key rows
  ``[CU_K[b], ...)`` of ``(1, H, T, D)`` views, ``SEQUSED``: ``SEQUSED_K[b]`` keys. ``PAGED``: key
  ``j`` of sequence ``b`` lives at slot ``j % PAGE_SIZE`` of page ``TABLE[b, j // PAGE_SIZE]`` of a
  ``(pages, PAGE_SIZE, Hkv, D)`` pool (forward only). The band is per sequence.
- LSE: element ``(b, h, i)`` at ``b * stride_lseb + h * stride_lseh + row0 + i``, where ``row0``
  is the sequence's first packed row (0 when dense): ``(B, H, L)`` dense, ``(H, T)`` varlen. The
  backward reads its own copy, NLSE2 (minus the lse, log2 domain), and Delta, both written by
  ``attn_bwd_preprocess`` with each sequence's rows aligned and padded to STAT_PAD (``_stat_row0``).
- A row with no visible key gets ``l = 0``: output 0, ``lse = -inf``; the backward reads such
  rows' NLSE2 as ``-inf`` so their probabilities, and gradients, are exactly 0.
- Backward: one launch (see ``attn_bwd``); dQ either by its own programs (deterministic) or by
  atomics from the dK/dV programs (a tuning choice, never in deterministic mode).
- Dropout: Philox (``tl.rand``) keyed by ``seed`` at offset ``((b*Hq + h)*L + i)*S + j``
  (int64), regenerated in the backward instead of stored.
"""

import triton
import triton.language as tl

RCP_LN2 = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * RCP_LN2)
LN2 = tl.constexpr(0.6931471805599453)
RESCALE_SLACK = tl.constexpr(8.0)  # LAZY_RESCALE: log2 of the growth of p allowed before rescaling
ITEM_BITS = tl.constexpr(16)  # WORKLIST: an item is sequence << ITEM_BITS | block (kernels/worklist.py)
ITEM_MASK = tl.constexpr((1 << ITEM_BITS.value) - 1)
STAT_PAD = tl.constexpr(128)  # NLSE2 / Delta: each sequence's rows start aligned and are padded to this (>= any BLOCK_M)


@triton.jit
def _keep_mask(seed, bh, L, S, rows, cols, dropout_p):
    """Dropout keep-mask for the [rows x cols] tile of head bh (True = kept)."""
    offs = (tl.cast(bh, tl.int64) * L + tl.cast(rows, tl.int64)[:, None]) * S + tl.cast(cols, tl.int64)[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _mask_ptrs(base, rows, cols, stride_m, stride_n, MASK_KEYS: tl.constexpr):
    """Pointers to a [rows x cols] mask tile, or [1 x cols] when MASK_KEYS."""
    if MASK_KEYS:
        ptrs = base + tl.cast(cols, tl.int64)[None, :] * stride_n
    else:
        ptrs = base + tl.cast(rows, tl.int64)[:, None] * stride_m + tl.cast(cols, tl.int64)[None, :] * stride_n
    return ptrs


@triton.jit
def _mask_load(mask_ptrs, rows, cols, L, S, other, MASK_KEYS: tl.constexpr, COL_BOUND: tl.constexpr):
    """A [rows x cols] tile of the user's attn_mask as stored (``other`` out of bounds). MASK_KEYS:
    the mask does not vary over queries (a key-padding mask): ``mask_ptrs`` is [1, cols] and so is
    the tile, which broadcasts over the rows. COL_BOUND: the tile may reach past key S-1. Leave
    it off where the caller knows better: S is a runtime value, so a ``cols < S`` predicate splits
    the mask's contiguous rows into one-element loads (a row bound does not)."""
    if MASK_KEYS:
        inb = tl.full([1, cols.shape[0]], 1, tl.int1)
    else:
        inb = rows[:, None] < L
    if COL_BOUND:
        inb = inb & (cols[None, :] < S)
    return tl.load(mask_ptrs, mask=inb, other=other)


@triton.jit
def _band(rows, cols, causal_off, window_off, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[rows x cols] True where query ``rows[i]`` may see key ``cols[j]`` (the band only)."""
    ok = tl.full([rows.shape[0], cols.shape[0]], 1, tl.int1)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + causal_off)
    if WINDOW:
        ok = ok & (cols[None, :] >= rows[:, None] + window_off)
    return ok


@triton.jit
def _grid_cell(n_blocks, GRID_1D: tl.constexpr):
    """(block, head, blocks per head) of this program: a (n_blocks, B * H) grid, or with GRID_1D
    one axis of n_blocks * B * H programs numbered head by head, for B * H past CUDA's 65535 cap on
    y (decode at batch 4096 with 32 heads; 4096 packed sequences of 16 heads; the launcher picks).
    A constexpr, not a runtime test of the grid: with the runtime test in the prologue the D=64
    causal forward ran 22% slower on the H100 (210 / 303 / 350 against 272 / 379 / 419 TFLOP/s at
    S = 1k / 4k / 16k; docs/kernels.md, Tuning: the backward's program order and row statistics) with the
    same loop bodies."""
    if GRID_1D:
        pid = tl.program_id(0)
        blk = pid % n_blocks
        bh = pid // n_blocks
        n = n_blocks
    else:
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        n = tl.num_programs(0)
    return blk, bh, n


@triton.jit
def _work_item(WORK, i):
    """(sequence, block) of item ``i`` of a host-built work list (WORKLIST)."""
    item = tl.load(WORK + i)
    return item >> ITEM_BITS, item & ITEM_MASK


@triton.jit
def _block_slots(n_max, N_ITEMS, BLOCK: tl.constexpr, WORKLIST: tl.constexpr):
    """Programs per (sequence, head) group of one kind: every sequence's cdiv(n_max, BLOCK)
    block slots, or, with WORKLIST (B == 1), the N_ITEMS blocks of the host's list."""
    if WORKLIST:
        n = N_ITEMS
    else:
        n = tl.cdiv(n_max, BLOCK)
    return n


@triton.jit
def _seq(b, L, S, CU_Q, CU_K, SEQUSED_K, VARLEN: tl.constexpr, SEQUSED: tl.constexpr, PAGED: tl.constexpr):
    """(q_row0, k_row0, L_b, S_b): where sequence ``b`` starts in the packed tensors, and its
    lengths. Dense: (0, 0, L, S)."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        Lb = tl.load(CU_Q + b + 1) - q0
        if PAGED:
            k0 = 0
        else:
            k0 = tl.load(CU_K + b)
        if SEQUSED:
            Sb = tl.load(SEQUSED_K + b)
        else:
            Sb = tl.load(CU_K + b + 1) - k0
    else:
        q0 = 0
        k0 = 0
        Lb = L
        Sb = S
    return q0, k0, Lb, Sb


@triton.jit
def _listed_block(pos, edge_hi, block_list, list_step, full_list, full_step, SPARSE: tl.constexpr,
                  FULL_LIST: tl.constexpr):
    """The index of the block at position ``pos`` of the concatenation of the blocks ``block_list``
    lists (``list_step`` apart, SPARSE positions each) and, with FULL_LIST, those of ``full_list``
    from position ``edge_hi`` on (a masked index load from each list)."""
    if FULL_LIST:
        block = (tl.load(block_list + tl.cast(pos // SPARSE, tl.int64) * list_step, mask=pos < edge_hi, other=0)
                 + tl.load(full_list + tl.cast(tl.maximum(pos - edge_hi, 0) // SPARSE, tl.int64) * full_step,
                           mask=pos >= edge_hi, other=0))
    else:
        block = tl.load(block_list + tl.cast(pos // SPARSE, tl.int64) * list_step)
    return block


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr,
    start, end, m0, rows, offs_n, offs_d, bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p,
    stride_kn, stride_vn, stride_maskn, stride_kpage, stride_vpage, stride_kd, stride_vd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr, DROPOUT: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr,
    edge_lo=0, edge_hi=0, EDGES: tl.constexpr = False,
    fb=0, fh=0, score_ptrs=None, score_meta=None, mod_mask_ptrs=None, mask_meta=None,
    SCORE_MOD: tl.constexpr = None, MASK_MOD: tl.constexpr = None,
    block_list=None, list_step=0, SPARSE_BKV: tl.constexpr = 128, LISTED: tl.constexpr = False,
    full_list=None, full_step=0, FULL_LIST: tl.constexpr = False, BOUND_LAST: tl.constexpr = False,
):
    """Online softmax over key blocks [start, end). MASKED: apply the band and bounds masks.
    LISTED (flex): [start, end) are positions in the concatenation of the key blocks that
    ``block_list`` lists (``list_step`` apart, each SPARSE_BKV keys): each step finds its keys
    through the list, so one loop, and one software pipeline, runs across every listed block
    (a loop per block would run 1 or 2 steps, too few to pipeline). FULL_LIST (flex, with LISTED
    and not MASKED): the blocks of ``full_list`` (``full_step`` apart) follow those of
    ``block_list`` in the same loop, from position ``edge_hi`` on; MASK_MOD applies before it
    only, and the bounds mask only to a block that reaches past S, each under a branch, so one
    pipeline runs across a BlockMask's partial and full blocks alike.
    SCORE_MOD / MASK_MOD (flex, ``_flex_lists``): generated hooks called on the natural-unit score
    and the clamped indices of batch ``fb`` and query head ``fh`` (docs/flex.md); None: absent.
    EDGES (loads that need no bounds masks: TMA or EVEN): only the blocks outside [edge_lo, edge_hi)
    apply them, under a branch, so one loop runs a band's edge blocks and its inner ones.
    PAGED: gather each block's rows through the block table instead of striding. USE_TMA:
    ``k_ptrs`` / ``v_ptrs`` are the head's [S, HEAD_DIM] tensor descriptors (the copy engine
    zero-fills rows past S and columns past HEAD_DIM); MASK_TMA: ``mask_ptrs`` is the mask's [L, S]
    descriptor (a float mask with rows), read at (m0, start_n). BOUND_LAST (flex, LISTED, USE_TMA,
    not MASKED): a step whose keys reach past S (the ragged end's block, last in its list) drops
    them under a branch, after SCORE_MOD (TMA zero-fills their K and V); the loop takes the guarded
    softmax update, since a listed block may lie wholly past S and a row may have seen nothing."""
    tl.static_assert(not BOUND_LAST or (LISTED and USE_TMA and not MASKED), "BOUND_LAST: listed TMA blocks")
    d_ok = offs_d < HEAD_DIM
    if not USE_TMA and not LISTED:
        k_ptrs += tl.cast(start, tl.int64) * stride_kn
        v_ptrs += tl.cast(start, tl.int64) * stride_vn
    if HAS_MASK and not MASK_TMA:
        mask_ptrs += tl.cast(start, tl.int64) * stride_maskn
    for start_n in range(start, end, BLOCK_N):
        if LISTED:  # FULL_LIST: partial blocks before edge_hi, full ones from it
            block = _listed_block(start_n, edge_hi, block_list, list_step, full_list, full_step, SPARSE_BKV, FULL_LIST)
            if FULL_LIST:
                part = start_n < edge_hi
            key0 = block * SPARSE_BKV + start_n % SPARSE_BKV
            cols = key0 + offs_n
            if not USE_TMA:
                k_ptrs = k_head + tl.cast(cols, tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd
                v_ptrs = v_head + tl.cast(cols, tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd
        else:
            key0 = start_n
            cols = start_n + offs_n
        if PAGED:
            page = tl.load(table_ptr + cols // PAGE_SIZE, mask=cols < S, other=0)
            slot = tl.cast(page, tl.int64) * stride_kpage + tl.cast(cols % PAGE_SIZE, tl.int64) * stride_kn
            k_ptrs = k_head + slot[None, :] + offs_d[:, None] * stride_kd
            slot_v = tl.cast(page, tl.int64) * stride_vpage + tl.cast(cols % PAGE_SIZE, tl.int64) * stride_vn
            v_ptrs = v_head + slot_v[:, None] + offs_d[None, :] * stride_vd
        if USE_TMA:
            k = tl.trans(k_ptrs.load([key0, 0]))  # [BLOCK_D, BLOCK_N]
        elif MASKED or FULL_LIST:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & (cols[None, :] < S), other=0.0)  # [BLOCK_D, BLOCK_N]
        elif HEAD_DIM != BLOCK_D:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if MASK_TMA:
            bias = mask_ptrs.load([m0, start_n]).to(tl.float32)
        elif HAS_MASK and MASK_BOOL:  # issued before the dot, so its latency hides behind the MMA
            keep = _mask_load(mask_ptrs, rows, cols, L, S, 0, MASK_KEYS, MASKED).to(tl.int1)
        elif HAS_MASK:
            bias = _mask_load(mask_ptrs, rows, cols, L, S, 0.0, MASK_KEYS, MASKED).to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if MASKED or HAS_MASK or EDGES or FULL_LIST or BOUND_LAST or SCORE_MOD is not None or MASK_MOD is not None:
            # s * to_log2 is the log2-domain score: a float mask adds in natural units (one FMA),
            # a bool mask or the band selects -inf, and the scale goes into exp2's FMA with the
            # row max (as below; the launcher makes the scale positive). One op per score fewer
            # than scaling first: the float-bias loop went from 493 to 465 instructions (sm_90).
            if HAS_MASK and not MASK_BOOL:
                s = qk * (qk_scale * LN2) + bias
                to_log2 = RCP_LN2
            elif SCORE_MOD is not None:  # hooks see in-range indices; the bounds mask below drops the rest
                q_c = tl.minimum(rows, L - 1)[:, None]
                kv_c = tl.minimum(cols, S - 1)[None, :]
                s = SCORE_MOD(qk * (qk_scale * LN2), fb, fh, q_c, kv_c, score_ptrs, score_meta)
                s = tl.broadcast_to(s, qk.shape)
                to_log2 = RCP_LN2
            else:
                s = qk
                to_log2 = qk_scale
                if HAS_MASK:
                    s = tl.where(keep, s, float("-inf"))
            if MASK_MOD is not None and FULL_LIST:  # the partial blocks (before edge_hi) only
                if part:
                    keep_mod = MASK_MOD(fb, fh, tl.minimum(rows, L - 1)[:, None], tl.minimum(cols, S - 1)[None, :],
                                        mod_mask_ptrs, mask_meta)
                    s = tl.where(keep_mod, s, float("-inf"))
            elif MASK_MOD is not None:  # partial blocks only (full ones pass None)
                keep_mod = MASK_MOD(fb, fh, tl.minimum(rows, L - 1)[:, None], tl.minimum(cols, S - 1)[None, :],
                                    mod_mask_ptrs, mask_meta)
                s = tl.where(keep_mod, s, float("-inf"))
            if FULL_LIST or BOUND_LAST:
                if key0 + BLOCK_N > S:  # the one block that reaches past S (a ragged end)
                    s = tl.where(cols[None, :] < S, s, float("-inf"))
            if MASKED:
                ok = (cols[None, :] < S) & _band(rows, cols, causal_off, window_off, CAUSAL, WINDOW)
                s = tl.where(ok, s, float("-inf"))
            elif EDGES:
                if (start_n < edge_lo) | (start_n >= edge_hi):
                    ok = (cols[None, :] < S) & _band(rows, cols, causal_off, window_off, CAUSAL, WINDOW)
                    s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * to_log2)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.math.exp2(s * to_log2 - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        elif LAZY_RESCALE:
            # Keep the running max (and skip rescaling acc) until some row's max grows by more
            # than RESCALE_SLACK: p then stays <= 2^RESCALE_SLACK, exact in fp32 and bf16's range.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if tl.max(m_new - m_i, 0) > RESCALE_SLACK:
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            m_new = m_i
            p = tl.math.exp2(qk * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
        else:
            # Scale after the row max: one FMA per score instead of a multiply and a subtract.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep_mask(seed, bh, L, S, rows, cols, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        if USE_TMA:
            v = v_ptrs.load([key0, 0])
        elif MASKED or FULL_LIST:
            v = tl.load(v_ptrs, mask=(cols[:, None] < S) & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        elif HEAD_DIM != BLOCK_D:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        if not PAGED and not USE_TMA and not LISTED:
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK and not MASK_TMA:
            mask_ptrs += BLOCK_N * stride_maskn
    return acc, l_i, m_i


@triton.jit
def key_blocks(m0, k_lo, k_hi, causal_off, window_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(lo, a, b, hi) for query rows [m0, m0+BLOCK_M) over keys [k_lo, k_hi) (dense: [0, S)):
    keys outside [lo, hi) are invisible to every row; [a, b) are whole blocks that every row
    sees in full (no band or bounds mask); [lo, a) and [b, hi) straddle a band edge or the
    ragged end. lo, a, b are multiples of BLOCK_N."""
    s_full = (k_hi // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(k_hi, tl.maximum(m0 + BLOCK_M + causal_off, 0))
        b = tl.minimum((tl.maximum(m0 + causal_off + 1, 0) // BLOCK_N) * BLOCK_N, s_full)
    else:
        hi = k_hi
        b = s_full
    lo = (k_lo // BLOCK_N) * BLOCK_N
    if WINDOW:
        lo = tl.maximum(lo, (tl.minimum(tl.maximum(m0 + window_off, 0), k_hi) // BLOCK_N) * BLOCK_N)
        a = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + window_off, 0), BLOCK_N) * BLOCK_N
    else:
        a = lo
    hi = tl.maximum(hi, lo)
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = tl.minimum(tl.maximum(b, a), hi)
    return lo, a, b, hi


@triton.jit
def _key_range(KEY_EXT, b, h, S, stride_extb, stride_exth, KEY_RANGE: tl.constexpr):
    """(k_lo, k_hi, run): [k_lo, k_hi) holds the keys of (b, h) that a bool key-padding mask keeps,
    from its first to its last True (KEY_RANGE; ``key_range_kernel`` computes them), and ``run``
    is True when it keeps every key in between: the mask is then that range and nothing more, so
    the loops read it only on the range's edge blocks. Blocks outside are never visited. Without
    KEY_RANGE: [0, S), not a run (there is no key mask to skip)."""
    if KEY_RANGE:
        ext = KEY_EXT + tl.cast(b, tl.int64) * stride_extb + tl.cast(h, tl.int64) * stride_exth
        k_lo = tl.load(ext)
        k_hi = tl.load(ext + 1)
        run = tl.load(ext + 2) != 0
    else:
        k_lo = 0
        k_hi = S
        run = False
    return k_lo, k_hi, run


@triton.jit
def _run_split(a, c, k_lo, run, BLOCK: tl.constexpr):
    """(a_in, c_run) splitting the unmasked key blocks [a, c) of a key-padding mask (KEY_RANGE).
    When the mask keeps one run of keys from k_lo on, it is that span and nothing more: the
    mask is read only on the block that k_lo cuts ([a, a_in)), and the whole blocks inside
    ([a_in, c_run)) take the maskless loop. Otherwise both ranges are empty and [c_run, c) =
    [a, c) reads the mask. The callers run the three ranges as loops in a row, not under a
    branch: branches keep every loop's pipeline buffers live at once (forward shared memory
    131 -> 229 KiB, sm_90)."""
    a_in = tl.where(run, tl.minimum(tl.maximum(a, tl.cdiv(k_lo, BLOCK) * BLOCK), c), a)
    c_run = tl.where(run, c, a_in)
    return a_in, c_run


@triton.jit
def query_blocks(n0, L, causal_off, window_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(lo, a, b, hi) for key block [n0, n0+BLOCK_N), the transpose of ``key_blocks``: query
    rows outside [lo, hi) see none of its keys, blocks in [a, b) see all of them."""
    if CAUSAL:
        lo = (tl.maximum(n0 - causal_off, 0) // BLOCK_M) * BLOCK_M
        a = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        a = 0
    if WINDOW:
        hi = tl.minimum(L, tl.maximum(n0 + BLOCK_N - window_off, 0))
        b = (tl.maximum(n0 - window_off + 1, 0) // BLOCK_M) * BLOCK_M
    else:
        hi = L
        b = L
    # Round the end up to a whole block (the loops run cdiv(end - start, BLOCK_M) blocks either
    # way), so every bound is a multiple of BLOCK_M that the compiler can see: the rows' NLSE2 /
    # Delta loads then vectorize even when L is read from memory (varlen).
    hi = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    b = tl.cdiv(b, BLOCK_M) * BLOCK_M
    lo = tl.minimum(lo, hi)
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = tl.minimum(tl.maximum(b, a), hi)
    return lo, a, b, hi


@triton.jit
def _flex_meta(SCORE_META, MASK_META, SCORE_MOD: tl.constexpr, LOAD_SCORE_META: tl.constexpr,
               MASK_MOD: tl.constexpr, LOAD_MASK_META: tl.constexpr):
    """The generated hooks' ``meta`` tuples (captures' strides, scalar slots), read once per
    program; 0 where there is no such mod."""
    if SCORE_MOD is not None:
        score_meta = LOAD_SCORE_META(SCORE_META)
    else:
        score_meta = 0
    if MASK_MOD is not None:
        mask_meta = LOAD_MASK_META(MASK_META)
    else:
        mask_meta = 0
    return score_meta, mask_meta


@triton.jit
def _list_row(ST, b, h, blk):
    """Where row ``blk`` of (batch b, query head h) starts in a BlockMask's pair of lists (partial
    blocks: counts, indices; full blocks: counts, indices), from their 14 int32 strides at ST (0
    where b / h broadcast): (num, idx, step, full num, full idx, full step), int64 offsets."""
    blk64 = tl.cast(blk, tl.int64)
    b64 = tl.cast(b, tl.int64)
    h64 = tl.cast(h, tl.int64)
    num = b64 * tl.load(ST) + h64 * tl.load(ST + 1) + blk64 * tl.load(ST + 2)
    idx = b64 * tl.load(ST + 3) + h64 * tl.load(ST + 4) + blk64 * tl.load(ST + 5)
    step = tl.cast(tl.load(ST + 6), tl.int64)
    fnum = b64 * tl.load(ST + 7) + h64 * tl.load(ST + 8) + blk64 * tl.load(ST + 9)
    fidx = b64 * tl.load(ST + 10) + h64 * tl.load(ST + 11) + blk64 * tl.load(ST + 12)
    fstep = tl.cast(tl.load(ST + 13), tl.int64)
    return num, idx, step, fnum, fidx, fstep


@triton.jit
def _flex_lists(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, k_head, v_head, table_ptr, m0, rows, offs_n, offs_d, b, h, bh, L, S, qk_scale,
    stride_kn, stride_vn, stride_kb, stride_vb, stride_kd, stride_vd, FLEX_LISTS, SCORE_PTRS, score_meta, MASK_PTRS,
    mask_meta, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SPARSE_BQ: tl.constexpr, SPARSE_BKV: tl.constexpr,
    USE_TMA: tl.constexpr, ONE_LOOP: tl.constexpr, RAGGED_IN_FULL: tl.constexpr = False,
):
    """Flex's block-sparse iteration (FLEX): the key blocks a BlockMask lists for this program's
    query block ``m0 // SPARSE_BQ`` of (b, query head h), each as SPARSE_BKV / BLOCK_N steps of
    ``_fwd_inner``. FLEX_LISTS = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    their 14 int32 strides, max_scores): partial blocks apply MASK_MOD and the bounds mask; full
    blocks no mask work at all, except the one full block that reaches past S (it is the last
    listed: indices ascend), which takes the bounds mask only. Broadcast lists have stride 0.
    ONE_LOOP: the partial and full blocks in one loop, their masks under per-block branches
    (``_fwd_inner``'s FULL_LIST), instead of three loops (partial, full, the ragged full block),
    each of which holds its own pipeline buffers and pays its own fill and drain. RAGGED_IN_FULL
    (with USE_TMA, not ONE_LOOP): two loops, the ragged full block in the full blocks' loop under
    ``_fwd_inner``'s BOUND_LAST branch, so the kernel holds one loop body fewer (a shorter compile).
    USE_TMA: K and V tiles through the head's tensor descriptors (``k_ptrs`` / ``v_ptrs``), at each
    listed key."""
    KV_NUM = FLEX_LISTS[0]
    KV_IDX = FLEX_LISTS[1]
    FULL_NUM = FLEX_LISTS[2]
    FULL_IDX = FLEX_LISTS[3]
    num, idx, step, fnum, fidx, fstep = _list_row(FLEX_LISTS[4], b, h, m0 // SPARSE_BQ)
    n_part = tl.load(KV_NUM + num)
    n_full = tl.load(FULL_NUM + fnum)
    if ONE_LOOP:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, k_head, v_head, table_ptr, 0, (n_part + n_full) * SPARSE_BKV,
            m0, rows, offs_n, offs_d, bh, L, S, qk_scale, 0, 0, 0, 0.0, stride_kn, stride_vn, 0, stride_kb, stride_vb,
            stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, False, False, False, False, False, False, False, 16, False, DOT_PRECISION, USE_TMA, False,
            0, n_part * SPARSE_BKV, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_MOD, MASK_MOD,
            KV_IDX + idx, step, SPARSE_BKV, True, FULL_IDX + fidx, fstep, True,
        )
    else:
        acc, l_i, m_i = _fwd_inner(  # the partial blocks, one loop across them: mask_mod and the bounds mask
            acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, k_head, v_head, table_ptr, 0, n_part * SPARSE_BKV,
            m0, rows, offs_n, offs_d, bh, L, S, qk_scale, 0, 0, 0, 0.0, stride_kn, stride_vn, 0, stride_kb, stride_vb,
            stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, False, False, False, False, False, False, False, 16, False, DOT_PRECISION, USE_TMA, False,
            0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_MOD, MASK_MOD,
            KV_IDX + idx, step, SPARSE_BKV, True,
        )
    if RAGGED_IN_FULL and USE_TMA and not ONE_LOOP:
        acc, l_i, m_i = _fwd_inner(  # every full block, the ragged one's keys past S dropped: no mask_mod
            acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, k_head, v_head, table_ptr, 0, n_full * SPARSE_BKV,
            m0, rows, offs_n, offs_d, bh, L, S, qk_scale, 0, 0, 0, 0.0, stride_kn, stride_vn, 0, stride_kb, stride_vb,
            stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, False, False, False, False, False, False, False, 16, False, DOT_PRECISION, USE_TMA, False,
            0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_MOD, None,
            FULL_IDX + fidx, fstep, SPARSE_BKV, True, BOUND_LAST=True,
        )
    elif not ONE_LOOP:
        last = tl.load(FULL_IDX + fidx + tl.maximum(n_full - 1, 0) * fstep)
        ragged = (n_full > 0) & ((last + 1) * SPARSE_BKV > S)
        acc, l_i, m_i = _fwd_inner(  # the full blocks inside [0, S), one loop: no mask work at all
            acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, k_head, v_head, table_ptr, 0,
            (n_full - ragged.to(tl.int32)) * SPARSE_BKV,
            m0, rows, offs_n, offs_d, bh, L, S, qk_scale, 0, 0, 0, 0.0, stride_kn, stride_vn, 0, stride_kb, stride_vb,
            stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, False, False, False, False, False, False, False, 16, False, DOT_PRECISION, USE_TMA, False,
            0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_MOD, None,
            FULL_IDX + fidx, fstep, SPARSE_BKV, True,
        )
        # the ragged full block: bounds mask, no mask_mod (an empty range when there is none)
        r_lo = tl.where(ragged, last * SPARSE_BKV, 0)
        r_hi = tl.where(ragged, S, 0)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, k_head, v_head, table_ptr, r_lo, r_hi,
            m0, rows, offs_n, offs_d, bh, L, S, qk_scale, 0, 0, 0, 0.0, stride_kn, stride_vn, 0, stride_kb, stride_vb,
            stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, False, False, False, False, False, False, False, 16, False, DOT_PRECISION, USE_TMA, False,
            0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_MOD, None,
        )
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, Out, LSE, MASK, CU_Q, CU_K, SEQUSED_K, TABLE, KEY_EXT, WORK,
    FLEX_LISTS, SCORE_PTRS, SCORE_META, MASK_PTRS, MASK_META,  # flex only (FLEX); None otherwise
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_lseb, stride_lseh, stride_tableb, stride_extb, stride_exth,
    H, G, L_max, S_max, qk_scale, diag, win_right, win_left, dropout_p, seed,
    L_BUCKET, SEQ_BUCKET,  # unused by the code: autotuner keys, so decode/prefill and short/long tune apart
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr,
    KEY_RANGE: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, SEQUSED: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, LAZY_RESCALE: tl.constexpr, EVEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WORKLIST: tl.constexpr = False, USE_TMA: tl.constexpr = False, MASK_TMA: tl.constexpr = False,
    GRID_1D: tl.constexpr = False, ONE_LOOP: tl.constexpr = False,
    FLEX: tl.constexpr = False, SCORE_MOD: tl.constexpr = None, LOAD_SCORE_META: tl.constexpr = None,
    MASK_MOD: tl.constexpr = None, LOAD_MASK_META: tl.constexpr = None, SPARSE_BQ: tl.constexpr = 128,
    SPARSE_BKV: tl.constexpr = 128, MAX_SCORES: tl.constexpr = False, FLEX_RAGGED_IN_FULL: tl.constexpr = False,
):
    """Grid: (cdiv(L, BLOCK_M), B * Hq), or with GRID_1D (cdiv(L, BLOCK_M) * B * Hq,), past CUDA's
    cap on y (``_grid_cell``): one program per query block of one head. Writes Out and LSE (fp32,
    natural log).
    WORKLIST (packed only): grid (items * Hq,) instead (one axis); WORK[i] = sequence << 16 | query block
    (``_work_item``), the host's list of the blocks that exist, heaviest first
    (``launch._work_list``), so no program is spent on a shorter sequence's missing blocks and the
    longest work starts first.
    PAGED: stride_kb / stride_vb are the pool's page strides. KEY_RANGE: see ``_key_range``.
    USE_TMA (not PAGED): K and V tiles through per-head tensor descriptors instead of pointer
    loads; MASK_TMA: the tiles of a float mask with rows too (``KernelOptions.fwd_tma``).
    EVEN: L and S are multiples of every block size and HEAD_DIM == BLOCK_D (dense only): no
    bounds masks, and no ragged-tail loop unless a band or key range has an edge to mask (the D=128
    non-causal sm_90 build drops from 220 to 170 registers, ptxas -v).
    ONE_LOOP: a band's edge blocks run in its inner loop, masked under a branch, instead of one
    loop per edge (each loop pays a pipeline fill and drain; a window's edges are one block
    each), where the loads need no bounds masks (TMA or EVEN) and there is no attn_mask or key
    range (their tiles have bounds of their own). That loop never rescales lazily.
    FLEX (dense, no band, mask, dropout or lazy rescaling; launch.flex_forward): the key blocks of
    a BlockMask's lists (``_flex_lists``), with the generated SCORE_MOD / MASK_MOD hooks reading
    their captures through SCORE_PTRS / MASK_PTRS and their META tensors (docs/flex.md); BLOCK_M
    divides SPARSE_BQ and BLOCK_N divides SPARSE_BKV. MAX_SCORES: also write each row's max
    score (natural units) to FLEX_LISTS[5], laid out as LSE. FLEX_RAGGED_IN_FULL: ``_flex_lists``'
    two-loop form (with USE_TMA).
    SCORE_MOD without FLEX (launch.flex_forward over a band, or launch.varlen_forward's score; no
    mask, dropout or key range): the band's own loops (CAUSAL / WINDOW, edges masked by arithmetic)
    with the score hook applied in every block, for flex calls whose mask_mod is that band
    (_flex/band.py) and varlen calls with a score_mod (VARLEN: b the sequence, the indices its own)."""
    one_loop: tl.constexpr = ONE_LOOP and (CAUSAL or WINDOW) and not (HAS_MASK or KEY_RANGE or PAGED or FLEX) and (USE_TMA or EVEN)
    if WORKLIST:
        n_m = tl.num_programs(0) // H
    else:
        n_m = tl.cdiv(L_max, BLOCK_M)
    pid_m, bh, n_m = _grid_cell(n_m, GRID_1D or WORKLIST)
    if (CAUSAL or FLEX) and not WORKLIST:  # the last query block sees the most keys (causal-like masks): first
        pid_m = n_m - 1 - pid_m
    b = bh // H
    h = bh % H
    if WORKLIST:
        b, pid_m = _work_item(WORK, pid_m)
        bh = b * H + h
    hk = h // G
    q0, k0, L, S = _seq(b, L_max, S_max, CU_Q, CU_K, SEQUSED_K, VARLEN, SEQUSED, PAGED)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= L:  # a shorter sequence than the longest: nothing to do
            return
        bt = 0  # packed (1, H, T, D) views: the sequence is a row offset, not a batch index
    else:
        bt = b
    causal_off = diag * (S - L) + win_right
    window_off = diag * (S - L) - win_left
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < L

    q_ptrs = (Q + tl.cast(bt, tl.int64) * stride_qb + tl.cast(h, tl.int64) * stride_qh
              + tl.cast(q0 + rows, tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    if EVEN:
        q = tl.load(q_ptrs)  # [BLOCK_M, BLOCK_D]
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGED:
        k_head = K + tl.cast(hk, tl.int64) * stride_kh
        v_head = V + tl.cast(hk, tl.int64) * stride_vh
    else:
        k_head = K + tl.cast(bt, tl.int64) * stride_kb + tl.cast(hk, tl.int64) * stride_kh + tl.cast(k0, tl.int64) * stride_kn
        v_head = V + tl.cast(bt, tl.int64) * stride_vb + tl.cast(hk, tl.int64) * stride_vh + tl.cast(k0, tl.int64) * stride_vn
    if USE_TMA:
        k_ptrs, v_ptrs = _tile_sources(k_head, v_head, S, stride_kn, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    else:
        k_ptrs = k_head + tl.cast(offs_n, tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
        v_ptrs = v_head + tl.cast(offs_n, tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    table_ptr = TABLE + tl.cast(b, tl.int64) * stride_tableb
    mask_ptrs = MASK
    if HAS_MASK:
        mask_base = MASK + tl.cast(b, tl.int64) * stride_maskb + tl.cast(h, tl.int64) * stride_maskh
        if MASK_TMA:
            mask_ptrs = tl.make_tensor_descriptor(mask_base, [L, S], [stride_maskm, 1], [BLOCK_M, BLOCK_N])
        else:
            mask_ptrs = _mask_ptrs(mask_base, rows, offs_n, stride_maskm, stride_maskn, MASK_KEYS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_lo, k_hi, run = _key_range(KEY_EXT, b, h, S, stride_extb, stride_exth, KEY_RANGE)
    lo, a, c, hi = key_blocks(m0, k_lo, k_hi, causal_off, window_off, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    score_meta, mask_meta = _flex_meta(SCORE_META, MASK_META, SCORE_MOD, LOAD_SCORE_META, MASK_MOD, LOAD_MASK_META)
    if one_loop:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr, lo, hi, m0, rows, offs_n, offs_d,
            bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_vn, stride_maskn,
            stride_kb, stride_vb, stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, PAGED, PAGE_SIZE, LAZY_RESCALE, DOT_PRECISION,
            USE_TMA, MASK_TMA, a, c, True, fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, SCORE_MOD=SCORE_MOD,
        )
    if WINDOW and not one_loop:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr, lo, a, m0, rows, offs_n, offs_d,
            bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_vn, stride_maskn,
            stride_kb, stride_vb, stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, PAGED, PAGE_SIZE, LAZY_RESCALE, DOT_PRECISION,
            USE_TMA, MASK_TMA, fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, SCORE_MOD=SCORE_MOD,
        )
    if KEY_RANGE:  # a run of kept keys reads the mask on the block k_lo cuts only (_run_split)
        a_in, c_run = _run_split(a, c, k_lo, run, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr, a, a_in, m0, rows, offs_n, offs_d,
            bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_vn, stride_maskn,
            stride_kb, stride_vb, stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, PAGED, PAGE_SIZE, LAZY_RESCALE, DOT_PRECISION,
            USE_TMA, MASK_TMA,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr, a_in, c_run, m0, rows, offs_n, offs_d,
            bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_vn, stride_maskn,
            stride_kb, stride_vb, stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, CAUSAL, WINDOW, False, MASK_BOOL, MASK_KEYS, DROPOUT, PAGED, PAGE_SIZE, LAZY_RESCALE, DOT_PRECISION,
            USE_TMA, False,
        )
        a = c_run
    if FLEX:
        acc, l_i, m_i = _flex_lists(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, k_head, v_head, table_ptr, m0, rows, offs_n, offs_d, b, h, bh, L, S,
            qk_scale, stride_kn, stride_vn, stride_kb, stride_vb, stride_kd, stride_vd, FLEX_LISTS, SCORE_PTRS,
            score_meta, MASK_PTRS, mask_meta, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, SCORE_MOD, MASK_MOD,
            SPARSE_BQ, SPARSE_BKV, USE_TMA, ONE_LOOP, FLEX_RAGGED_IN_FULL,
        )
    if not one_loop and not FLEX:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr, a, c, m0, rows, offs_n, offs_d,
            bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_vn, stride_maskn,
            stride_kb, stride_vb, stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, PAGED, PAGE_SIZE, LAZY_RESCALE, DOT_PRECISION,
            USE_TMA, MASK_TMA, fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, SCORE_MOD=SCORE_MOD,
        )
    if (CAUSAL or KEY_RANGE or not EVEN) and not one_loop and not FLEX:  # else c == hi: no diagonal, no ragged tail
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, k_head, v_head, table_ptr, c, hi, m0, rows, offs_n, offs_d,
            bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_vn, stride_maskn,
            stride_kb, stride_vb, stride_kd, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N,
            True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, PAGED, PAGE_SIZE, LAZY_RESCALE, DOT_PRECISION,
            USE_TMA, MASK_TMA, fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, SCORE_MOD=SCORE_MOD,
        )
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = (Out + tl.cast(bt, tl.int64) * stride_ob + tl.cast(h, tl.int64) * stride_oh
              + tl.cast(q0 + rows, tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od)
    lse_ptrs = LSE + tl.cast(bt, tl.int64) * stride_lseb + tl.cast(h, tl.int64) * stride_lseh + q0 + rows
    if EVEN:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        tl.store(lse_ptrs, lse)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptrs, lse, mask=row_ok)
    if MAX_SCORES:  # m_i is the row max of s * to_log2 (exact: FLEX never rescales lazily)
        mx_ptrs = (FLEX_LISTS[5] + tl.cast(bt, tl.int64) * stride_lseb + tl.cast(h, tl.int64) * stride_lseh
                   + q0 + rows)
        tl.store(mx_ptrs, m_i * LN2, mask=row_ok)


@triton.jit
def key_range_kernel(MASK, EXT, stride_mb, stride_mh, stride_mn, Hm, S, BLOCK: tl.constexpr):
    """EXT[b, h] = (first kept key, last kept key + 1, 1 if it keeps every key in between else 0)
    of a bool key-padding mask row, or (0, 0, 0) when it keeps nothing; the ``KEY_RANGE`` input of
    attn_fwd / attn_bwd (``_key_range``). Grid: (Bm * Hm,)."""
    pid = tl.program_id(0)
    base = MASK + tl.cast(pid // Hm, tl.int64) * stride_mb + tl.cast(pid % Hm, tl.int64) * stride_mh
    lo = S
    hi = 0
    kept = 0
    for start in range(0, S, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        keep = tl.load(base + tl.cast(cols, tl.int64) * stride_mn, mask=cols < S, other=0).to(tl.int1)
        lo = tl.minimum(lo, tl.min(tl.where(keep, cols, S), 0))
        hi = tl.maximum(hi, tl.max(tl.where(keep, cols + 1, 0), 0))
        kept += tl.sum(keep.to(tl.int32), 0)
    lo = tl.minimum(lo, hi)
    tl.store(EXT + 4 * pid, lo)
    tl.store(EXT + 4 * pid + 1, hi)
    tl.store(EXT + 4 * pid + 2, ((kept == hi - lo) & (hi > lo)).to(tl.int32))


@triton.jit
def _stat_row0(q0, b, VARLEN: tl.constexpr):
    """Where sequence ``b``'s rows start in the backward's NLSE2 / Delta buffers: 0 when dense;
    packed, ``(q0 // STAT_PAD + b) * STAT_PAD`` for a sequence whose first packed row is ``q0``.
    Each sequence then owns at least cdiv(L_b, STAT_PAD) * STAT_PAD aligned rows (the next one
    starts past them), a head needs T + STAT_PAD * n rows, and ``attn_bwd_preprocess`` fills the
    padding rows with -inf / 0, so the backward reads whole blocks of them with no bounds mask.
    Packed rows at their own offsets were one element per load (unknown alignment and a length
    read from memory): 16 more ``cp.async`` and 24 more selects per dK/dV iteration (sm_90 PTX)."""
    if VARLEN:
        r = (q0 // STAT_PAD + b) * STAT_PAD
    else:
        r = 0
    return r


@triton.jit
def attn_bwd_preprocess(
    Out, DO, LSE, DLSE, NLSE2, Delta, CU_Q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lseb, stride_lseh, stride_statb, stride_stath,
    H, L_max,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr, GRID_1D: tl.constexpr = False,
):
    """The backward's per-row statistics, from the forward's LSE and Out and the incoming dO:
    Delta = sum_d O * dO (minus dLSE when the lse has a gradient: d lse / d s = p), and
    NLSE2 = minus the lse in the log2 domain, -inf for a row that saw no key (its probabilities are
    then 0): the backward adds it to each score in the score's own FMA.
    Both fp32, at ``b * stride_statb + h * stride_stath + _stat_row0 + i``, for every i below L
    rounded up to BLOCK_M (== STAT_PAD): rows past L get NLSE2 = -inf and Delta = 0, so their
    probabilities and dS are 0. Grid: (cdiv(L_max, BLOCK_M), B * H) or, GRID_1D, their product
    (``_grid_cell``), B the
    number of sequences when VARLEN (packed (1, H, T, D) views)."""
    tl.static_assert(BLOCK_M == STAT_PAD)
    pid_m, bh, _n = _grid_cell(tl.cdiv(L_max, BLOCK_M), GRID_1D)
    b = bh // H
    h = bh % H
    q0, _k0, L, _S = _seq(b, L_max, L_max, CU_Q, CU_Q, CU_Q, VARLEN, False, False)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= L:
            return
        bt = 0
    else:
        bt = b
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_rows = tl.cast(q0 + rows, tl.int64)
    o = tl.load(Out + tl.cast(bt, tl.int64) * stride_ob + tl.cast(h, tl.int64) * stride_oh
                + q_rows[:, None] * stride_om + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + tl.cast(bt, tl.int64) * stride_dob + tl.cast(h, tl.int64) * stride_doh
                 + q_rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_off = tl.cast(bt, tl.int64) * stride_lseb + tl.cast(h, tl.int64) * stride_lseh + q_rows
    lse = tl.load(LSE + lse_off, mask=row_ok, other=float("-inf"))
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_off, mask=row_ok, other=0.0)
    nlse2 = tl.where(lse == float("-inf"), float("-inf"), -lse * RCP_LN2)
    stat = (tl.cast(bt, tl.int64) * stride_statb + tl.cast(h, tl.int64) * stride_stath
            + _stat_row0(q0, b, VARLEN) + rows)
    tl.store(Delta + stat, delta)
    tl.store(NLSE2 + stat, nlse2)


@triton.jit
def _scores2(a, b, nlse2, L, S, rows, cols, qk_scale, causal_off, window_off, mask_ptrs,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
             MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr, COL_BOUND: tl.constexpr, DOT_PRECISION: tl.constexpr,
             KEYS_FIRST: tl.constexpr, edge=False, EDGES: tl.constexpr = False):
    """Log2-domain scores of a tile, masked, plus each query row's ``nlse2`` (minus its log2 LSE,
    -inf for a row that sees no key): exp2 of the result is P. KEYS_FIRST: a = k [BN, D], b = q
    [BM, D] and the tile is [BN, BM] (dK/dV side); else a = q, b = k and it is [BM, BN] (dQ side).
    COL_BOUND: the mask tile may reach past key S-1 (``_mask_load``). EDGES: the band applies where
    ``edge`` (a runtime flag of the tile: one loop runs a band's edge and inner tiles). The row
    term goes into the mask's (a float mask: bias / ln 2 + nlse2 in one FMA; a bool one: nlse2 or -inf), so the
    score itself is one FMA: the float-bias dK/dV loop went from 578 to 546 instructions (sm_90)."""
    if KEYS_FIRST:
        shift = nlse2[None, :]
    else:
        shift = nlse2[:, None]
    if HAS_MASK:  # issued before the dot, so its latency hides behind the MMA
        if MASK_BOOL:
            keep = _mask_load(mask_ptrs, rows, cols, L, S, 0, MASK_KEYS, COL_BOUND).to(tl.int1)
            if KEYS_FIRST:
                keep = tl.trans(keep)
            shift = tl.where(keep, shift, float("-inf"))
        else:
            bias = _mask_load(mask_ptrs, rows, cols, L, S, 0.0, MASK_KEYS, COL_BOUND).to(tl.float32)
            if KEYS_FIRST:
                bias = tl.trans(bias)
            shift = bias * RCP_LN2 + shift
    s2 = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION) * qk_scale + shift
    if MASKED and (CAUSAL or WINDOW):
        s2 = _band_select(s2, rows, cols, causal_off, window_off, CAUSAL, WINDOW, KEYS_FIRST)
    elif EDGES:
        if edge:
            s2 = _band_select(s2, rows, cols, causal_off, window_off, CAUSAL, WINDOW, KEYS_FIRST)
    return s2


@triton.jit
def _band_select(s2, rows, cols, causal_off, window_off, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 KEYS_FIRST: tl.constexpr):
    """``s2`` with -inf outside the band ([BN, BM] when KEYS_FIRST, else [BM, BN])."""
    if KEYS_FIRST:
        s2 = tl.where(tl.trans(_band(rows, cols, causal_off, window_off, CAUSAL, WINDOW)), s2, float("-inf"))
    else:
        s2 = tl.where(_band(rows, cols, causal_off, window_off, CAUSAL, WINDOW), s2, float("-inf"))
    return s2


@triton.jit
def _flex_scores2(a, b, nlse2, L, S, rows, cols, qk_scale, fb, fh, score_ptrs, score_meta, mask_ptrs, mask_meta,
                  SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, BOUND: tl.constexpr, KEYS_FIRST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, use_mask=True, use_bound=True):
    """A backward tile's scores in flex mode: ``(s2, s, q_c, kv_c)``. ``s2``: the modded score in
    the log2 domain plus each row's ``nlse2``, -inf where MASK_MOD drops a position (partial blocks
    only) or, with BOUND, past key S-1; exp2 of it is P. ``s``: the natural-unit score before the
    score_mod, which its derivative and the captures' gradient take. ``q_c`` / ``kv_c``: the
    clamped indices the hooks saw. KEYS_FIRST: a = k, b = q, tiles [BN, BM] (the hooks are
    elementwise, so they take the transposed index shapes); else a = q, b = k, [BM, BN].
    ``use_mask`` / ``use_bound``: whether this tile applies MASK_MOD / the bounds mask, under a
    branch (the single loops' FULL_LIST; constant True elsewhere, where the branch folds away)."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION) * (qk_scale * LN2)
    if KEYS_FIRST:
        q_c = tl.minimum(rows, L - 1)[None, :]
        kv_c = tl.minimum(cols, S - 1)[:, None]
        shift = nlse2[None, :]
    else:
        q_c = tl.minimum(rows, L - 1)[:, None]
        kv_c = tl.minimum(cols, S - 1)[None, :]
        shift = nlse2[:, None]
    if SCORE_MOD is not None:
        s2 = tl.broadcast_to(SCORE_MOD(s, fb, fh, q_c, kv_c, score_ptrs, score_meta), s.shape) * RCP_LN2 + shift
        # rows past L read q = 0, and a score_mod may not be finite at s = 0 (NaN + -inf is NaN)
        if KEYS_FIRST:
            s2 = tl.where(rows[None, :] < L, s2, float("-inf"))
        else:
            s2 = tl.where(rows[:, None] < L, s2, float("-inf"))
    else:
        s2 = s * RCP_LN2 + shift
    if MASK_MOD is not None:
        if use_mask:
            s2 = tl.where(MASK_MOD(fb, fh, q_c, kv_c, mask_ptrs, mask_meta), s2, float("-inf"))
    if BOUND:
        if use_bound:
            if KEYS_FIRST:
                s2 = tl.where(cols[:, None] < S, s2, float("-inf"))
            else:
                s2 = tl.where(cols[None, :] < S, s2, float("-inf"))
    return s2, s, q_c, kv_c


@triton.jit
def _tile_sources(a_base, b_base, n, stride_an, stride_bn, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """What ``_load_tile_pair`` reads two [n, HEAD_DIM] tensors of one head through: per-head
    tensor descriptors of [BLOCK, BLOCK_D] boxes (USE_TMA), else the base pointers themselves."""
    if USE_TMA:
        a_src = tl.make_tensor_descriptor(a_base, [n, HEAD_DIM], [stride_an, 1], [BLOCK, BLOCK_D])
        b_src = tl.make_tensor_descriptor(b_base, [n, HEAD_DIM], [stride_bn, 1], [BLOCK, BLOCK_D])
    else:
        a_src = a_base
        b_src = b_base
    return a_src, b_src


@triton.jit
def _load_tile_pair(a_src, b_src, start, idx, offs_d, n, stride_an, stride_ad, stride_bn, stride_bd,
                    HEAD_DIM: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows ``idx`` (= start + arange) of two [n, HEAD_DIM] tensors of one head, as [len(idx),
    BLOCK_D] tiles that read 0 past row n and past HEAD_DIM: through tensor descriptors (USE_TMA,
    the copy engine zero-fills) or base pointers (masked unless EVEN)."""
    if USE_TMA:
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    else:
        a_ptrs = a_src + tl.cast(idx, tl.int64)[:, None] * stride_an + offs_d[None, :] * stride_ad
        b_ptrs = b_src + tl.cast(idx, tl.int64)[:, None] * stride_bn + offs_d[None, :] * stride_bd
        if EVEN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            ok = (idx[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
            a = tl.load(a_ptrs, mask=ok, other=0.0)
            b = tl.load(b_ptrs, mask=ok, other=0.0)
    return a, b


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
    start, end, rot, cols, offs_m, offs_d, bh, L, S, qk_scale, sm_scale, causal_off, window_off, seed, dropout_p,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_maskm, stride_maskn, stride_dmaskm, stride_dmaskn,
    stride_dqm, stride_dqd,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, MASK_GRAD_ATOMIC: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    edge_lo=0, edge_hi=0, EDGES: tl.constexpr = False,
    fb=0, fh=0, score_ptrs=None, score_meta=None, mod_mask_ptrs=None, mask_meta=None,
    FLEX: tl.constexpr = False, SCORE_MOD: tl.constexpr = None, SCORE_DSCORE: tl.constexpr = None,
    MASK_MOD: tl.constexpr = None, block_list=None, list_step=0, SPARSE_BQ: tl.constexpr = 128,
    LISTED: tl.constexpr = False, full_list=None, full_step=0, FULL_LIST: tl.constexpr = False,
):
    """Accumulate dK, dV of one key block over query blocks [start, end) of one head; with
    DQ_ATOMIC also add this block's share of dQ into the fp32 DQ buffer (5 dots per tile pair
    instead of the 7 of separate dK/dV and dQ passes, at the cost of atomics): ``dq_dst`` is the
    head's fp32 dQ base pointer (``tl.atomic_add`` per element), or with USE_TMA its [L, HEAD_DIM]
    descriptor, through which the copy engine adds each whole tile (``cp.reduce.async.bulk``).
    MASKED: these query blocks straddle a band edge; EDGES: those outside [edge_lo, edge_hi) do
    (``_scores2``). ``q_src``/``do_src``: the head's base
    pointers, or with USE_TMA its [L, HEAD_DIM] tensor descriptors (the copy engine zero-fills
    rows past L). EVEN: every block lies inside [0, L) and HEAD_DIM == BLOCK_D, so the loads
    need no mask. No dot sits under a branch, so the loop
    software-pipelines. FLEX: the scores through the generated hooks of batch ``fb`` and query
    head ``fh`` (``_flex_scores2``; MASK_MOD in partial blocks only, None in full ones), and dS
    times the score_mod's derivative (SCORE_DSCORE) before it meets Q and K. LISTED: [start, end)
    are positions in the concatenation of the query blocks ``block_list`` lists (as
    ``_fwd_inner``'s), rows past L read as absent (NLSE2 -inf, Delta 0). FULL_LIST: the blocks of
    ``full_list`` follow, from position ``edge_hi`` on, MASK_MOD under a branch (``_fwd_inner``'s)."""
    d_ok = offs_d < HEAD_DIM
    n_it = tl.cdiv(end - start, BLOCK_M)
    for it in range(0, n_it):
        if DQ_ATOMIC:  # start at block `rot`, so programs of one head do not add to the same dQ rows at once
            start_m = start + ((it + rot) % n_it) * BLOCK_M
        else:
            start_m = start + it * BLOCK_M
        part = True
        if LISTED:  # FULL_LIST: partial blocks before edge_hi, full ones from it
            block = _listed_block(start_m, edge_hi, block_list, list_step, full_list, full_step, SPARSE_BQ, FULL_LIST)
            if FULL_LIST:
                part = start_m < edge_hi
            start_m = block * SPARSE_BQ + start_m % SPARSE_BQ
        rows = start_m + offs_m
        row_ok = rows < L
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q, do = _load_tile_pair(q_src, do_src, start_m, rows, offs_d, L, stride_qm, stride_qd, stride_dom, stride_dod,
                                HEAD_DIM, EVEN, USE_TMA)  # [BLOCK_M, BLOCK_D]
        if LISTED:  # a listed block may reach past the rows NLSE2 / Delta are padded to
            nlse2 = tl.load(nlse2_base + rows, mask=row_ok, other=float("-inf"))
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            nlse2 = tl.load(nlse2_base + rows)  # padded past L with -inf / 0 (attn_bwd_preprocess)
            delta = tl.load(delta_base + rows)
        mask_ptrs = mask_base
        if HAS_MASK:
            mask_ptrs = _mask_ptrs(mask_base, rows, cols, stride_maskm, stride_maskn, MASK_KEYS)
        if FLEX:
            s2T, sT, q_c, kv_c = _flex_scores2(k, q, nlse2, L, S, rows, cols, qk_scale, fb, fh, score_ptrs, score_meta,
                                               mod_mask_ptrs, mask_meta, SCORE_MOD, MASK_MOD, False, True, DOT_PRECISION,
                                               part)
            if MASKED and (CAUSAL or WINDOW):  # a band's edge (the score hook over a band)
                s2T = _band_select(s2T, rows, cols, causal_off, window_off, CAUSAL, WINDOW, True)
            elif EDGES:
                if (start_m < edge_lo) | (start_m >= edge_hi):
                    s2T = _band_select(s2T, rows, cols, causal_off, window_off, CAUSAL, WINDOW, True)
            pT = tl.math.exp2(s2T)  # [BLOCK_N, BLOCK_M]
        else:
            pT = tl.math.exp2(_scores2(k, q, nlse2, L, S, rows, cols, qk_scale, causal_off, window_off, mask_ptrs,
                                       MASKED, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, not EVEN, DOT_PRECISION,
                                       True, (start_m < edge_lo) | (start_m >= edge_hi), EDGES))  # [BLOCK_N, BLOCK_M]
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            keep = tl.trans(_keep_mask(seed, bh, L, S, rows, cols, dropout_p))
            zscale = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep, pT * zscale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dpT = tl.where(keep, dpT * zscale, 0.0)
        else:
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])  # dLoss / d(score), [BLOCK_N, BLOCK_M]
        if FLEX:
            if SCORE_MOD is not None:  # to the raw score: times d score_mod / d score (0 where dS is)
                dmod = tl.broadcast_to(SCORE_DSCORE(sT, fb, fh, q_c, kv_c, score_ptrs, score_meta), dsT.shape)
                dsT = tl.where(dsT != 0.0, dsT * dmod, 0.0)
        ds16 = dsT.to(q.dtype)
        dk += tl.dot(ds16, q, input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(ds16), k, input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_D]
            if USE_TMA:  # the copy engine adds the whole tile (a bulk reduce; rows past L are dropped)
                dq_dst.atomic_add([start_m, 0], dq)
            else:
                tl.atomic_add(dq_dst + tl.cast(rows, tl.int64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                              dq, mask=qd_ok, sem="relaxed")
        if MASK_GRAD:
            # d(additive mask) = dS. A broadcast mask's buffer has stride 0 on its broadcast dims,
            # so the tiles that share an element add into it (fp32); a full-size mask gets plain
            # stores in its own dtype.
            dm_ptrs = (dmask_base + tl.cast(rows, tl.int64)[None, :] * stride_dmaskm
                       + tl.cast(cols, tl.int64)[:, None] * stride_dmaskn)
            if EVEN:  # no bounds: a cols < S predicate would split the stores into single elements
                dm_ok = tl.full([cols.shape[0], rows.shape[0]], 1, tl.int1)
            else:
                dm_ok = row_ok[None, :] & (cols < S)[:, None]
            if MASK_GRAD_ATOMIC:
                tl.atomic_add(dm_ptrs, dsT, mask=dm_ok, sem="relaxed")
            else:
                tl.store(dm_ptrs, dsT.to(dmask_base.dtype.element_ty), mask=dm_ok)
    return dk, dv


@triton.jit
def _dq_inner(
    dq, q, do, nlse2, delta, k_src, v_src, mask_base, start, end, rows, offs_n, offs_d, bh, L, S,
    qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn, stride_vd,
    stride_maskm, stride_maskn,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, edge_lo=0, edge_hi=0, EDGES: tl.constexpr = False,
    fb=0, fh=0, score_ptrs=None, score_meta=None, mod_mask_ptrs=None, mask_meta=None, grad_ptrs=None,
    grad_strides=None, FLEX: tl.constexpr = False, SCORE_MOD: tl.constexpr = None,
    SCORE_DSCORE: tl.constexpr = None, SCORE_GRAD: tl.constexpr = None, MASK_MOD: tl.constexpr = None,
    FLEX_BOUND: tl.constexpr = False, block_list=None, list_step=0, SPARSE_BKV: tl.constexpr = 128,
    LISTED: tl.constexpr = False, full_list=None, full_step=0, FULL_LIST: tl.constexpr = False,
):
    """Accumulate dQ of one query block over key blocks [start, end). MASKED: edge/tail blocks;
    EDGES: the blocks outside [edge_lo, edge_hi) are (no mask: COL_BOUND stays off).
    EVEN: every block lies inside [0, S) and HEAD_DIM == BLOCK_D (unmasked loads). USE_TMA:
    ``k_src``/``v_src`` are [S, HEAD_DIM] tensor descriptors, else base pointers.
    FLEX: as ``_dkdv_inner``'s, with the bounds mask where FLEX_BOUND (a block reaching past S),
    and SCORE_GRAD scattering each position's dS (the modded score's gradient, 0 where masked or
    out of range) into the captures' gradient buffers: the dQ programs visit every (query, key)
    pair once, so each pair scatters once. LISTED, FULL_LIST: as ``_fwd_inner``'s (with FLEX_BOUND,
    the bounds mask only on a block that reaches past S, under a branch)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        part = True
        if LISTED:  # FULL_LIST: partial blocks before edge_hi, full ones from it
            block = _listed_block(start_n, edge_hi, block_list, list_step, full_list, full_step, SPARSE_BKV, FULL_LIST)
            if FULL_LIST:
                part = start_n < edge_hi
            key0 = block * SPARSE_BKV + start_n % SPARSE_BKV
        else:
            key0 = start_n
        cols = key0 + offs_n
        k, v = _load_tile_pair(k_src, v_src, key0, cols, offs_d, S, stride_kn, stride_kd, stride_vn, stride_vd,
                               HEAD_DIM, EVEN, USE_TMA)  # [BLOCK_N, BLOCK_D]
        mask_ptrs = mask_base
        if HAS_MASK:
            mask_ptrs = _mask_ptrs(mask_base, rows, cols, stride_maskm, stride_maskn, MASK_KEYS)
        if FLEX:
            bound = True  # the loops per kind of block mask every block they bound (FLEX_BOUND)
            if FULL_LIST:
                bound = key0 + BLOCK_N > S
            s2, s, q_c, kv_c = _flex_scores2(q, k, nlse2, L, S, rows, cols, qk_scale, fb, fh, score_ptrs, score_meta,
                                             mod_mask_ptrs, mask_meta, SCORE_MOD, MASK_MOD, FLEX_BOUND, False,
                                             DOT_PRECISION, part, bound)
            if MASKED and (CAUSAL or WINDOW):  # a band's edge (the score hook over a band)
                s2 = _band_select(s2, rows, cols, causal_off, window_off, CAUSAL, WINDOW, False)
            elif EDGES:
                if (start_n < edge_lo) | (start_n >= edge_hi):
                    s2 = _band_select(s2, rows, cols, causal_off, window_off, CAUSAL, WINDOW, False)
            p = tl.math.exp2(s2)  # [BLOCK_M, BLOCK_N]
        else:
            p = tl.math.exp2(_scores2(q, k, nlse2, L, S, rows, cols, qk_scale, causal_off, window_off, mask_ptrs,
                                      MASKED, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, MASKED, DOT_PRECISION,
                                      False, (start_n < edge_lo) | (start_n >= edge_hi), EDGES))  # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _keep_mask(seed, bh, L, S, rows, cols, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if FLEX:
            if SCORE_GRAD is not None:
                SCORE_GRAD(ds, s, fb, fh, q_c, kv_c, score_ptrs, score_meta, grad_ptrs, grad_strides)
            if SCORE_MOD is not None:
                dmod = tl.broadcast_to(SCORE_DSCORE(s, fb, fh, q_c, kv_c, score_ptrs, score_meta), ds.shape)
                ds = tl.where(ds != 0.0, ds * dmod, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _diagonal_pass(
    Q, K, V, DO, NLSE2, Delta, score_ptrs, score_meta, grad_ptrs, grad_strides,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_statb, stride_stath, B, H, G, L, S, qk_scale, diag, win_right, win_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, SCORE_MOD: tl.constexpr,
    SCORE_GRAD_TILE: tl.constexpr, SCORE_GRAD_DIAG: tl.constexpr,
):
    """One program per (block diagonal, b, h) of a band: the gradient of a score_mod's table indexed
    by ``q_idx - kv_idx`` (``codegen._diagonal_pass_hooks``). The program walks the square tiles
    (m, m - d) of its diagonal d inside the band, recomputes each tile's dS as the dQ programs do
    (S = Q K^T through the hook, dP = dO V^T), adds the tiles' gradient values (every tile of a
    diagonal of blocks has the same element diagonals) and sums the total's diagonals once, where
    the dQ programs' SCORE_GRAD skewed every tile. Programs run the longest diagonals first
    (d = 0, 1, -1, 2, ...); one whose diagonal holds no tile of the band returns."""
    pid = tl.program_id(0)
    bh = pid % (B * H)
    j = pid // (B * H)
    d = tl.where(j % 2 == 1, (j + 1) // 2, -(j // 2))
    b = bh // H
    h = bh % H
    hk = h // G
    causal_off = diag * (S - L) + win_right
    window_off = diag * (S - L) - win_left
    m_lo = tl.maximum(d, 0)
    m_hi = tl.minimum(tl.cdiv(L, BLOCK), tl.cdiv(S, BLOCK) + d)
    offs = tl.arange(0, BLOCK)
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < HEAD_DIM
    q_base = Q + tl.cast(b, tl.int64) * stride_qb + tl.cast(h, tl.int64) * stride_qh
    do_base = DO + tl.cast(b, tl.int64) * stride_dob + tl.cast(h, tl.int64) * stride_doh
    k_base = K + tl.cast(b, tl.int64) * stride_kb + tl.cast(hk, tl.int64) * stride_kh
    v_base = V + tl.cast(b, tl.int64) * stride_vb + tl.cast(hk, tl.int64) * stride_vh
    stat_off = tl.cast(b, tl.int64) * stride_statb + tl.cast(h, tl.int64) * stride_stath
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)  # [BM, BN]: the diagonal's tiles, added
    first = -1
    for m in range(m_lo, m_hi):
        m0 = m * BLOCK
        n0 = (m - d) * BLOCK
        lo, a, c, hi = key_blocks(m0, 0, S, causal_off, window_off, BLOCK, BLOCK, CAUSAL, WINDOW)
        if (n0 >= lo) & (n0 < hi):
            if first < 0:
                first = m
            rows = m0 + offs
            cols = n0 + offs
            q_ok = (rows < L)[:, None] & d_ok[None, :]
            kv_ok = (cols < S)[:, None] & d_ok[None, :]
            q = tl.load(q_base + tl.cast(rows, tl.int64)[:, None] * stride_qm + d_offs[None, :] * stride_qd,
                        mask=q_ok, other=0.0)  # [BM, BLOCK_D]
            do = tl.load(do_base + tl.cast(rows, tl.int64)[:, None] * stride_dom + d_offs[None, :] * stride_dod,
                         mask=q_ok, other=0.0)
            k = tl.load(k_base + tl.cast(cols, tl.int64)[:, None] * stride_kn + d_offs[None, :] * stride_kd,
                        mask=kv_ok, other=0.0)  # [BN, BLOCK_D]
            v = tl.load(v_base + tl.cast(cols, tl.int64)[:, None] * stride_vn + d_offs[None, :] * stride_vd,
                        mask=kv_ok, other=0.0)
            nlse2 = tl.load(NLSE2 + stat_off + rows)  # padded past L (attn_bwd_preprocess)
            delta = tl.load(Delta + stat_off + rows)
            s2, s, q_c, kv_c = _flex_scores2(q, k, nlse2, L, S, rows, cols, qk_scale, b, h, score_ptrs, score_meta,
                                             None, None, SCORE_MOD, None, True, False, DOT_PRECISION)
            if (n0 < a) | (n0 >= c):  # a band edge or the ragged end
                s2 = _band_select(s2, rows, cols, causal_off, window_off, CAUSAL, WINDOW, False)
            p = tl.math.exp2(s2)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            acc += SCORE_GRAD_TILE(p * (dp - delta[:, None]), s, b, h, q_c, kv_c, score_ptrs, score_meta)
    if first >= 0:  # the first tile's indices stand for each element diagonal (in range there: it is a
        # whole tile unless it is the diagonal's only one)
        rows = first * BLOCK + offs
        cols = (first - d) * BLOCK + offs
        SCORE_GRAD_DIAG(acc, b, h, tl.minimum(rows, L - 1)[:, None], tl.minimum(cols, S - 1)[None, :], score_ptrs,
                        score_meta, grad_ptrs, grad_strides)


@triton.jit(do_not_specialize=["B", "N_KV_ITEMS", "N_Q_ITEMS"])  # grid sizes: no variant per value class
def attn_bwd(
    Q, K, V, DO, NLSE2, Delta, DQ, DK, DV, MASK, DMASK, CU_Q, CU_K, KEY_EXT, WORK,
    FLEX_LISTS, SCORE_PTRS, SCORE_META, SCORE_GRADS, MASK_PTRS, MASK_META,  # flex only (FLEX); None otherwise
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_dmaskb, stride_dmaskh, stride_dmaskm, stride_dmaskn,
    stride_statb, stride_stath, stride_extb, stride_exth,
    B, H, G, L_max, S_max, qk_scale, sm_scale, diag, win_right, win_left, dropout_p, seed, N_KV_ITEMS, N_Q_ITEMS,
    SEQ_BUCKET,  # unused by the code: the autotuner's key, so short and long sequences tune apart
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr,
    KEY_RANGE: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, MASK_GRAD_ATOMIC: tl.constexpr,
    VARLEN: tl.constexpr, DQ_ATOMIC: tl.constexpr, DETERMINISTIC: tl.constexpr, EVEN: tl.constexpr,
    USE_TMA: tl.constexpr, HEAD_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr, WORKLIST: tl.constexpr = False,
    ONE_LOOP: tl.constexpr = False, DQ_ONLY: tl.constexpr = False,
    FLEX: tl.constexpr = False, SCORE_MOD: tl.constexpr = None, SCORE_DSCORE: tl.constexpr = None,
    SCORE_GRAD: tl.constexpr = None, LOAD_SCORE_META: tl.constexpr = None, LOAD_GRAD_STRIDES: tl.constexpr = None,
    MASK_MOD: tl.constexpr = None, LOAD_MASK_META: tl.constexpr = None, SPARSE_BQ: tl.constexpr = 128,
    SPARSE_BKV: tl.constexpr = 128, DKDV_ONLY: tl.constexpr = False, DIAG_ONLY: tl.constexpr = False,
    SCORE_GRAD_TILE: tl.constexpr = None, SCORE_GRAD_DIAG: tl.constexpr = None,
):
    """The whole backward in one launch. DQ is fp32 (zeroed) when DQ_ATOMIC adds into it, else in
    the inputs' dtype, stored once per row.

    Programs [0, n_kv) each own one key block of one KV head and write its dK, dV summed over
    the G query heads of the group. Without DQ_ATOMIC, programs [n_kv, n_kv + n_q) each own one
    query block of one head and write its dQ: no atomics, deterministic, and sharing one launch
    lets both halves fill the GPU together. With DQ_ATOMIC (a tuning choice, never taken when
    DETERMINISTIC) there are no dQ programs: the dK/dV programs add dQ by atomics.
    Within a head, causal blocks run heaviest first. 1-D grid: n_kv (+ n_q).
    WORKLIST (packed only; launched with B = 1): the key blocks and query blocks that exist come
    from the host's lists in WORK (``launch._work_list``: N_KV_ITEMS dK/dV items, then N_Q_ITEMS
    dQ items, each sequence << 16 | block, heaviest first) instead of every sequence's
    cdiv(max length, block) slots.
    HEAD_MAJOR (with dQ programs): the same programs, numbered KV head by KV head instead: each
    KV head's dK/dV programs, then the dQ programs of its G query heads, so the two halves run
    side by side and a head's Q, dO, K and V are read while they are still in L2. Measured
    (docs/kernels.md, Tuning: the backward's program order and row statistics): faster for D=128
    non-causal at S <= 4096, causal at S=16384 and packed sequences; slower with grouped-query
    heads.

    MASK_GRAD: also write d(attn_mask) = dS into DMASK (the mask's strides); with
    MASK_GRAD_ATOMIC (a broadcast mask, fp32 buffer) by atomic adds (nondeterministic).
    KEY_RANGE: key blocks outside a head's kept keys are skipped (``_key_range``); their dK/dV
    programs write zeros. EVEN: L and S are multiples of every block size and HEAD_DIM == BLOCK_D.
    USE_TMA: the loops read Q/dO (dK/dV programs) and K/V (dQ programs) through per-head tensor
    descriptors (Hopper's copy engine; needs 16-byte aligned bases and strides, unit last stride).
    ONE_LOOP: a band's edge blocks run in the inner loops, masked under a branch (as attn_fwd's),
    where there is no attn_mask or key range.
    DQ_ONLY: the launch holds the dQ programs only (grid n_q; the Gluon dK / dV kernel of
    ``ws_bwd.py`` wrote dK and dV); not with DQ_ATOMIC or HEAD_MAJOR. DKDV_ONLY: the dK / dV
    programs only (grid n_kv; a DQ_ONLY launch writes dQ). Either builds only its programs' code.
    FLEX (dense, no band, mask, dropout, TMA or DQ_ATOMIC; launch.flex_backward): the
    dK/dV programs walk the BlockMask's query lists of their key block, the dQ programs its key
    lists, as the forward does (``_flex_lists``): MASK_MOD in partial blocks only, the score_mod's
    hooks and derivative everywhere, and the captures' gradient (SCORE_GRAD into SCORE_GRADS) from
    the dQ programs. FLEX_LISTS = (kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices, their 14 strides, q_num_blocks, q_indices, full_q_num_blocks,
    full_q_indices, their 14 strides); BLOCK_M1 and BLOCK_M2 divide SPARSE_BQ, BLOCK_N1 and
    BLOCK_N2 divide SPARSE_BKV.
    SCORE_MOD without FLEX (launch.flex_backward over a band; no mask, dropout, key range, varlen
    or DQ_ATOMIC): the band's own loops with the score hooks, their derivative and the captures'
    gradient as the FLEX loops apply them, the band's edges masked by arithmetic.
    DIAG_ONLY (SCORE_MOD over a band, BLOCK_M2 == BLOCK_N2, no varlen): the launch holds
    ``_diagonal_pass``'s programs only, grid B * H * (2 * max(n_q, n_kv) - 1), which write the
    gradient of a relative-position table (SCORE_GRAD_TILE, SCORE_GRAD_DIAG) in place of the dQ
    programs' SCORE_GRAD (launch.flex_backward's ``diagonal_pass``).
    """
    one_loop: tl.constexpr = ONE_LOOP and (CAUSAL or WINDOW) and not (HAS_MASK or KEY_RANGE)
    tl.static_assert(not (DQ_ATOMIC and DETERMINISTIC), "DQ_ATOMIC is nondeterministic")
    tl.static_assert(STAT_PAD % BLOCK_M1 == 0 and STAT_PAD % BLOCK_M2 == 0, "NLSE2 / Delta are padded to STAT_PAD rows")
    tl.static_assert(not (DQ_ONLY and (DQ_ATOMIC or HEAD_MAJOR)), "DQ_ONLY launches the dQ programs in key order")
    tl.static_assert(not (DKDV_ONLY and (DQ_ONLY or HEAD_MAJOR)), "DKDV_ONLY launches the dK / dV programs alone")
    tl.static_assert(not (FLEX and (DQ_ATOMIC or USE_TMA)), "FLEX: dQ programs, pointer loads")
    # the score hook over a band (launch.flex_backward's band): the band's own loops call the hooks
    band_hooks: tl.constexpr = SCORE_MOD is not None and not FLEX
    score_meta, mask_meta = _flex_meta(SCORE_META, MASK_META, SCORE_MOD, LOAD_SCORE_META, MASK_MOD, LOAD_MASK_META)
    if SCORE_GRAD is not None or DIAG_ONLY:
        grad_strides = LOAD_GRAD_STRIDES(SCORE_META)
    else:
        grad_strides = 0
    if DIAG_ONLY:  # known at compile time: only the diagonal pass is built
        tl.static_assert(BLOCK_M2 == BLOCK_N2 and SCORE_MOD is not None and not (FLEX or VARLEN),
                         "DIAG_ONLY: square tiles, the score hooks over a band")
        _diagonal_pass(Q, K, V, DO, NLSE2, Delta, SCORE_PTRS, score_meta, SCORE_GRADS, grad_strides,
                       stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                       stride_statb, stride_stath, B, H, G, L_max, S_max, qk_scale, diag, win_right, win_left,
                       HEAD_DIM, BLOCK_D, BLOCK_M2, CAUSAL, WINDOW, DOT_PRECISION, SCORE_MOD, SCORE_GRAD_TILE,
                       SCORE_GRAD_DIAG)
        return
    Hkv = H // G
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < HEAD_DIM
    n_kv_blocks = _block_slots(S_max, N_KV_ITEMS, BLOCK_N1, WORKLIST)
    n_kv = n_kv_blocks * B * Hkv
    pid = tl.program_id(0)
    if DQ_ONLY:
        pid += n_kv
    if HEAD_MAJOR and not DQ_ATOMIC:
        n_q_blocks = _block_slots(L_max, N_Q_ITEMS, BLOCK_M2, WORKLIST)
        per_group = n_kv_blocks + G * n_q_blocks
        j = pid % per_group
        is_kv = j < n_kv_blocks
        bhk = pid // per_group
        pid_n = j
        bh = bhk * G + (j - n_kv_blocks) // n_q_blocks  # (b * Hkv + hk) * G + g == b * H + hk * G + g
        pid_m = (j - n_kv_blocks) % n_q_blocks
    else:  # the dQ programs' indices are computed in their branch (the same build as before the flag)
        is_kv = pid < n_kv
        bhk = pid // n_kv_blocks
        pid_n = pid % n_kv_blocks  # key block 0 sees the most queries: first within its head
        bh = 0
        pid_m = 0
    if DQ_ONLY:  # known at compile time: the other programs' code is not built
        is_kv = False
    if DKDV_ONLY:
        is_kv = True
    if is_kv:
        b = bhk // Hkv
        hk = bhk % Hkv
        if WORKLIST:
            b, pid_n = _work_item(WORK, pid_n)
        q0, k0, L, S = _seq(b, L_max, S_max, CU_Q, CU_K, CU_K, VARLEN, False, False)
        n0 = pid_n * BLOCK_N1
        if VARLEN:
            if n0 >= S:
                return
            bt = 0
        else:
            bt = b
        causal_off = diag * (S - L) + win_right
        window_off = diag * (S - L) - win_left
        stat_row0 = _stat_row0(q0, b, VARLEN)
        cols = n0 + tl.arange(0, BLOCK_N1)
        offs_m = tl.arange(0, BLOCK_M1)
        kv_ok = (cols < S)[:, None] & d_ok[None, :]
        k_rows = tl.cast(k0 + cols, tl.int64)[:, None]
        k = tl.load(K + tl.cast(bt, tl.int64) * stride_kb + tl.cast(hk, tl.int64) * stride_kh
                    + k_rows * stride_kn + d_offs[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)  # [BLOCK_N1, BLOCK_D]
        v = tl.load(V + tl.cast(bt, tl.int64) * stride_vb + tl.cast(hk, tl.int64) * stride_vh
                    + k_rows * stride_vn + d_offs[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        lo, a, c, hi = query_blocks(n0, L, causal_off, window_off, BLOCK_M1, BLOCK_N1, CAUSAL, WINDOW)
        # Never software-pipelined: where the query loops fold away (L == 1 specializes their
        # trip count to one), this loop becomes the innermost one, and the pipeliner cannot
        # predicate the tensor descriptors it creates.
        for g in tl.range(G, num_stages=1):
            h = hk * G + g
            bh = b * H + h
            q_base = (Q + tl.cast(bt, tl.int64) * stride_qb + tl.cast(h, tl.int64) * stride_qh
                      + tl.cast(q0, tl.int64) * stride_qm)
            do_base = (DO + tl.cast(bt, tl.int64) * stride_dob + tl.cast(h, tl.int64) * stride_doh
                       + tl.cast(q0, tl.int64) * stride_dom)
            dq_base = (DQ + tl.cast(bt, tl.int64) * stride_dqb + tl.cast(h, tl.int64) * stride_dqh
                       + tl.cast(q0, tl.int64) * stride_dqm)
            stat_off = tl.cast(bt, tl.int64) * stride_statb + tl.cast(h, tl.int64) * stride_stath + stat_row0
            nlse2_base = NLSE2 + stat_off
            delta_base = Delta + stat_off
            mask_base = MASK
            dmask_base = DMASK
            if HAS_MASK:
                mask_base = MASK + tl.cast(b, tl.int64) * stride_maskb + tl.cast(h, tl.int64) * stride_maskh
            if MASK_GRAD:
                dmask_base = DMASK + tl.cast(b, tl.int64) * stride_dmaskb + tl.cast(h, tl.int64) * stride_dmaskh
            q_src, do_src = _tile_sources(q_base, do_base, L, stride_qm, stride_dom, BLOCK_M1, BLOCK_D, HEAD_DIM,
                                          USE_TMA)
            dq_dst = dq_base
            if DQ_ATOMIC and USE_TMA:
                dq_dst = tl.make_tensor_descriptor(dq_base, [L, HEAD_DIM], [stride_dqm, 1], [BLOCK_M1, BLOCK_D])
            lo_h, a_h, c_h, hi_h = lo, a, c, hi
            kept = False  # every key of this block is kept (KEY_RANGE): no mask reads in the unmasked loop
            if KEY_RANGE:  # no query of head h sees this key block: visit no query block
                k_lo, k_hi, run = _key_range(KEY_EXT, b, h, S, stride_extb, stride_exth, KEY_RANGE)
                if (n0 >= k_hi) | (n0 + BLOCK_N1 <= k_lo):
                    lo_h, a_h, c_h, hi_h = lo, lo, lo, lo
                kept = run & (n0 >= k_lo) & (n0 + BLOCK_N1 <= k_hi)
            if one_loop:  # the band's edge blocks in the inner loop, under a branch (configs.bwd_config's one_loop)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    lo_h, hi_h, pid_n, cols, offs_m, d_offs, bh, L, S, qk_scale, sm_scale, causal_off, window_off, seed, dropout_p,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_maskm, stride_maskn,
                    stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_M1, False, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS,
                    DROPOUT, MASK_GRAD, MASK_GRAD_ATOMIC, DQ_ATOMIC, EVEN, USE_TMA, DOT_PRECISION, a_h, c_h, True,
                    fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                )
            if CAUSAL and not one_loop:
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    lo_h, a_h, 0, cols, offs_m, d_offs, bh, L, S, qk_scale, sm_scale, causal_off, window_off, seed, dropout_p,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_maskm, stride_maskn,
                    stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_M1, True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS,
                    DROPOUT, MASK_GRAD, MASK_GRAD_ATOMIC, DQ_ATOMIC, EVEN, USE_TMA, DOT_PRECISION,
                    fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                )
            if KEY_RANGE:  # the maskless loop over [a_h, c_kept), empty unless every key is kept
                c_kept = tl.where(kept, c_h, a_h)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    a_h, c_kept, pid_n, cols, offs_m, d_offs, bh, L, S, qk_scale, sm_scale, causal_off, window_off, seed, dropout_p,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_maskm, stride_maskn,
                    stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_M1, False, CAUSAL, WINDOW, False, MASK_BOOL, MASK_KEYS,
                    DROPOUT, MASK_GRAD, MASK_GRAD_ATOMIC, DQ_ATOMIC, EVEN, USE_TMA, DOT_PRECISION,
                )
                a_h = c_kept
            if FLEX and ONE_LOOP:  # the query blocks the lists give this key block in one loop (FULL_LIST)
                num, idx, step, fnum, fidx, fstep = _list_row(FLEX_LISTS[9], b, h, n0 // SPARSE_BKV)
                n_part = tl.load(FLEX_LISTS[5] + num)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    0, (n_part + tl.load(FLEX_LISTS[7] + fnum)) * SPARSE_BQ, 0, cols, offs_m, d_offs, bh, L, S,
                    qk_scale, sm_scale, causal_off, window_off, seed, dropout_p, stride_qm, stride_qd, stride_dom,
                    stride_dod, stride_maskm, stride_maskn, stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd,
                    HEAD_DIM, BLOCK_M1, False, False, False, False, False, False, False, False, False, False, EVEN,
                    False, DOT_PRECISION, 0, n_part * SPARSE_BQ, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS,
                    mask_meta, True, SCORE_MOD, SCORE_DSCORE, MASK_MOD, FLEX_LISTS[6] + idx, step, SPARSE_BQ, True,
                    FLEX_LISTS[8] + fidx, fstep, True,
                )
            if FLEX and not ONE_LOOP:  # the query blocks the lists give this key block, one loop each: partial (mask_mod), full
                num, idx, step, fnum, fidx, fstep = _list_row(FLEX_LISTS[9], b, h, n0 // SPARSE_BKV)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    0, tl.load(FLEX_LISTS[5] + num) * SPARSE_BQ, 0, cols, offs_m, d_offs, bh, L, S, qk_scale, sm_scale,
                    causal_off, window_off, seed, dropout_p, stride_qm, stride_qd, stride_dom, stride_dod,
                    stride_maskm, stride_maskn, stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM,
                    BLOCK_M1, False, False, False, False, False, False, False, False, False, False, EVEN, False,
                    DOT_PRECISION, 0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta,
                    True, SCORE_MOD, SCORE_DSCORE, MASK_MOD, FLEX_LISTS[6] + idx, step, SPARSE_BQ, True,
                )
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    0, tl.load(FLEX_LISTS[7] + fnum) * SPARSE_BQ, 0, cols, offs_m, d_offs, bh, L, S, qk_scale,
                    sm_scale, causal_off, window_off, seed, dropout_p, stride_qm, stride_qd, stride_dom, stride_dod,
                    stride_maskm, stride_maskn, stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM,
                    BLOCK_M1, False, False, False, False, False, False, False, False, False, False, EVEN, False,
                    DOT_PRECISION, 0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS, mask_meta,
                    True, SCORE_MOD, SCORE_DSCORE, None, FLEX_LISTS[8] + fidx, fstep, SPARSE_BQ, True,
                )
            if not one_loop and not FLEX:
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    a_h, c_h, pid_n, cols, offs_m, d_offs, bh, L, S, qk_scale, sm_scale, causal_off, window_off, seed, dropout_p,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_maskm, stride_maskn,
                    stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_M1, False, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS,
                    DROPOUT, MASK_GRAD, MASK_GRAD_ATOMIC, DQ_ATOMIC, EVEN, USE_TMA, DOT_PRECISION,
                    fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                )
            if WINDOW and not one_loop:
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, nlse2_base, delta_base, mask_base, dmask_base, dq_dst,
                    c_h, hi_h, 0, cols, offs_m, d_offs, bh, L, S, qk_scale, sm_scale, causal_off, window_off, seed, dropout_p,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_maskm, stride_maskn,
                    stride_dmaskm, stride_dmaskn, stride_dqm, stride_dqd, HEAD_DIM, BLOCK_M1, True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS,
                    DROPOUT, MASK_GRAD, MASK_GRAD_ATOMIC, DQ_ATOMIC, EVEN, USE_TMA, DOT_PRECISION,
                    fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                )
        dk *= sm_scale
        tl.store(DK + tl.cast(bt, tl.int64) * stride_dkb + tl.cast(hk, tl.int64) * stride_dkh
                 + tl.cast(k0 + cols, tl.int64)[:, None] * stride_dkn + d_offs[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + tl.cast(bt, tl.int64) * stride_dvb + tl.cast(hk, tl.int64) * stride_dvh
                 + tl.cast(k0 + cols, tl.int64)[:, None] * stride_dvn + d_offs[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=kv_ok)
    else:
        n_q_blocks = _block_slots(L_max, N_Q_ITEMS, BLOCK_M2, WORKLIST)
        if not (HEAD_MAJOR and not DQ_ATOMIC):
            bh = (pid - n_kv) // n_q_blocks
            pid_m = (pid - n_kv) % n_q_blocks
        if (CAUSAL or FLEX) and not WORKLIST:
            pid_m = n_q_blocks - 1 - pid_m  # the last query block sees the most keys: first
        b = bh // H
        h = bh % H
        if WORKLIST:  # the dQ items follow the dK/dV items in WORK
            b, pid_m = _work_item(WORK, N_KV_ITEMS + pid_m)
            bh = b * H + h
        hk = h // G
        q0, k0, L, S = _seq(b, L_max, S_max, CU_Q, CU_K, CU_K, VARLEN, False, False)
        m0 = pid_m * BLOCK_M2
        if VARLEN:
            if m0 >= L:
                return
            bt = 0
        else:
            bt = b
        causal_off = diag * (S - L) + win_right
        window_off = diag * (S - L) - win_left
        rows = m0 + tl.arange(0, BLOCK_M2)
        offs_n = tl.arange(0, BLOCK_N2)
        row_ok = rows < L
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q_rows = tl.cast(q0 + rows, tl.int64)[:, None]
        q = tl.load(Q + tl.cast(bt, tl.int64) * stride_qb + tl.cast(h, tl.int64) * stride_qh
                    + q_rows * stride_qm + d_offs[None, :] * stride_qd,
                    mask=qd_ok, other=0.0)  # [BLOCK_M2, BLOCK_D]
        do = tl.load(DO + tl.cast(bt, tl.int64) * stride_dob + tl.cast(h, tl.int64) * stride_doh
                     + q_rows * stride_dom + d_offs[None, :] * stride_dod,
                     mask=qd_ok, other=0.0)
        stat_off = (tl.cast(bt, tl.int64) * stride_statb + tl.cast(h, tl.int64) * stride_stath
                    + _stat_row0(q0, b, VARLEN))
        nlse2 = tl.load(NLSE2 + stat_off + rows)  # padded past L (attn_bwd_preprocess)
        delta = tl.load(Delta + stat_off + rows)
        k_base = (K + tl.cast(bt, tl.int64) * stride_kb + tl.cast(hk, tl.int64) * stride_kh
                  + tl.cast(k0, tl.int64) * stride_kn)
        v_base = (V + tl.cast(bt, tl.int64) * stride_vb + tl.cast(hk, tl.int64) * stride_vh
                  + tl.cast(k0, tl.int64) * stride_vn)
        mask_base = MASK
        if HAS_MASK:
            mask_base = MASK + tl.cast(b, tl.int64) * stride_maskb + tl.cast(h, tl.int64) * stride_maskh
        k_src, v_src = _tile_sources(k_base, v_base, S, stride_kn, stride_vn, BLOCK_N2, BLOCK_D, HEAD_DIM, USE_TMA)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
        k_lo, k_hi, run = _key_range(KEY_EXT, b, h, S, stride_extb, stride_exth, KEY_RANGE)
        lo, a, c, hi = key_blocks(m0, k_lo, k_hi, causal_off, window_off, BLOCK_M2, BLOCK_N2, CAUSAL, WINDOW)
        if one_loop:  # the band's edge blocks in the inner loop, under a branch (configs.bwd_config's one_loop)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, lo, hi, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2,
                           False, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, EVEN, USE_TMA, DOT_PRECISION,
                           a, c, True, fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, grad_ptrs=SCORE_GRADS,
                           grad_strides=grad_strides, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                           SCORE_GRAD=SCORE_GRAD, FLEX_BOUND=band_hooks and not EVEN)
        if WINDOW and not one_loop:
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, lo, a, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2,
                           True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, EVEN, USE_TMA, DOT_PRECISION,
                           fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, grad_ptrs=SCORE_GRADS,
                           grad_strides=grad_strides, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                           SCORE_GRAD=SCORE_GRAD, FLEX_BOUND=band_hooks and not EVEN)
        if KEY_RANGE:  # a run of kept keys reads the mask on the block k_lo cuts only (_run_split)
            a_in, c_run = _run_split(a, c, k_lo, run, BLOCK_N2)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, a, a_in, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2,
                           True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, EVEN, USE_TMA, DOT_PRECISION)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, a_in, c_run, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2,
                           False, CAUSAL, WINDOW, False, MASK_BOOL, MASK_KEYS, DROPOUT, EVEN, USE_TMA, DOT_PRECISION)
            a = c_run
        if FLEX and ONE_LOOP:  # the key blocks the lists give this query block in one loop (FULL_LIST)
            num, idx, step, fnum, fidx, fstep = _list_row(FLEX_LISTS[4], b, h, m0 // SPARSE_BQ)
            n_part = tl.load(FLEX_LISTS[0] + num)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, 0,
                           (n_part + tl.load(FLEX_LISTS[2] + fnum)) * SPARSE_BKV, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2, False, False, False, False,
                           False, False, False, EVEN, False, DOT_PRECISION, 0, n_part * SPARSE_BKV, False, b, h,
                           SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_GRADS, grad_strides, True, SCORE_MOD,
                           SCORE_DSCORE, SCORE_GRAD, MASK_MOD, True, FLEX_LISTS[1] + idx, step, SPARSE_BKV, True,
                           FLEX_LISTS[3] + fidx, fstep, True)
        if FLEX and not ONE_LOOP:  # the key blocks the lists give this query block, one loop each, as the forward walks them
            num, idx, step, fnum, fidx, fstep = _list_row(FLEX_LISTS[4], b, h, m0 // SPARSE_BQ)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, 0,  # partial: mask_mod and bounds
                           tl.load(FLEX_LISTS[0] + num) * SPARSE_BKV, rows, offs_n, d_offs, bh, L, S, qk_scale,
                           causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2, False, False, False, False, False, False,
                           False, EVEN, False, DOT_PRECISION, 0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS,
                           mask_meta, SCORE_GRADS, grad_strides, True, SCORE_MOD, SCORE_DSCORE, SCORE_GRAD, MASK_MOD,
                           True, FLEX_LISTS[1] + idx, step, SPARSE_BKV, True)
            n_full = tl.load(FLEX_LISTS[2] + fnum)
            last = tl.load(FLEX_LISTS[3] + fidx + tl.maximum(n_full - 1, 0) * fstep)
            ragged = (n_full > 0) & ((last + 1) * SPARSE_BKV > S)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, 0,  # full, inside [0, S): no mask work
                           (n_full - ragged.to(tl.int32)) * SPARSE_BKV, rows, offs_n, d_offs, bh, L, S, qk_scale,
                           causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2, False, False, False, False, False, False,
                           False, EVEN, False, DOT_PRECISION, 0, 0, False, b, h, SCORE_PTRS, score_meta, MASK_PTRS,
                           mask_meta, SCORE_GRADS, grad_strides, True, SCORE_MOD, SCORE_DSCORE, SCORE_GRAD, None,
                           False, FLEX_LISTS[3] + fidx, fstep, SPARSE_BKV, True)
            # the full block that reaches past S, if any: the bounds mask only (else an empty range); where
            # S divides into the blocks such a block lies wholly past S and adds nothing: no loop
            if not EVEN:
                r_lo = tl.where(ragged, last * SPARSE_BKV, 0)
                r_hi = tl.where(ragged, S, 0)
                dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, r_lo, r_hi, rows, offs_n, d_offs,
                               bh, L, S, qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd,
                               stride_vn, stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2, False, False,
                               False, False, False, False, False, EVEN, False, DOT_PRECISION, 0, 0, False, b, h,
                               SCORE_PTRS, score_meta, MASK_PTRS, mask_meta, SCORE_GRADS, grad_strides, True,
                               SCORE_MOD, SCORE_DSCORE, SCORE_GRAD, None, True)
        if not one_loop and not FLEX:
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, a, c, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2,
                           False, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, EVEN, USE_TMA, DOT_PRECISION,
                           fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, grad_ptrs=SCORE_GRADS,
                           grad_strides=grad_strides, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                           SCORE_GRAD=SCORE_GRAD, FLEX_BOUND=band_hooks and not EVEN)
            dq = _dq_inner(dq, q, do, nlse2, delta, k_src, v_src, mask_base, c, hi, rows, offs_n, d_offs, bh, L, S,
                           qk_scale, causal_off, window_off, seed, dropout_p, stride_kn, stride_kd, stride_vn,
                           stride_vd, stride_maskm, stride_maskn, HEAD_DIM, BLOCK_N2,
                           True, CAUSAL, WINDOW, HAS_MASK, MASK_BOOL, MASK_KEYS, DROPOUT, EVEN, USE_TMA, DOT_PRECISION,
                           fb=b, fh=h, score_ptrs=SCORE_PTRS, score_meta=score_meta, grad_ptrs=SCORE_GRADS,
                           grad_strides=grad_strides, FLEX=band_hooks, SCORE_MOD=SCORE_MOD, SCORE_DSCORE=SCORE_DSCORE,
                           SCORE_GRAD=SCORE_GRAD, FLEX_BOUND=band_hooks and not EVEN)
        dq *= sm_scale
        tl.store(DQ + tl.cast(bt, tl.int64) * stride_dqb + tl.cast(h, tl.int64) * stride_dqh
                 + q_rows * stride_dqm + d_offs[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=qd_ok)

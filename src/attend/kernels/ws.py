"""The Hopper forward in Gluon, warp-specialized: one producer warp issues every TMA load (K, V
and a float bias's tiles) into a ring of shared-memory slots, and two consumer warpgroups of 64
query rows each run the QK product, the softmax and the PV product on their own. The consumers
release slots through mbarriers and never meet at a CTA barrier, so one's softmax runs while the
other's MMAs do: the overlap the ``tl`` core cannot express (its warpgroups meet at a
``bar.sync`` per iteration, and Triton 3.6 waits for an asynchronous QK product at once; RESULTS.md
"session 8"). H100, bf16, ``benchmarks/ab.py`` (session 8, launch.FWD_WS on / off): a float
bias (4, 16, 4096, 4096) 409 against 360 TFLOP/s; no mask, D=128, S = 1k / 4k / 16k, 478 / 557 /
572 against 417 / 498 / 506. A one-partition schedule with the next block's QK in flight during
the softmax gained nothing (``benchmarks/probe_gluon.py``).

It covers the forward's plainest features only: D = 128, fp16 / bf16, no band, no dropout, no
packing, and no mask or a full-size float bias, on contiguous tensors whose lengths are whole
tiles (``eligible``). Every other call takes the core (``core.attn_fwd``); the backward is the
core's in every case (it reads this kernel's output and LSE). Gluon kernels do not run under
the interpreter: the CPU tests compile this one for sm_90 (``build.py``) and the GPU suite
checks it against float64.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .core import LN2, RCP_LN2

ROWS = 64  # query rows per consumer warpgroup; a program covers 2 * ROWS
BLOCK_N = 128  # keys per tile
STAGES = 2  # ring slots for K, V and the bias (229 KiB of shared memory with a bias)
HEAD_DIM = 128
_GL_DTYPE = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@gluon.jit
def _producer(k_desc, v_desc, b_desc, k_smem, v_smem, b_smem, k_full, v_full, b_full, k_empty, v_empty, b_empty,
              kv_row, q_row, n, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              HAS_BIAS: gl.constexpr):
    """Tile j of K and V (and each consumer's bias tile) into slot j % STAGES once the consumers
    have released it."""
    for j in range(0, n):
        slot = j % STAGES
        ph = ((j // STAGES) & 1) ^ 1  # the first pass finds every slot free
        if HAS_BIAS:
            for c in gl.static_range(2):
                mbarrier.wait(b_empty.index(2 * slot + c), ph, pred=j >= STAGES)
                mbarrier.expect(b_full.index(2 * slot + c), b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(b_desc, [q_row + c * ROWS, j * BLOCK_N], b_full.index(2 * slot + c),
                                                b_smem.index(2 * slot + c))
        mbarrier.wait(k_empty.index(slot), ph, pred=j >= STAGES)
        mbarrier.expect(k_full.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_full.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), ph, pred=j >= STAGES)
        mbarrier.expect(v_full.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], v_full.index(slot), v_smem.index(slot))


@gluon.jit
def _consumer(q_desc, o_desc, q_smem, q_bar, k_smem, v_smem, b_smem, k_full, v_full, b_full, k_empty, v_empty, b_empty,
              lse_ptr, q_row, n, qk_scale, CID: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Online softmax of ROWS query rows over every key tile; writes their output and LSE. Scores
    in the log2 domain; a row whose every score is -inf (a bias of -inf) gets output 0 and LSE -inf,
    as the core's rows with no visible key."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    for j in range(0, n):
        slot = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_full.index(slot), ph)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(k_empty.index(slot))
        if HAS_BIAS:  # natural units, like the core's float masks
            mbarrier.wait(b_full.index(2 * slot + CID), ph)
            bias = b_smem.index(2 * slot + CID).load(s_layout).to(gl.float32)
            mbarrier.arrive(b_empty.index(2 * slot + CID))
            s = s * qk_scale + bias * RCP_LN2
        else:
            s = s * qk_scale
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing finite yet
        p = gl.exp2(s - m_sub[:, None])
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(q_desc.dtype), p_layout)
        mbarrier.wait(v_full.index(slot), ph)
        acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(slot))
        m_i = m_new
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    rows = gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + q_row + rows, lse)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    q_smem.store(out.to(o_desc.dtype))  # Q's tile is free after the last QK product: it stages O
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, b_desc, lse_ptr, H, G, L, S, qk_scale,
                ROWS: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                HAS_BIAS: gl.constexpr):
    """Grid (L / (2 * ROWS), B * H). Tensors as 2-D row views: q / o / lse rows (b * H + h) * L + i,
    k / v rows (b * H / G + h / G) * S + j, the bias (b * H + h) * L + i by key."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * L + pid_m * 2 * ROWS
    kv_row = ((bh // H) * (H // G) + (bh % H) // G) * S
    n = S // BLOCK_N
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if HAS_BIAS:
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [2 * STAGES] + b_desc.block_type.shape, b_desc.layout)
    else:
        b_smem = q_smem
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_full = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_bars.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2 * STAGES):
        mbarrier.init(b_full.index(i), count=1)
        mbarrier.init(b_empty.index(i), count=1)  # each consumer's own bias tile
    gl.warp_specialize([
        (_consumer, (q_desc, o_desc, q_smem.index(0), q_bars.index(0), k_smem, v_smem, b_smem, k_full, v_full, b_full,
                     k_empty, v_empty, b_empty, lse_ptr, q_row, n, qk_scale, 0, ROWS, BLOCK_N, D, STAGES, HAS_BIAS)),
        (_consumer, (q_desc, o_desc, q_smem.index(1), q_bars.index(1), k_smem, v_smem, b_smem, k_full, v_full, b_full,
                     k_empty, v_empty, b_empty, lse_ptr, q_row + ROWS, n, qk_scale, 1, ROWS, BLOCK_N, D, STAGES,
                     HAS_BIAS)),
        (_producer, (k_desc, v_desc, b_desc, k_smem, v_smem, b_smem, k_full, v_full, b_full, k_empty, v_empty, b_empty,
                     kv_row, q_row, n, ROWS, BLOCK_N, STAGES, HAS_BIAS)),
    ], [4, 1], [232, 40])


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, mstr: tuple, mbool: bool,
             dropout_p: float, band_flags: dict, packed) -> bool:
    """Whether ``forward`` serves a call on an sm_90 device (the caller checks the device): D = 128,
    fp16 / bf16, contiguous (B, H, L, D) tensors, L a multiple of 2 * ROWS and S of BLOCK_N, no
    band, dropout or packing, and no mask or a full-size float one of the inputs' dtype, contiguous."""
    if packed is not None or dropout_p > 0.0 or band_flags["CAUSAL"] or band_flags["WINDOW"]:
        return False
    B, H, L, D = q.shape
    S = k.shape[2]
    if D != HEAD_DIM or q.dtype not in (torch.float16, torch.bfloat16) or L % (2 * ROWS) or S % BLOCK_N or S == 0:
        return False
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v)):
        return False
    if mask is None:
        return True
    return (not mbool and mask.dtype == q.dtype and mstr == (H * L * S, L * S, S, 1)
            and mask.data_ptr() % 16 == 0)


def descriptor(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A host TMA descriptor of [rows, cols] boxes over ``t`` seen as 2-D (its leading dims as
    rows; ``t`` contiguous)."""
    t2 = t.reshape(-1, t.shape[-1])
    layout = gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPE[t.dtype])
    return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [rows, cols], layout)


def forward(q, k, v, bias, out, lse, scale: float) -> None:
    """Out and LSE ((B, H, L) fp32, natural log) of softmax(q k^T * scale + bias) v, ``eligible``
    inputs, ``scale`` > 0."""
    B, H, L, D = q.shape
    S = k.shape[2]
    q_desc, o_desc = descriptor(q, ROWS, D), descriptor(out, ROWS, D)
    b_desc = q_desc if bias is None else descriptor(bias, ROWS, BLOCK_N)
    attn_fwd_ws[(L // (2 * ROWS), B * H)](
        q_desc, descriptor(k, BLOCK_N, D), descriptor(v, BLOCK_N, D), o_desc, b_desc, lse, H, H // k.shape[1], L, S,
        scale * RCP_LN2.value, ROWS, BLOCK_N, D, STAGES, bias is not None, num_warps=4)

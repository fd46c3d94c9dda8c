"""Why the Hopper forward is warp-specialized (src/attend/kernels/ws.py), not just pipelined: a
one-partition Gluon forward (8 warps, 128 rows, K/V through a TMA ring) with and without the QK
product of block j+1 in flight while block j's softmax runs, against attend's warp-specialized
kernel, the tl core (KernelOptions.fwd_ws off) and cuDNN, in one process. Dense, non-causal, D=128,
bf16, (4, 16, 4096, 128).

    PYTHONPATH=src python benchmarks/probe_gluon.py
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from attend.kernels.core import RCP_LN2
from attend.kernels.ws_common import descriptor


@gluon.jit
def _load_kv(desc, smem, bars, row, slot):
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [row, 0], bars.index(slot), smem.index(slot))


@gluon.jit
def attn_fwd_gl(q_desc, k_desc, v_desc, o_desc, S, qk_scale,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                PREFETCH: gl.constexpr, num_warps: gl.constexpr):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * S + pid_m * BLOCK_M
    kv_row = bh * S
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    n = S // BLOCK_N
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, k_smem, k_bars, kv_row + i * BLOCK_N, i)
        _load_kv(v_desc, v_smem, v_bars, kv_row + i * BLOCK_N, i)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    if PREFETCH:
        acc = warpgroup_mma_init(acc)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    for j in range(0, n):
        slot = j % STAGES
        phase = (j // STAGES) & 1
        nxt = j + 1
        has_next = nxt < n
        if PREFETCH:
            # issue block j+1's QK before block j's softmax (slot (j+1)%STAGES; wrap index when past the end)
            nslot = nxt % STAGES
            mbarrier.wait(k_bars.index(nslot), (nxt // STAGES) & 1, pred=has_next)
            s_next = warpgroup_mma(q_smem, k_smem.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        if PREFETCH:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # block j-1's PV done; QK(j+1) may run on
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        # both warpgroups are past block j-1's PV and block j's QK: refill those slots
        gl.thread_barrier()
        if j + STAGES < n:
            _load_kv(k_desc, k_smem, k_bars, kv_row + (j + STAGES) * BLOCK_N, slot)
        if (j >= 1) & (j - 1 + STAGES < n):
            _load_kv(v_desc, v_smem, v_bars, kv_row + (j - 1 + STAGES) * BLOCK_N, (j - 1) % STAGES)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        mbarrier.wait(v_bars.index(slot), phase)
        acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
        m_i = m_new
        if PREFETCH:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))  # QK(j+1) done, PV(j) may run on
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            nslot = nxt % STAGES
            mbarrier.wait(k_bars.index(nslot), (nxt // STAGES) & 1, pred=has_next)
            s = warpgroup_mma(q_smem, k_smem.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / l_o[:, None]
    o_smem = gl.allocate_shared_memory(o_desc.dtype, o_desc.block_type.shape, o_desc.layout)
    o_smem.store(out.to(gl.bfloat16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], o_smem)
    tma.store_wait(pendings=0)


def run(q, k, v, BLOCK_M=128, BLOCK_N=128, STAGES=2, PREFETCH=True, num_warps=8):
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    grid = (S // BLOCK_M, B * H)
    attn_fwd_gl[grid](descriptor(q, BLOCK_M, D), descriptor(k, BLOCK_N, D), descriptor(v, BLOCK_N, D),
                      descriptor(o, BLOCK_M, D), S, D ** -0.5 * RCP_LN2.value, BLOCK_M, BLOCK_N, D, STAGES, PREFETCH,
                      num_warps=num_warps)
    return o


if __name__ == "__main__":
    from attend._layout import Band
    from attend.kernels import launch

    torch.manual_seed(0)
    B, H, S, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * B * H * S * S * D

    def attend_fwd(ws: bool):
        return launch.forward(q, k, v, None, 0.0, Band(), D ** -0.5, 0, options={"fwd_ws": ws})[0]

    variants = [("one partition, QK of the next block in flight", lambda: run(q, k, v, STAGES=2, PREFETCH=True)),
                ("one partition", lambda: run(q, k, v, STAGES=2, PREFETCH=False)),
                ("attend, warp-specialized (ws.py)", lambda: attend_fwd(True)),
                ("attend, tl core", lambda: attend_fwd(False))]
    for name, fn in variants:
        o = fn()
        ms = triton.testing.do_bench(fn, warmup=10, rep=100)
        print(f"{name:48s} max err {(o.float() - ref).abs().max().item():.3e}  {flops / ms * 1e-9:6.1f} TFLOP/s", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=10, rep=100)
    print(f"{'cuDNN':48s} {flops / ms * 1e-9:6.1f} TFLOP/s")

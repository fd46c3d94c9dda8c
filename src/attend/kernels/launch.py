"""Launchers for the Triton core: allocate outputs, pick tiles and grids, return ``(out, lse)``.

Same signatures as ``attend.cpu.blocked`` so the ops layer can swap them. Tensors may be CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (then a fixed small tile is used).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .._layout import Band, Packed
from . import core, versions, worklist
from .fastlaunch import Launcher
from .configs import (BWD_CONFIGS, EVEN_TILE, FWD_CONFIGS, INTERPRET_TILE, forward_tma, heuristic, pruner,
                      ws_backward)

ws, ws_bwd = versions.gluon_kernels()  # the Hopper Gluon kernels' modules, or None where Gluon is unusable
_RCP_LN2 = core.RCP_LN2.value
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The fixed configs (configs.heuristic, from the H100 sweep) unless ATTEND_AUTOTUNE=1, which
# benchmarks the candidate configs once per key instead (about a minute per new key).
_AUTOTUNE = os.environ.get("ATTEND_AUTOTUNE", "0") == "1"

_FWD_KEY = ["HEAD_DIM", "CAUSAL", "WINDOW", "HAS_MASK", "MASK_KEYS", "DROPOUT", "VARLEN", "PAGED", "L_BUCKET", "SEQ_BUCKET"]
_BWD_KEY = ["HEAD_DIM", "CAUSAL", "WINDOW", "HAS_MASK", "MASK_KEYS", "DROPOUT", "MASK_GRAD", "VARLEN", "DETERMINISTIC", "SEQ_BUCKET"]
_fwd = triton.autotune(FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": pruner("fwd")})(core.attn_fwd)
_bwd = triton.autotune(BWD_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": pruner("bwd")},
                       reset_to_zero=["DMASK", "DQ"])(core.attn_bwd)
# True/False overrides the fixed configs' dQ strategy (interpreter and fixed-config runs;
# tests flip it). Deterministic mode always wins: no atomics then.
FORCE_DQ_ATOMIC: bool | None = None
# True/False overrides whether the backward reads through TMA tensor descriptors (tests run the
# descriptor path under the interpreter with it; the H100 sweep times both).
FORCE_TMA: bool | None = None
# True/False overrides the backward's program order (core.attn_bwd's HEAD_MAJOR; tests flip it).
FORCE_HEAD_MAJOR: bool | None = None
# A full-size float mask's gradient is dS itself; with this on, the backward launches no dQ
# programs for it and computes dQ = scale * dS @ K as one batched GEMM on the stored dS (one
# product instead of the dQ programs' three, and no second read of the mask). H100, bias
# (4, 16, 4096, 4096) with grad: 272 TFLOP/s against 227 with dQ programs (RESULTS.md, session 5).
DQ_FROM_DS: bool = True


# Packed calls launch one program per block that exists, from host-built lists ordered heaviest
# first (``worklist.py``; core's WORKLIST), instead of cdiv(max length, block) slots per sequence,
# most of which exit at once when lengths are mixed (60% of the varlen benchmark's grid), and in
# whatever order the caller packed its sequences. Off until the H100 measures it
# (benchmarks/sweep.py --worklist); tests flip it.
VARLEN_WORKLIST: bool = False


# The forward reads K and V (and the tiles of a float mask with rows) through TMA tensor
# descriptors where the copy engine can read them (``_use_tma``; never paged), instead of pointer
# loads: fewer address computations per iteration (one copy per tile, issued by one thread) and
# no bounds masks. None: as the fixed config asks (configs._c's ``tma``: the masks, varlen and
# window tiles, where the H100 measured it faster; dense tiles lose with it, 492 vs 515 TFLOP/s at
# D=128, S=16k); True / False force it (benchmarks, tests).
FWD_TMA: bool | None = None


# The kernels run a band's edge blocks (causal diagonal, window edges) in the same loop as its
# inner blocks, masking them under a branch (core's ONE_LOOP), instead of one loop per edge (each
# loop pays its own pipeline fill and drain), where the fixed config says so (configs._c / _b's
# one_loop); True / False override it (benchmarks, tests). The forward takes it only where its
# loads need no bounds masks (TMA or EVEN).
FWD_ONE_LOOP: bool | None = None
BWD_ONE_LOOP: bool | None = None
# Most sm_90 D = 128 forwards (any band and length, no mask or a full-size float bias, packed
# sequences of one query length; ws.eligible says which) take the persistent warp-specialized Gluon
# kernel (ws.py, which cites its measurements). False: the core serves every call (benchmarks, tests).
FWD_WS: bool = True
# Their backwards without a mask (ws_bwd.eligible) take the Gluon dK / dV kernel (ws_bwd.py), then
# the core's dQ programs alone (core's DQ_ONLY). False: the core's one launch serves every backward.
BWD_WS: bool = True


_GRID_Y_MAX = 65535  # CUDA's cap on gridDim.y (x allows 2^31 - 1)

# Fixed-config launches skip JITFunction.run's per-call binding (fastlaunch.py).
_FWD_LAUNCH = Launcher(core.attn_fwd, volatile=("seed",))
_BWD_LAUNCH = Launcher(core.attn_bwd, volatile=("seed",))
_PRE_LAUNCH = Launcher(core.attn_bwd_preprocess)
_KEY_RANGE_LAUNCH = Launcher(core.key_range_kernel)

_DENSE_FLAGS = dict(VARLEN=False, SEQUSED=False, PAGED=False, PAGE_SIZE=16)


def _band_args(band: Band) -> tuple[tuple[int, int, int], dict]:
    """(diag, win_right, win_left) runtime args and the CAUSAL / WINDOW flags of a band."""
    return ((int(band.bottom_right), max(band.right, 0), max(band.left, 0)),
            dict(CAUSAL=band.right >= 0, WINDOW=band.left >= 0))


def _packed_args(packed: Packed):
    """(CU_Q, CU_K, SEQUSED_K, TABLE) pointers (unused ones alias cu_k), the table's row stride
    and the VARLEN/SEQUSED/PAGED/PAGE_SIZE flags."""
    cu_k = packed.cu_k if packed.cu_k is not None else packed.cu_q
    seqused = packed.seqused_k if packed.seqused_k is not None else cu_k
    table = packed.table if packed.table is not None else cu_k
    stride_table = packed.table.stride(0) if packed.table is not None else 0
    flags = dict(VARLEN=True, SEQUSED=packed.seqused_k is not None, PAGED=packed.table is not None,
                 PAGE_SIZE=packed.page_size)
    return (packed.cu_q, cu_k, seqused, table), stride_table, flags


def _mask_args(mask: torch.Tensor | None, B: int, H: int, L: int, S: int, like: torch.Tensor):
    """(tensor, 4 strides, is_bool) for the kernel; broadcast dims get stride 0 (never copied)."""
    if mask is None:
        return like, (0, 0, 0, 0), False
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    m4 = m4.expand(B, H, L, S)
    return m4, tuple(m4.stride()), m4.dtype == torch.bool


def _key_range(m4: torch.Tensor, mstr: tuple, mbool: bool, like: torch.Tensor):
    """(ext, (stride_b, stride_h), KEY_RANGE) for the kernels' key-range skip: a bool mask that
    does not vary over queries (a key-padding mask) gets its per-(b, h) span of kept keys
    computed by one small kernel, over the mask's own b/h extent (not the broadcast one)."""
    B, H, _, S = m4.shape
    if not mbool or mstr[2] != 0 or S == 0:
        return like, (0, 0), False
    Bm, Hm = (1 if mstr[0] == 0 else B), (1 if mstr[1] == 0 else H)
    ext = torch.empty((Bm, Hm, 4), dtype=torch.int32, device=m4.device)  # (lo, hi, run, unused)
    _KEY_RANGE_LAUNCH((Bm * Hm,), (m4, ext, mstr[0], mstr[1], mstr[3], Hm, S), dict(BLOCK=1024), 4, 3)
    ext = ext.expand(B, H, 4)
    return ext, (ext.stride(0), ext.stride(1)), True


def _even(L: int, S: int, D: int, packed) -> bool:
    """True when no tile crosses the end of L, S or the head dim (the kernels' EVEN)."""
    return packed is None and L % EVEN_TILE == 0 and S % EVEN_TILE == 0 and D == block_d(D)


def _use_tma(*tensors: torch.Tensor) -> bool:
    """The backward reads through TMA descriptors when Hopper's copy engine can read every tensor
    (compute capability >= 9, a unit last stride, 16-byte aligned base and strides). Packed
    (varlen) calls too since session 5: 304 vs 271 TFLOP/s with pointer loads (mixed lengths), 363
    vs 318 (sliding window) on the H100; run 13's 149 vs 247 predates the fixed configs. FORCE_TMA
    overrides everything but the unit last stride, which the kernels' descriptors assume."""
    if any(t.stride(-1) != 1 for t in tensors):
        return False
    if FORCE_TMA is not None:
        if FORCE_TMA and tensors[0].is_cuda:
            _ensure_allocator()
        return FORCE_TMA
    if _INTERPRET or not tensors[0].is_cuda or _capability_major(tensors[0].device.index) < 9:
        return False
    for t in tensors:
        elem = t.element_size()
        if t.data_ptr() % 16 or any(st * elem % 16 for st in t.stride()[:-1]):
            return False
    _ensure_allocator()
    return True


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _gluon_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the Hopper Gluon kernels run: an sm_90 device, Gluon importable."""
    return ws is not None and t.is_cuda and _capability_major(t.device.index) == 9


def _ensure_allocator() -> None:
    """Kernels that build tensor descriptors on the device need Triton's scratch allocator; set
    one (PyTorch's caching allocator) unless the user already has."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _cdiv(a: int, b: int) -> int:
    # Plain ints: triton.cdiv is a constexpr function, several microseconds per host call.
    return -(-a // b)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, and to 16: tl.dot needs K >= 16 (loads mask the pad)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _l_bucket(L: int) -> int:
    return 1 if L <= 16 else (64 if L <= 64 else 128)


def _seq_bucket(S: int) -> int:
    # The H100 runs picked different backward tiles at S=1024 and S=16384 (RESULTS.md).
    return 1024 if S <= 1024 else (4096 if S <= 4096 else 16384)


def _fixed_config(kind: str, flags: dict, elem: int, l_bucket=None, seq_bucket=16384, group=1):
    """(meta, num_warps, num_stages) of the launch: the interpreter's small tile or the heuristic
    config, with the backward's dQ strategy settled; None when the autotuner picks."""
    if _AUTOTUNE and not _INTERPRET:
        return None
    if _INTERPRET:  # the interpreter ignores warps and stages
        t = INTERPRET_TILE
        meta = dict(BLOCK_M=t, BLOCK_N=t, LAZY_RESCALE=True, ONE_LOOP=True) if kind == "fwd" else dict(
            BLOCK_M1=t, BLOCK_N1=t, BLOCK_M2=t, BLOCK_N2=t, DQ_ATOMIC=False, ONE_LOOP=True)
        warps, stages = 4, 1
    else:
        c = heuristic(kind, flags["BLOCK_D"], l_bucket, flags, elem, seq_bucket, group)
        meta, warps, stages = dict(c.kwargs), c.num_warps, c.num_stages
    if kind == "bwd":
        if FORCE_HEAD_MAJOR is not None:
            meta["HEAD_MAJOR"] = FORCE_HEAD_MAJOR
        if FORCE_DQ_ATOMIC is not None:
            meta["DQ_ATOMIC"] = FORCE_DQ_ATOMIC
        if BWD_ONE_LOOP is not None:
            meta["ONE_LOOP"] = BWD_ONE_LOOP
        meta["DQ_ATOMIC"] = meta["DQ_ATOMIC"] and not flags["DETERMINISTIC"]
    elif FWD_ONE_LOOP is not None:
        meta["ONE_LOOP"] = FWD_ONE_LOOP
    return meta, warps, stages


def _launch(tuned, launcher: Launcher, grid_of, args, flags, config) -> None:
    """Launch with ``config`` (``_fixed_config``) through ``launcher``, or through the autotuner
    ``tuned`` when it is None. ``grid_of(meta)`` gives the grid from the tile sizes."""
    if config is None:
        tuned[grid_of](*args, **flags)
        return
    meta, warps, stages = config
    launcher(grid_of(meta), args, {**flags, **meta}, warps, stages)


def forward(q, k, v, mask, dropout_p: float, causal: int, scale: float, seed: int):
    """Dense attention on (B, H, L, D) tensors; returns (out, lse (B, H, L))."""
    B, H, L, D = q.shape
    out = torch.empty((B, H, L, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if L == 0:
        return out, lse
    _forward(q, k, v, tuple(k.stride()), tuple(v.stride()), out, lse, (H * L, L), B, k.shape[1], L, k.shape[2],
             mask, dropout_p, Band.from_causal(causal), scale, seed, None)
    return out, lse


def varlen_forward(q, k, v, packed: Packed, max_q: int, max_k: int, scale: float, band: Band):
    """Packed attention: q (T, H, D); k/v (T_k, Hkv, D), or a (pages, page_size, Hkv, D) pool
    when ``packed.table`` is set. Returns (out (T, H, D), lse (H, T))."""
    T, H, D = q.shape
    out = torch.empty((T, H, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    n = packed.cu_q.numel() - 1
    if T == 0 or n == 0 or max_q == 0:
        return out, lse.fill_(float("-inf"))
    if packed.table is not None:  # pool (pages, slot, head, d) -> strides (page, head, slot, d)
        kstr = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
        vstr = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
        hkv = k.shape[2]
    else:
        kstr, vstr, hkv = tuple(_packed4(k).stride()), tuple(_packed4(v).stride()), k.shape[1]
    _forward(_packed4(q), k, v, kstr, vstr, _packed4(out), lse, (0, T), n, hkv, max_q, max_k,
             None, 0.0, band, scale, 0, packed)
    return out, lse


def _packed4(t: torch.Tensor) -> torch.Tensor:
    """(T, H, D) -> the (1, H, T, D) view the kernels index (no copy)."""
    return t.unsqueeze(0).transpose(1, 2)


def _forward(q, k, v, kstr, vstr, out, lse, lse_strides, B, Hkv, L, S, mask, dropout_p, band: Band, scale, seed,
             packed: Packed | None):
    H, D = q.shape[1], q.shape[3]
    if scale < 0:  # the kernel takes each row's max of the unscaled scores: (-q) . k * |scale| is the same score
        q, scale = -q, -scale
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    band_args, band_flags = _band_args(band)
    if (FWD_WS and _gluon_device(q) and versions.usable("gluon_forward")
            and ws.eligible(q, k, v, mask, mstr, mbool, dropout_p, packed, L)):
        _ensure_allocator()
        if versions.run_experimental("gluon_forward", ws.forward, q, k, v, None if mask is None else m4, out, lse,
                                     lse_strides, scale, band_args, band_flags, packed, B, L, S):
            return
    ext, ext_strides, key_range = _key_range(m4, mstr, mbool, q)
    if packed is None:
        seq_ptrs, stride_table, seq_flags = (q, q, q, q), 0, _DENSE_FLAGS
    else:
        seq_ptrs, stride_table, seq_flags = _packed_args(packed)
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), **band_flags, HAS_MASK=mask is not None, MASK_BOOL=mbool,
                 MASK_KEYS=mask is not None and mstr[2] == 0, KEY_RANGE=key_range, DROPOUT=dropout_p > 0.0,
                 **seq_flags, EVEN=_even(L, S, D, packed), DOT_PRECISION=_dot_precision(q.dtype))
    config = _fixed_config("fwd", flags, q.element_size(), _l_bucket(L), _seq_bucket(S), H // Hkv)
    asked = config is not None and config[0].pop("TMA", False)
    tma_kv, tma_mask = forward_tma(asked if FWD_TMA is None else FWD_TMA, flags)
    flags["USE_TMA"] = tma_kv and _use_tma(q, k, v)
    flags["MASK_TMA"] = flags["USE_TMA"] and tma_mask and _use_tma(m4)
    work = _work_list(packed, band, config, (("q", "BLOCK_M"),), q.device)
    flags["WORKLIST"] = work is not None
    flags["GRID_1D"] = _one_axis(B * H)
    args = (q, k, v, out, lse, m4, *seq_ptrs, ext, q if work is None else work[0], *q.stride(), *kstr, *vstr,
            *out.stride(), *mstr, *lse_strides, stride_table, *ext_strides, H, H // Hkv, L, S, scale * _RCP_LN2,
            *band_args, float(dropout_p), int(seed), _l_bucket(L), _seq_bucket(S))

    def grid(m):  # every sequence's slots, or the list's items (core.attn_fwd)
        return _grid(_cdiv(L, m["BLOCK_M"]), B * H) if work is None else (work[1][0] * H,)

    _launch(_fwd, _FWD_LAUNCH, grid, args, flags, config)


def _one_axis(heads: int) -> bool:
    """The kernels' GRID_1D (``core._grid_cell``): ``heads`` programs per block pass CUDA's 65535
    cap on a grid's y."""
    return heads > _GRID_Y_MAX


def _grid(blocks: int, heads: int) -> tuple:
    """(blocks, heads), or one axis of their product where ``_one_axis(heads)``."""
    return (blocks * heads,) if _one_axis(heads) else (blocks, heads)


def _work_list(packed: Packed | None, band: Band, config, spec: tuple, device: torch.device):
    """(WORK, item counts) for a packed launch with the fixed ``config`` (``worklist.work_tensor``), or
    None: VARLEN_WORKLIST is off, the call is dense, the autotuner picks the tiles, the call is
    paged or has seqused_k, a CUDA graph is being captured (no host read then), or too many items."""
    if not VARLEN_WORKLIST or packed is None or config is None:
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    lens = worklist.packed_lengths(packed)
    if lens is None:
        return None
    return worklist.work_tensor(*lens, band, tuple((kind, config[0][block]) for kind, block in spec), device)


def mask_grad_is_atomic(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> bool:
    """A mask smaller than (B, H, L, S) collects its gradient by atomic adds (nondeterministic)."""
    m4 = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return tuple(m4) != tuple(shape)


def backward(dout, q, k, v, out, lse, mask, dropout_p: float, causal: int, scale: float, seed: int, mask_grad: bool,
             dlse=None):
    """Gradients of ``forward``: (dq, dk, dv, dmask or None). ``dlse``: gradient into the lse."""
    B, H, L, D = q.shape
    S = k.shape[2]
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if L == 0 or S == 0:
        dmask = torch.zeros_like(mask) if mask_grad else None
        return torch.zeros_like(q), dk.zero_(), dv.zero_(), dmask
    # d(mask) in the mask's own (possibly broadcast) shape; the kernel addresses it through
    # the expanded view's strides (0 on broadcast dims). A full-size mask's gradient is stored
    # in its own dtype; a broadcast one is summed by fp32 atomics and cast after.
    atomic = mask_grad and mask_grad_is_atomic(mask, (B, H, L, S))
    if mask_grad:
        # Without a band every tile is visited, so every element of a full-size dS is written:
        # no zero fill (0.7 ms for a 2 GiB bias). Atomics add into zeros; causal skips tiles.
        fill = torch.zeros if atomic or causal else torch.empty
        dmask = fill(mask.shape, dtype=torch.float32 if atomic else mask.dtype, device=q.device)
        dmstr = _mask_args(dmask, B, H, L, S, q)[1]
    else:
        dmask, dmstr = _no_dmask(q), (0, 0, 0, 0)
    dq = _backward(dout, q, k, v, out, lse, dlse, (H * L, L), dk, dv, B, L, S, mask, dmask, dmstr, mask_grad, atomic,
                   dropout_p, Band.from_causal(causal), scale, seed, None,
                   dq_programs=not (DQ_FROM_DS and mask_grad and not atomic))
    if dq is None:  # no dQ programs ran: dQ from the stored dS
        dq = _dq_from_ds(dmask, k, scale, B, H, L)
    return dq.to(q.dtype), dk, dv, (dmask.to(mask.dtype) if mask_grad else None)


def _dq_from_ds(ds: torch.Tensor, k: torch.Tensor, scale: float, B: int, H: int, L: int) -> torch.Tensor:
    """dQ = scale * dS @ K for a contiguous full-size dS (B, H, L, S) in q's dtype; GQA groups
    share K. The scale rides in the GEMM (alpha): one rounding, no second pass over dQ."""
    Hkv, S, D = k.shape[1], k.shape[2], k.shape[3]
    ds3 = ds.reshape(B * Hkv, (H // Hkv) * L, S)
    k3 = k.reshape(B * Hkv, S, D)
    dq = torch.baddbmm(ds3.new_empty(ds3.shape[0], ds3.shape[1], D), ds3, k3, beta=0.0, alpha=scale)
    return dq.view(B, H, L, D)


def varlen_backward(dout, q, k, v, out, lse, packed: Packed, max_q: int, max_k: int, scale: float, band: Band,
                    dlse=None):
    """Gradients of ``varlen_forward`` (no paging, no seqused_k): (dq, dk, dv), packed. Every key
    row belongs to a sequence (cu_seq_k ends at T_k, checked by the caller), whose dK/dV program
    writes it, so dk and dv need no zero fill (two full writes: 3% of the varlen benchmark)."""
    n = packed.cu_q.numel() - 1
    if q.shape[0] == 0 or n == 0 or max_q == 0 or max_k == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    T = q.shape[0]
    dmask = _no_dmask(q)
    dq4 = _backward(_packed4(dout), _packed4(q), _packed4(k), _packed4(v), _packed4(out), lse, dlse, (0, T),
                    _packed4(dk), _packed4(dv), n, max_q, max_k, None, dmask, (0, 0, 0, 0), False, False,
                    0.0, band, scale, 0, packed)
    return dq4[0].transpose(0, 1).to(q.dtype), dk, dv


def _no_dmask(like: torch.Tensor) -> torch.Tensor:
    """DMASK when there is no mask gradient: the kernel never touches it, so any tensor will do,
    except under the autotuner, which zeroes DMASK between trials (a buffer of its own then)."""
    return torch.zeros(1, dtype=torch.float32, device=like.device) if _AUTOTUNE else like


_STAT_PAD = core.STAT_PAD.value


def _row_stats(out, dout, lse, dlse, lse_strides, B: int, L: int, packed: Packed | None):
    """(NLSE2, Delta, their (b, h) strides): the backward's per-row inputs (``attn_bwd_preprocess``),
    one fp32 buffer of two halves. Rows per head: L rounded up to STAT_PAD (dense), or T plus
    STAT_PAD per sequence (packed: each sequence starts on an aligned row, ``core._stat_row0``)."""
    H, rows = out.shape[1], out.shape[2]
    per_head = _cdiv(L if packed is None else rows + _STAT_PAD * B, _STAT_PAD) * _STAT_PAD
    stats = torch.empty((2, out.shape[0], H, per_head), dtype=torch.float32, device=out.device)
    nlse2, delta = stats[0], stats[1]
    if dlse is not None:
        dlse = dlse.contiguous()  # the lse's layout; an expanded gradient (lse.sum()) has stride 0
    flags = dict(HEAD_DIM=out.shape[3], BLOCK_D=block_d(out.shape[3]), BLOCK_M=_STAT_PAD, VARLEN=packed is not None,
                 HAS_DLSE=dlse is not None, GRID_1D=_one_axis(B * H))
    _PRE_LAUNCH(_grid(_cdiv(L, _STAT_PAD), B * H),
                (out, dout, lse, lse if dlse is None else dlse, nlse2, delta, packed.cu_q if packed else lse,
                 *out.stride(), *dout.stride(), *lse_strides, *nlse2.stride()[:2], H, L), flags, 8, 1)
    return nlse2, delta, nlse2.stride()[:2]


def _backward(dout, q, k, v, out, lse, dlse, lse_strides, dk, dv, B, L, S, mask, dmask, dmstr, mask_grad, atomic,
              dropout_p, band: Band, scale, seed, packed: Packed | None, dq_programs: bool = True) -> torch.Tensor | None:
    """Launch the backward; returns dQ laid out like ``q``: fp32 when dQ may be added by atomics
    (then zeroed first), else in q's dtype, written once by the dQ programs (no fp32 round trip).
    ``dq_programs=False``: skip the dQ programs where the fixed config has them (returns None:
    the caller computes dQ)."""
    H, D, Hkv = q.shape[1], q.shape[3], k.shape[1]
    BLOCK_D = block_d(D)
    nlse2, delta, stat_strides = _row_stats(out, dout, lse, dlse, lse_strides, B, L, packed)
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    ext, ext_strides, key_range = _key_range(m4, mstr, mbool, q)
    band_args, band_flags = _band_args(band)
    cu_q, cu_k = (q, q) if packed is None else _packed_args(packed)[0][:2]
    flags = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, **band_flags, HAS_MASK=mask is not None, MASK_BOOL=mbool,
                 MASK_KEYS=mask is not None and mstr[2] == 0, KEY_RANGE=key_range, DROPOUT=dropout_p > 0.0,
                 MASK_GRAD=bool(mask_grad), MASK_GRAD_ATOMIC=atomic, VARLEN=packed is not None,
                 DETERMINISTIC=torch.are_deterministic_algorithms_enabled(), EVEN=_even(L, S, D, packed),
                 USE_TMA=_use_tma(q, dout, k, v), HEAD_MAJOR=False,  # a config may turn it on
                 DOT_PRECISION=_dot_precision(q.dtype))
    config = _fixed_config("bwd", flags, q.element_size(), seq_bucket=_seq_bucket(max(L, S)), group=H // Hkv)
    # The autotuner may pick a config with dQ by atomics (never in deterministic mode).
    dq_atomic = config[0]["DQ_ATOMIC"] if config is not None else not flags["DETERMINISTIC"]
    skip_dq = not dq_programs and config is not None and not dq_atomic
    if skip_dq:  # the head-major numbering assumes dQ programs
        config = (dict(config[0], HEAD_MAJOR=False), *config[1:])
        dq = q  # never written
    else:
        dq = torch.zeros_like(q, dtype=torch.float32) if dq_atomic else torch.empty_like(q)
    dq_only = ws_backward(BLOCK_D, _seq_bucket(max(L, S)))
    gluon = (BWD_WS and dq_only is not None and config is not None and not dq_atomic and not skip_dq
             and _gluon_device(q) and versions.usable("gluon_dkdv")
             and ws_bwd.eligible(q, k, v, dout, mask, dropout_p, packed, L, S))
    if gluon:  # dK / dV from the Gluon kernel, then the dQ programs alone, numbered in key order
        _ensure_allocator()
        gluon = versions.run_experimental("gluon_dkdv", ws_bwd.dkdv, q, k, v, dout, nlse2, delta, stat_strides, dk, dv,
                                          scale, band_args, band_flags, packed, B, L, S)
    flags["DQ_ONLY"] = gluon
    if gluon:
        config = (dict(dq_only.kwargs, HEAD_MAJOR=False), dq_only.num_warps, dq_only.num_stages)
    work = _work_list(packed, band, config, (("k", "BLOCK_N1"), ("q", "BLOCK_M2")), q.device)
    flags["WORKLIST"] = work is not None
    n_kv_items, n_q_items = (0, 0) if work is None else work[1]
    args = (q, k, v, dout, nlse2, delta, dq, dk, dv, m4, dmask, cu_q, cu_k, ext, q if work is None else work[0],
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *dk.stride(), *dv.stride(), *mstr,
            *dmstr, *stat_strides, *ext_strides, B if work is None else 1, H, H // Hkv, L, S, scale * _RCP_LN2, scale,
            *band_args, float(dropout_p), int(seed), n_kv_items, n_q_items, _seq_bucket(max(L, S)))

    def grid(m):  # dK/dV programs unless DQ_ONLY, then dQ programs unless dQ is added by atomics (core.attn_bwd)
        no_q = m["DQ_ATOMIC"] or skip_dq
        if work is not None:  # the lists span every sequence
            n_kv, n_q = n_kv_items * Hkv, n_q_items * H
        else:
            n_kv, n_q = _cdiv(S, m["BLOCK_N1"]) * B * Hkv, _cdiv(L, m["BLOCK_M2"]) * B * H
        return ((0 if gluon else n_kv) + (0 if no_q else n_q),)

    _launch(_bwd, _BWD_LAUNCH, grid, args, flags, config)
    return None if skip_dq else dq

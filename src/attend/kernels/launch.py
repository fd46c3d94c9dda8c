"""Launchers for the Triton core: allocate outputs, pick tiles and grids, return ``(out, lse)``.

Same signatures as ``attend.cpu.blocked`` so the ops layer can swap them. Tensors may be CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (then a fixed small tile is used). Every
tuning choice comes from a ``KernelOptions`` (``options.py``): the ``options=`` argument, else the
options in force. Kernel arguments are passed by name (``fastlaunch.Launcher`` orders them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from .._hostcache import small_tensor
from .._layout import Band, Packed, empty_in_layout, is_rows, rows_call, rows_lse
from . import core, versions, worklist
from .configs import BWD_CONFIGS, EVEN_TILE, FWD_CONFIGS, INTERPRET_TILE, WS_BWD_MIN_SEQ_BUCKET, forward_tma, \
    heuristic, pruner, ws_backward
from .configs import ROWS_PACKED_CAUSAL_FWD_MIN_L, flex_bwd_tile, flex_tile, fp32_rule
from .fastlaunch import Launcher
from .options import KernelOptions, resolve
from .versions import COMPILE_OPTIONS

ws, ws_bwd = versions.gluon_kernels()  # the Hopper Gluon kernels' modules, or None where Gluon is unusable
# the first launches' Triton cache keys, hashed while the process sets up: a forward and backward's kernels
versions.warm_compile_key((core.attn_fwd, core.attn_bwd_preprocess, core.attn_bwd)
                          + ((ws.attn_fwd_ws, ws_bwd.attn_bwd_dkdv_ws) if ws is not None else ()))
_RCP_LN2 = core.RCP_LN2.value

_FWD_KEY = ["HEAD_DIM", "CAUSAL", "WINDOW", "HAS_MASK", "MASK_KEYS", "DROPOUT", "VARLEN", "PAGED", "L_BUCKET", "SEQ_BUCKET",
            "DOT_PRECISION"]
_BWD_KEY = ["HEAD_DIM", "CAUSAL", "WINDOW", "HAS_MASK", "MASK_KEYS", "DROPOUT", "MASK_GRAD", "VARLEN", "DETERMINISTIC", "SEQ_BUCKET",
            "DOT_PRECISION"]
_fwd = triton.autotune(FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": pruner("fwd")})(core.attn_fwd)
_bwd = triton.autotune(BWD_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": pruner("bwd")},
                       reset_to_zero=["DMASK", "DQ"])(core.attn_bwd)

_GRID_Y_MAX = 65535  # CUDA's cap on gridDim.y (x allows 2^31 - 1)

# Fixed-config launches skip JITFunction.run's per-call binding (fastlaunch.py). A decode loop's
# keys grow by one per call: their length, a concatenated cache's batch and head strides of K and
# V, and a padding mask's strides over them ((B, 1, 1, S): its batch stride is S) change at every
# call, as the dropout seed does. The launcher keys those by Triton's class of each value, so a new
# length of a known class hits its exact cache rather than missing it and classing every argument.
_DECODE_VOLATILE = ("seed", "S_max", "stride_kb", "stride_kh", "stride_vb", "stride_vh", "stride_maskb",
                    "stride_maskh", "stride_maskm")
_FWD_LAUNCH = Launcher(core.attn_fwd, volatile=_DECODE_VOLATILE)
_BWD_LAUNCH = Launcher(core.attn_bwd, volatile=("seed",))
_PRE_LAUNCH = Launcher(core.attn_bwd_preprocess)
_KEY_RANGE_LAUNCH = Launcher(core.key_range_kernel, volatile=("S", "stride_mb", "stride_mh"))

_DENSE_FLAGS = dict(VARLEN=False, SEQUSED=False, PAGED=False, PAGE_SIZE=16)
# attn_fwd's flex inputs where there is no flex call: None specializes away (core.attn_fwd's FLEX)
_NO_FLEX = dict(FLEX_LISTS=None, SCORE_PTRS=None, SCORE_META=None, MASK_PTRS=None, MASK_META=None)
# flex forwards: the block lists and the mods' captures (tuples of tensors) keyed by their tensors
_FLEX_FWD_LAUNCH = Launcher(core.attn_fwd, volatile=_DECODE_VOLATILE, nested=tuple(_NO_FLEX))
_NO_FLEX_BWD = dict(_NO_FLEX, SCORE_GRADS=None)  # attn_bwd's, likewise


@dataclass(frozen=True)
class Tiles:
    """One launch's tiles and config flags (the kernel's constexprs: BLOCK_*, ONE_LOOP, DQ_ATOMIC,
    HEAD_MAJOR, ...), warps and pipeline stages."""

    meta: dict
    warps: int
    stages: int

    def with_meta(self, **changes) -> "Tiles":
        return Tiles({**self.meta, **changes}, self.warps, self.stages)

    def __str__(self) -> str:
        m = self.meta
        tiles = (f"{m['BLOCK_M']}x{m['BLOCK_N']}" if "BLOCK_M" in m
                 else f"{m['BLOCK_M1']}x{m['BLOCK_N1']}/{m['BLOCK_M2']}x{m['BLOCK_N2']}")
        flags = [k for k in ("HEAD_MAJOR", "DQ_ATOMIC", "ONE_LOOP", "LAZY_RESCALE", "TMA") if m.get(k)]
        return f"{tiles} w{self.warps} s{self.stages}" + "".join(f" {f}" for f in flags)


def _names(*groups: tuple[str, str]) -> tuple[str, ...]:
    """The kernels' stride parameter names, stride_<prefix><dim>, for (prefix, dims) groups in order."""
    return tuple(f"stride_{prefix}{d}" for prefix, dims in groups for d in dims)


# Every stride argument of a launch, by name, in the order its values are listed at the launch.
_FWD_STRIDES = _names(("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"), ("o", "bhmd"), ("mask", "bhmn"), ("lse", "bh"),
                      ("table", "b"), ("ext", "bh"))
_BWD_STRIDES = _names(("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"), ("do", "bhmd"), ("dq", "bhmd"), ("dk", "bhnd"),
                      ("dv", "bhnd"), ("mask", "bhmn"), ("dmask", "bhmn"), ("stat", "bh"), ("ext", "bh"))
_PRE_STRIDES = _names(("o", "bhmd"), ("do", "bhmd"), ("lse", "bh"), ("stat", "bh"))


def band_args(band: Band) -> tuple[dict, dict]:
    """The kernels' runtime band arguments (diag, win_right, win_left) and CAUSAL / WINDOW flags."""
    return (dict(diag=int(band.bottom_right), win_right=max(band.right, 0), win_left=max(band.left, 0)),
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
    return dict(CU_Q=packed.cu_q, CU_K=cu_k, SEQUSED_K=seqused, TABLE=table), stride_table, flags


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
    _KEY_RANGE_LAUNCH((Bm * Hm,), dict(MASK=m4, EXT=ext, stride_mb=mstr[0], stride_mh=mstr[1], stride_mn=mstr[3],
                                       Hm=Hm, S=S), dict(BLOCK=1024), 4, 3)
    ext = ext.expand(B, H, 4)
    return ext, (ext.stride(0), ext.stride(1)), True


def _even(L: int, S: int, D: int, packed) -> bool:
    """True when no tile crosses the end of L, S or the head dim (the kernels' EVEN)."""
    return packed is None and L % EVEN_TILE == 0 and S % EVEN_TILE == 0 and D == block_d(D)


def use_tma(opts: KernelOptions, *tensors: torch.Tensor, forced: bool | None = None) -> bool:
    """The kernels read through TMA descriptors when Hopper's copy engine can read every tensor
    (compute capability >= 9, a unit last stride, 16-byte aligned base and strides). Packed
    (varlen) calls too: 304 vs 271 TFLOP/s with pointer loads (mixed lengths), 363 vs 318 (sliding
    window) on the H100 (docs/kernels.md, Tuning: windows and packed sequences).
    ``forced`` (KernelOptions.tma) overrides everything but the unit last stride, which the
    kernels' descriptors assume."""
    if any(t.stride(-1) != 1 for t in tensors):
        return False
    if forced is not None:
        if forced and tensors[0].is_cuda:
            _ensure_allocator()
        return forced
    if opts.interpret or not tensors[0].is_cuda or _capability_major(tensors[0].device.index) < 9:
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


def _dot_precision(dtype: torch.dtype, opts: KernelOptions) -> str:
    """The dots' ``input_precision``: fp32 without ``allow_tf32`` as ``KernelOptions.fp32_dots`` says
    ("ieee" or "tf32x3"), else "tf32" (what 16-bit inputs ignore)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return opts.fp32_dots
    return "tf32"


def _cdiv(a: int, b: int) -> int:
    # Plain ints: triton.cdiv is a constexpr function, several microseconds per host call.
    return -(-a // b)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, and to 16: tl.dot needs K >= 16 (loads mask the pad)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def l_bucket(L: int) -> int:
    return 1 if L <= 16 else (64 if L <= 64 else 128)


def seq_bucket(S: int) -> int:
    # The H100 runs picked different backward tiles at S=1024 and S=16384 (docs/kernels.md, Tuning: dense tiles).
    return 1024 if S <= 1024 else (4096 if S <= 4096 else 16384)


def pick_tiles(kind: str, flags: dict, elem: int, opts: KernelOptions, l_bucket=None, seq_bucket=16384,
               group=1) -> Tiles | None:
    """The launch's config before any override: the interpreter's small tile, the options' forced
    config, or the fixed one (configs.heuristic); None when the autotuner picks."""
    if opts.interpret:  # the interpreter ignores warps and stages
        t = INTERPRET_TILE
        meta = dict(BLOCK_M=t, BLOCK_N=t, LAZY_RESCALE=True, ONE_LOOP=True) if kind == "fwd" else dict(
            BLOCK_M1=t, BLOCK_N1=t, BLOCK_M2=t, BLOCK_N2=t, DQ_ATOMIC=False, ONE_LOOP=True)
        return Tiles(meta, 4, 1)
    forced = opts.fwd_config if kind == "fwd" else opts.bwd_config
    # (fp32 with IEEE or TF32x3 dots is not autotuned: an IEEE backward candidate's FMA loops take up
    # to a minute to build and ptxas collapses some candidates' registers, and TF32x3 triples the
    # shared memory the prune estimates; configs' "fp32_ieee" / "fp32_tf32x3" rules)
    if forced is None and opts.autotune and not fp32_rule(flags.get("DOT_PRECISION", "tf32")):
        return None
    c = forced or heuristic(kind, flags["BLOCK_D"], l_bucket, flags, elem, seq_bucket, group)
    return Tiles(dict(c.kwargs), c.num_warps, c.num_stages)


def override(kind: str, tiles: Tiles | None, flags: dict, opts: KernelOptions) -> Tiles | None:
    """``tiles`` with the options' overrides (program order, dQ strategy, one loop) applied; the
    backward's dQ by atomics never in deterministic mode."""
    if tiles is None:
        return None
    if kind == "fwd":
        return tiles if opts.fwd_one_loop is None else tiles.with_meta(ONE_LOOP=opts.fwd_one_loop)
    meta = dict(tiles.meta)
    if opts.head_major is not None:
        meta["HEAD_MAJOR"] = opts.head_major
    if opts.dq_atomic is not None:
        meta["DQ_ATOMIC"] = opts.dq_atomic
    if opts.bwd_one_loop is not None:
        meta["ONE_LOOP"] = opts.bwd_one_loop
    meta["DQ_ATOMIC"] = meta["DQ_ATOMIC"] and not flags["DETERMINISTIC"]
    return Tiles(meta, tiles.warps, tiles.stages)


def _launch(tuned, launcher: Launcher, grid_of, args: dict, flags: dict, tiles: Tiles | None) -> None:
    """Launch with ``tiles`` through ``launcher``, or through the autotuner ``tuned`` when it is
    None. ``grid_of(meta)`` gives the grid from the tile sizes."""
    if tiles is None:
        versions.await_compile_key()
        tuned[grid_of](*launcher.ordered(args), **flags)
        return
    launcher(grid_of(tiles.meta), args, {**flags, **tiles.meta}, tiles.warps, tiles.stages)


def forward(q, k, v, mask, dropout_p: float, band: Band, scale: float, seed: int,
            options: KernelOptions | dict | None = None, score=None):
    """Dense attention on (B, H, L, D) tensors over ``band``; returns (out, lse (B, H, L)). A model's
    row views (``_layout.rows_call``) get out in q's layout and lse in ``rows_lse``'s, and run as
    packed sequences where ``_rows_packed`` says so; other calls get contiguous ones. ``score``: a
    flex score_mod's (generated functions, ``codegen.CaptureArgs``) applied to every score (no mask
    or dropout), served by the Gluon forward only: None where it does not serve the call (then
    ``flex_forward`` runs the core's score hooks)."""
    B, H, L, D = q.shape
    _check_head_dims(q, k, v)
    rows = rows_call(q, k, v, mask, dropout_p)
    if rows:
        out, lse = empty_in_layout(q, (*q.shape[:3], v.shape[-1])), rows_lse(q)
    else:
        out = torch.empty((B, H, L, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    opts = resolve(options)
    packed = _rows_packed(opts, q, k, v, band=band) if rows else None
    if packed is not None:  # B sequences of L queries and S keys, (T, H, D) rows
        qt, kt, vt = _tokens(q), _tokens(k), _tokens(v)
        T = B * L
        ran = _forward(packed4(qt), kt, vt, tuple(packed4(kt).stride()), tuple(packed4(vt).stride()),
                       packed4(_tokens(out, True)), lse.permute(1, 0, 2).view(H, T), (0, T), B, k.shape[1], L,
                       k.shape[2], None, 0.0, band, scale, 0, packed, opts, score)
    else:
        ran = _forward(q, k, v, tuple(k.stride()), tuple(v.stride()), out, lse, lse.stride()[:2], B, k.shape[1], L,
                       k.shape[2], mask, dropout_p, band, scale, seed, None, opts, score)
    return (out, lse) if ran else None


def _check_head_dims(q, k, v) -> None:
    """The core's one head dim: q, k and v share it (what SDPA's checks refuse earlier, for direct
    callers of the launchers or the ops)."""
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"attend's Triton kernels need one head dim for query, key and value; got "
                         f"{q.shape[-1]}, {k.shape[-1]} and {v.shape[-1]}")


def _tokens(t: torch.Tensor, written: bool = False) -> torch.Tensor:
    """(B, H, L, E) -> (B * L, H, E): a view of a row view (``_layout.is_rows``), else a copy; a
    view always where the kernel writes it (``written``: .view raises rather than copy)."""
    t2 = t.transpose(1, 2)
    return t2.view(-1, t.shape[1], t.shape[3]) if written else t2.reshape(-1, t.shape[1], t.shape[3])


def _offsets(n: int, L: int, S: int, device: torch.device) -> Packed:
    """The offsets of ``n`` packed sequences of L queries and S keys each (a row call's). Made once
    per shape (``_uniform``), except while a CUDA graph is being captured: kernels recorded then
    run only at replay, so a tensor made then holds its values only in that graph's replays."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        cu_q = torch.arange(0, (n + 1) * L, L, dtype=torch.int32, device=device)
        cu_k = cu_q if S == L else torch.arange(0, (n + 1) * S, S, dtype=torch.int32, device=device)
        return Packed(cu_q, cu_k, uniform=True)
    return _uniform(n, L, S, device)


@functools.lru_cache(maxsize=64)
def _uniform(n: int, L: int, S: int, device: torch.device) -> Packed:
    # Made on the host and copied synchronously: there on every stream before the first use. Never
    # inference tensors (a first call under torch.inference_mode): later calls read their version.
    with torch.inference_mode(False):
        cu_q = torch.arange(0, (n + 1) * L, L, dtype=torch.int32).to(device)
        cu_k = cu_q if S == L else torch.arange(0, (n + 1) * S, S, dtype=torch.int32).to(device)
    return Packed(cu_q, cu_k, uniform=True)


def rows_forward_route(q, k, v, band: Band = Band(), options: KernelOptions | dict | None = None) -> str:
    """How ``forward`` runs the row call q, k, v over ``band``: "packed" (B packed sequences,
    ``_rows_packed``), "gluon" (the Gluon forward's Q_ROWS mode beside contiguous K / V,
    KernelOptions.rows_q_gluon) or "core" (a strided dense call)."""
    opts = resolve(options)
    if _rows_packed(opts, q, k, v, band=band) is not None:
        return "packed"
    if (opts.fwd_ws and _gluon_device(q) and versions.usable("gluon_forward")
            and ws.eligible(q, k, v, None, (0, 0, 0, 0), False, 0.0, None, q.shape[2], q_rows=opts.rows_q_gluon)):
        return "gluon"
    return "core"


def _rows_packed(opts: KernelOptions, q, k, v, dout=None, band: Band = Band()) -> Packed | None:
    """The ``Packed`` a row call (``_layout.rows_call``) runs as, or None to run it dense: packed
    where the Gluon forward (``dout`` given: the Gluon dK / dV kernel) serves its (T, H * D) rows
    (ws.py reads a model's projections as it reads a varlen call's; dense, it takes only contiguous
    tensors), except a causal forward of fewer queries than KernelOptions.rows_packed_causal_fwd_min_l
    (default configs.ROWS_PACKED_CAUSAL_FWD_MIN_L; ``band`` causal-like: the core's strided call is
    faster there); always or never as ``KernelOptions.rows_packed`` forces."""
    B, H, L, D = q.shape
    S = k.shape[2]
    if opts.rows_packed is False or S == 0 or (opts.rows_packed is None and not _gluon_device(q)):
        return None
    min_l = ROWS_PACKED_CAUSAL_FWD_MIN_L if opts.rows_packed_causal_fwd_min_l is None else opts.rows_packed_causal_fwd_min_l
    if opts.rows_packed is None and dout is None and band.right == 0 and band.left < 0 and L < min_l:
        return None
    if not (is_rows(k) and is_rows(v)):  # a KV cache's contiguous K / V: packed rows they are not
        return None
    packed = _offsets(B, L, S, q.device)
    if opts.rows_packed:
        return packed
    qp, kt, vt = packed4(_tokens(q)), _tokens(k), _tokens(v)
    if dout is None:
        ok = (opts.fwd_ws and versions.usable("gluon_forward")
              and ws.eligible(qp, kt, vt, None, (0, 0, 0, 0), False, 0.0, packed, L))
    else:
        min_bucket = WS_BWD_MIN_SEQ_BUCKET if opts.bwd_ws_min_seq_bucket is None else opts.bwd_ws_min_seq_bucket
        ok = (opts.bwd_ws and not opts.autotune and versions.usable("gluon_dkdv")
              and ws_backward(block_d(D), seq_bucket(max(L, S)), min_bucket) is not None
              and ws_bwd.eligible(qp, packed4(kt), packed4(vt), packed4(_tokens(dout)), None, 0.0, packed, L, S))
    return packed if ok else None


def varlen_forward(q, k, v, packed: Packed, max_q: int, max_k: int, scale: float, band: Band,
                   options: KernelOptions | dict | None = None, score=None):
    """Packed attention: q (T, H, D); k/v (T_k, Hkv, D), or a (pages, page_size, Hkv, D) pool
    when ``packed.table`` is set. Returns (out (T, H, D), lse (H, T)). ``score``: a flex
    score_mod's (generated functions, ``codegen.CaptureArgs``) applied to every score, the hooks
    called with b the sequence and q_idx / kv_idx positions in it (the Gluon forward where it
    serves, else the core's score hooks; no backward)."""
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
        kstr, vstr, hkv = tuple(packed4(k).stride()), tuple(packed4(v).stride()), k.shape[1]
    _forward(packed4(q), k, v, kstr, vstr, packed4(out), lse, (0, T), n, hkv, max_q, max_k,
             None, 0.0, band, scale, 0, packed, resolve(options), score)
    return out, lse


def packed4(t: torch.Tensor) -> torch.Tensor:
    """(T, H, D) -> the (1, H, T, D) view the kernels index (no copy)."""
    return t.unsqueeze(0).transpose(1, 2)


def _positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """The forward kernels mask and take row maxima of the unscaled scores, and -inf times a scale
    <= 0 is not -inf: the same scores from (-q) . k * |scale|, or 0 . k * 1 (the backward masks
    after scaling and takes the caller's q and scale)."""
    if scale > 0:
        return q, scale
    return (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)


def _forward(q, k, v, kstr, vstr, out, lse, lse_strides, B, Hkv, L, S, mask, dropout_p, band: Band, scale, seed,
             packed: Packed | None, opts: KernelOptions, score=None) -> bool:
    """Runs the call on the Gluon forward where it serves, else on the core; False only with a
    ``score`` on dense tensors or a model's row views (``forward``'s), which the Gluon forward alone
    takes here (``flex_forward`` runs the core's hooks there). varlen_attn's packed calls with a
    ``score`` (no mask or dropout) run the core's score hooks over the band."""
    H, D = q.shape[1], q.shape[3]
    q, scale = _positive_scale(q, scale)
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    bargs, band_flags = band_args(band)
    name = "gluon_forward" if score is None else "gluon_flex_forward"
    if (opts.fwd_ws and _gluon_device(q) and versions.usable(name)
            and ws.eligible(q, k, v, mask, mstr, mbool, dropout_p, packed, L, q_rows=opts.rows_q_gluon)):
        _ensure_allocator()
        if versions.run_experimental(name, ws.forward, q, k, v, None if mask is None else m4, out, lse,
                                     lse_strides, scale, bargs, band_flags, packed, B, L, S, opts.o_tma, score,
                                     opts.fwd_ws_pipeline):
            return True
    if score is not None and (packed is None or packed.uniform):  # dense, or a model's row views
        return False
    assert score is None or (mask is None and dropout_p == 0.0), "the score hooks take no mask or dropout"
    ext, ext_strides, key_range = _key_range(m4, mstr, mbool, q)
    if packed is None:
        seq_ptrs, stride_table, seq_flags = dict(CU_Q=q, CU_K=q, SEQUSED_K=q, TABLE=q), 0, _DENSE_FLAGS
    else:
        seq_ptrs, stride_table, seq_flags = _packed_args(packed)
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), **band_flags, HAS_MASK=mask is not None, MASK_BOOL=mbool,
                 MASK_KEYS=mask is not None and mstr[2] == 0, KEY_RANGE=key_range, DROPOUT=dropout_p > 0.0,
                 **seq_flags, EVEN=_even(L, S, D, packed), DOT_PRECISION=_dot_precision(q.dtype, opts))
    if score is not None:
        flags.update(SCORE_MOD=score[0]["score_mod"], LOAD_SCORE_META=score[0]["load_meta"])
        tiles = _hook_tiles(flags, q.element_size(), opts, L, S, H // Hkv)
    else:
        tiles = pick_tiles("fwd", flags, q.element_size(), opts, l_bucket(L), seq_bucket(S), H // Hkv)
    asked = tiles is not None and tiles.meta.get("TMA", False)
    if tiles is not None and "TMA" in tiles.meta:  # a config's request, not a kernel parameter
        tiles = Tiles({k: v for k, v in tiles.meta.items() if k != "TMA"}, tiles.warps, tiles.stages)
    tiles = override("fwd", tiles, flags, opts)
    tma_kv, tma_mask = forward_tma(asked if opts.fwd_tma is None else opts.fwd_tma, flags)
    flags["USE_TMA"] = tma_kv and use_tma(opts, q, k, v, forced=opts.tma)
    flags["MASK_TMA"] = flags["USE_TMA"] and tma_mask and use_tma(opts, m4, forced=opts.tma)
    work = _work_list(packed, band, tiles, (("q", "BLOCK_M"),), q.device, opts)
    flags["WORKLIST"] = work is not None
    flags["GRID_1D"] = _one_axis(B * H)
    args = dict(zip(_FWD_STRIDES, (*q.stride(), *kstr, *vstr, *out.stride(), *mstr, *lse_strides, stride_table,
                                   *ext_strides)),
                Q=q, K=k, V=v, Out=out, LSE=lse, MASK=m4, **seq_ptrs, KEY_EXT=ext, WORK=q if work is None else work[0],
                **_NO_FLEX, H=H, G=H // Hkv, L_max=L, S_max=S, qk_scale=scale * _RCP_LN2, **bargs, dropout_p=float(dropout_p),
                seed=int(seed), L_BUCKET=l_bucket(L), SEQ_BUCKET=seq_bucket(S))
    if score is not None:
        args.update(SCORE_PTRS=score[1].ptrs, SCORE_META=score[1].meta)

    def grid(m):  # every sequence's slots, or the list's items (core.attn_fwd)
        return _grid(_cdiv(L, m["BLOCK_M"]), B * H) if work is None else (work[1][0] * H,)

    _launch(_fwd, _FWD_LAUNCH if score is None else _FLEX_FWD_LAUNCH, grid, args, flags, tiles)
    return True


def _hook_tiles(flags: dict, elem: int, opts: KernelOptions, L: int, S: int, group: int) -> Tiles:
    """The tiles of a packed forward with the score hooks (never the autotuner's: the hooks are the
    call's): the fixed config shrunk as the flex forward's (``configs.flex_tile``, its one-loop
    option too), no lazy rescaling, as ``flex_tiles`` makes the band hooks' tiles (build.compile_flex
    builds it: FLEX_VARLEN_VARIANTS)."""
    import dataclasses

    tiles = pick_tiles("fwd", flags, elem, dataclasses.replace(opts, autotune=False), l_bucket(L), seq_bucket(S),
                       group)
    if opts.interpret:
        return tiles
    block_n, stages, warps = flex_tile(tiles.meta["BLOCK_N"], tiles.stages, tiles.warps, flags["BLOCK_D"],
                                       opts.flex_one_loop, flags.get("DOT_PRECISION", "tf32"))
    return Tiles(dict(tiles.meta, BLOCK_N=block_n, LAZY_RESCALE=False, ONE_LOOP=opts.flex_one_loop), warps, stages)


def _one_axis(heads: int) -> bool:
    """The kernels' GRID_1D (``core._grid_cell``): ``heads`` programs per block pass CUDA's 65535
    cap on a grid's y."""
    return heads > _GRID_Y_MAX


def _grid(blocks: int, heads: int) -> tuple:
    """(blocks, heads), or one axis of their product where ``_one_axis(heads)``."""
    return (blocks * heads,) if _one_axis(heads) else (blocks, heads)


def _work_list(packed: Packed | None, band: Band, tiles: Tiles | None, spec: tuple, device: torch.device,
               opts: KernelOptions):
    """(WORK, item counts) for a packed launch with the fixed ``tiles`` (``worklist.work_tensor``), or
    None: varlen_worklist is off, the call is dense, the autotuner picks the tiles, the call is
    paged or has seqused_k, a CUDA graph is being captured (no host read then), or too many items."""
    if not opts.varlen_worklist or packed is None or tiles is None:
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    lens = worklist.packed_lengths(packed)
    if lens is None:
        return None
    return worklist.work_tensor(*lens, band, tuple((kind, tiles.meta[block]) for kind, block in spec), device)


def mask_grad_is_atomic(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> bool:
    """A mask smaller than (B, H, L, S) collects its gradient by atomic adds (nondeterministic)."""
    m4 = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return tuple(m4) != tuple(shape)


def backward(dout, q, k, v, out, lse, mask, dropout_p: float, band: Band, scale: float, seed: int, mask_grad: bool,
             dlse=None, options: KernelOptions | dict | None = None):
    """Gradients of ``forward``: (dq, dk, dv, dmask or None), laid out as q, k, v and the mask.
    ``dlse``: gradient into the lse. ``lse``: (B, H, L) with unit stride along L, as ``forward``
    returned it (contiguous, or a row call's ``rows_lse``) or any other layout (copied)."""
    opts = resolve(options)
    B, H, L, D = q.shape
    S = k.shape[2]
    _check_head_dims(q, k, v)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if B * H * L == 0 or S == 0:
        dmask = torch.zeros_like(mask) if mask_grad else None
        return torch.zeros_like(q), dk.zero_(), dv.zero_(), dmask
    if rows_call(q, k, v, mask, dropout_p):
        packed = _rows_packed(opts, q, k, v, dout)
        if packed is not None:
            return (*_rows_backward(dout, q, k, v, out, lse, dlse, dk, dv, packed, band, scale, opts), None)
    if lse.stride(2) != 1 or not (lse.is_contiguous() or lse.transpose(0, 1).is_contiguous()):
        lse = lse.contiguous()
    # d(mask) in the mask's own (possibly broadcast) shape; the kernel addresses it through
    # the expanded view's strides (0 on broadcast dims). A full-size mask's gradient is stored
    # in its own dtype; a broadcast one is summed by fp32 atomics and cast after.
    atomic = mask_grad and mask_grad_is_atomic(mask, (B, H, L, S))
    if mask_grad:
        # Without a band every tile is visited, so every element of a full-size dS is written:
        # no zero fill (0.7 ms for a 2 GiB bias). Atomics add into zeros; a band skips tiles.
        fill = torch.zeros if atomic or band != Band() else torch.empty
        dmask = fill(mask.shape, dtype=torch.float32 if atomic else mask.dtype, device=q.device)
        dmstr = _mask_args(dmask, B, H, L, S, q)[1]
    else:
        dmask, dmstr = _no_dmask(q, opts), (0, 0, 0, 0)
    dq = _backward(dout, q, k, v, out, lse, dlse, lse.stride()[:2], dk, dv, B, L, S, mask, dmask, dmstr, mask_grad,
                   atomic, dropout_p, band, scale, seed, None, opts,
                   dq_programs=not (opts.dq_from_ds and mask_grad and not atomic))
    if dq is None:  # no dQ programs ran: dQ from the stored dS
        dq = _dq_from_ds(dmask, k, scale, B, H, L)
    return dq.to(q.dtype), dk, dv, (dmask.to(mask.dtype) if mask_grad else None)


def _rows_backward(dout, q, k, v, out, lse, dlse, dk, dv, packed: Packed, band: Band, scale: float,
                   opts: KernelOptions):
    """A row call's backward as ``packed`` sequences: (dq, dk, dv), dk / dv written through their
    (T_k, Hkv, D) views (``dk`` / ``dv``: empty, laid out as k / v)."""
    B, H, L, D = q.shape
    T = B * L
    # (H, T) rows read with strides (0, T): rows_lse's own storage as it is, any other lse copied
    lse_t = lse.permute(1, 0, 2).reshape(H, T).contiguous()
    dlse_t = None if dlse is None else dlse.permute(1, 0, 2).reshape(H, T).contiguous()
    dout4, q4, k4, v4, out4 = (packed4(_tokens(t)) for t in (dout, q, k, v, out))
    dk4, dv4 = packed4(_tokens(dk, True)), packed4(_tokens(dv, True))
    dq4 = _backward(dout4, q4, k4, v4, out4, lse_t, dlse_t, (0, T), dk4, dv4, B, L, k.shape[2], None,
                    _no_dmask(q, opts), (0, 0, 0, 0), False, False, 0.0, band, scale, 0, packed, opts)
    dq = dq4[0].transpose(0, 1).view(B, L, H, D).transpose(1, 2).to(q.dtype)
    if dq.stride() != q.stride():  # q's own stride on a size-1 dim (B = 1): dq laid out exactly as q
        dq = torch.empty_like(q).copy_(dq)
    return dq, dk, dv


def _dq_from_ds(ds: torch.Tensor, k: torch.Tensor, scale: float, B: int, H: int, L: int) -> torch.Tensor:
    """dQ = scale * dS @ K for a contiguous full-size dS (B, H, L, S) in q's dtype; GQA groups
    share K. The scale rides in the GEMM (alpha): one rounding, no second pass over dQ."""
    Hkv, S, D = k.shape[1], k.shape[2], k.shape[3]
    ds3 = ds.reshape(B * Hkv, (H // Hkv) * L, S)
    k3 = k.reshape(B * Hkv, S, D)
    dq = torch.baddbmm(ds3.new_empty(ds3.shape[0], ds3.shape[1], D), ds3, k3, beta=0.0, alpha=scale)
    return dq.view(B, H, L, D)


def varlen_backward(dout, q, k, v, out, lse, packed: Packed, max_q: int, max_k: int, scale: float, band: Band,
                    dlse=None, options: KernelOptions | dict | None = None):
    """Gradients of ``varlen_forward`` (no paging, no seqused_k): (dq, dk, dv), packed. Every key
    row belongs to a sequence (cu_seq_k ends at T_k, checked by the caller), whose dK/dV program
    writes it, so dk and dv need no zero fill (two full writes: 3% of the varlen benchmark)."""
    n = packed.cu_q.numel() - 1
    if q.shape[0] == 0 or n == 0 or max_q == 0 or max_k == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    opts = resolve(options)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    T = q.shape[0]
    dmask = _no_dmask(q, opts)
    dq4 = _backward(packed4(dout), packed4(q), packed4(k), packed4(v), packed4(out), lse, dlse, (0, T),
                    packed4(dk), packed4(dv), n, max_q, max_k, None, dmask, (0, 0, 0, 0), False, False,
                    0.0, band, scale, 0, packed, opts)
    return dq4[0].transpose(0, 1).to(q.dtype), dk, dv


def _no_dmask(like: torch.Tensor, opts: KernelOptions) -> torch.Tensor:
    """DMASK when there is no mask gradient: the kernel never touches it, so any tensor will do,
    except under the autotuner, which zeroes DMASK between trials (a buffer of its own then)."""
    return torch.zeros(1, dtype=torch.float32, device=like.device) if opts.autotune else like


_STAT_PAD = core.STAT_PAD.value


def _stat_buffers(batch: int, H: int, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLSE2, Delta): the two halves of one fp32 buffer, ``rows`` per head rounded up to STAT_PAD."""
    stats = torch.empty((2, batch, H, _cdiv(rows, _STAT_PAD) * _STAT_PAD), dtype=torch.float32, device=device)
    return stats[0], stats[1]


def _row_stats(out, dout, lse, dlse, lse_strides, B: int, L: int, packed: Packed | None, warmup: bool = False):
    """(NLSE2, Delta, their (b, h) strides): the backward's per-row inputs (``attn_bwd_preprocess``),
    one fp32 buffer of two halves. Rows per head: L rounded up to STAT_PAD (dense), or T plus
    STAT_PAD per sequence (packed: each sequence starts on an aligned row, ``core._stat_row0``).
    ``warmup`` (meta tensors): compile the kernel this call would launch, launch nothing."""
    H, rows = out.shape[1], out.shape[2]
    nlse2, delta = _stat_buffers(out.shape[0], H, L if packed is None else rows + _STAT_PAD * B, out.device)
    if dlse is not None and dlse.stride() != lse.stride():  # read with the lse's strides
        dlse = torch.empty_like(lse).copy_(dlse)  # e.g. an expanded gradient (lse.sum()): stride 0
    flags = dict(HEAD_DIM=out.shape[3], BLOCK_D=block_d(out.shape[3]), BLOCK_M=_STAT_PAD, VARLEN=packed is not None,
                 HAS_DLSE=dlse is not None, GRID_1D=_one_axis(B * H))
    args = dict(zip(_PRE_STRIDES, (*out.stride(), *dout.stride(), *lse_strides, *nlse2.stride()[:2])),
                Out=out, DO=dout, LSE=lse, DLSE=lse if dlse is None else dlse, NLSE2=nlse2, Delta=delta,
                CU_Q=packed.cu_q if packed else lse, H=H, L_max=L)
    grid = _grid(_cdiv(L, _STAT_PAD), B * H)
    if warmup:
        versions.await_compile_key()
        core.attn_bwd_preprocess.warmup(grid=grid, **args, **flags, num_warps=8, num_stages=1, **COMPILE_OPTIONS)
    else:
        _PRE_LAUNCH(grid, args, flags, 8, 1)
    return nlse2, delta, nlse2.stride()[:2]


@dataclass(frozen=True)
class BackwardPlan:
    """How a backward runs. ``dq``: "programs" (the core's dQ programs), "atomic" (the dK / dV
    programs add dQ by atomics into fp32), "from_ds" (no dQ programs: the caller computes
    dQ = scale * dS @ K from the stored mask gradient), or "fused" (the Gluon kernel adds dQ into
    fp32 by TMA reduce-adds; no core launch). ``gluon``: dK / dV from the Gluon kernel (ws_bwd.py),
    then, unless fused, the core's dQ programs alone (DQ_ONLY). ``tiles``: the core launch's tiles
    and config flags, None when the autotuner picks (or, fused, when there is no core launch)."""

    dq: str
    gluon: bool
    tiles: Tiles | None

    def kernels(self) -> tuple[str, ...]:
        """The kernels launched, in order."""
        if self.dq == "fused":
            return "core.attn_bwd_preprocess", "ws_bwd.attn_bwd_dkdv_ws (dK, dV and dQ)"
        core_part = ("core.attn_bwd (dQ programs only)" if self.gluon else
                     "core.attn_bwd (dK/dV programs)" if self.dq != "programs" else
                     "core.attn_bwd (dK/dV and dQ programs)")
        return ("core.attn_bwd_preprocess",) + (("ws_bwd.attn_bwd_dkdv_ws",) if self.gluon else ()) + (core_part,)

    def __str__(self) -> str:
        tiles = "" if self.dq == "fused" else "; core tiles " + ("autotuned" if self.tiles is None else str(self.tiles))
        dq = {"programs": "by dQ programs", "atomic": "by atomic adds in the dK/dV programs",
              "from_ds": "from the stored dS (one GEMM)",
              "fused": "by TMA reduce-adds in the Gluon dK/dV kernel"}[self.dq]
        return f"backward: {' -> '.join(self.kernels())}; dQ {dq}{tiles}"


def backward_plan(flags: dict, q, k, v, dout, mask, dropout_p: float, packed: Packed | None, L: int, S: int,
                  opts: KernelOptions, dq_programs: bool = True) -> BackwardPlan:
    """Choose the backward's kernels, dQ strategy and tiles for a launch with feature ``flags``.
    ``dq_programs=False``: the caller computes dQ where the fixed tiles would have dQ programs."""
    H, Hkv = q.shape[1], k.shape[1]
    sb = seq_bucket(max(L, S))
    tiles = override("bwd", pick_tiles("bwd", flags, q.element_size(), opts, seq_bucket=sb, group=H // Hkv),
                     flags, opts)
    # The autotuner may pick a config with dQ by atomics (never in deterministic mode).
    atomic = tiles.meta["DQ_ATOMIC"] if tiles is not None else not flags["DETERMINISTIC"]
    if atomic:
        return BackwardPlan("atomic", False, tiles)
    if not dq_programs and tiles is not None:  # the head-major numbering assumes dQ programs
        return BackwardPlan("from_ds", False, tiles.with_meta(HEAD_MAJOR=False))
    min_bucket = WS_BWD_MIN_SEQ_BUCKET if opts.bwd_ws_min_seq_bucket is None else opts.bwd_ws_min_seq_bucket
    dq_only = ws_backward(flags["BLOCK_D"], sb, min_bucket)
    if (opts.bwd_ws and dq_only is not None and tiles is not None and _gluon_device(q)
            and versions.usable("gluon_dkdv")
            and ws_bwd.eligible(q, k, v, dout, mask, dropout_p, packed, L, S, q_rows=opts.rows_q_gluon)):
        if fused_dq_refusal(opts, False) is None:  # dQ too: no core launch
            return BackwardPlan("fused", True, None)
        # dK / dV from the Gluon kernel, then the dQ programs alone, numbered in key order
        return BackwardPlan("programs", True, Tiles(dict(dq_only.kwargs, HEAD_MAJOR=False), dq_only.num_warps,
                                                    dq_only.num_stages))
    return BackwardPlan("programs", False, tiles)


def _bwd_flags(q, k, v, dout, band_flags, mask, mstr, mbool, key_range, dropout_p, mask_grad, atomic, packed, L, S,
               opts: KernelOptions) -> dict:
    """The backward launch's feature flags (constexprs other than the tiles)."""
    D = q.shape[3]
    return dict(HEAD_DIM=D, BLOCK_D=block_d(D), **band_flags, HAS_MASK=mask is not None, MASK_BOOL=mbool,
                MASK_KEYS=mask is not None and mstr[2] == 0, KEY_RANGE=key_range, DROPOUT=dropout_p > 0.0,
                MASK_GRAD=bool(mask_grad), MASK_GRAD_ATOMIC=atomic, VARLEN=packed is not None,
                DETERMINISTIC=torch.are_deterministic_algorithms_enabled(), EVEN=_even(L, S, D, packed),
                USE_TMA=use_tma(opts, q, dout, k, v, forced=opts.tma), HEAD_MAJOR=False,  # a config may turn it on
                DOT_PRECISION=_dot_precision(q.dtype, opts))


def explain_backward(q, k, v, mask=None, dropout_p: float = 0.0, band: Band = Band(), mask_grad: bool = False,
                     options: KernelOptions | dict | None = None) -> BackwardPlan:
    """The plan ``backward`` would run for dense (B, H, L, D) inputs like these (and an output
    gradient laid out as q), without running anything (a key-padding mask's key-range skip aside,
    which does not change the plan)."""
    opts = resolve(options)
    B, H, L, _ = q.shape
    S = k.shape[2]
    packed = _rows_packed(opts, q, k, v, q) if rows_call(q, k, v, mask, dropout_p) and S > 0 else None
    if packed is not None:  # as _rows_backward runs it
        q, k, v = (packed4(_tokens(t)) for t in (q, k, v))
        flags = _bwd_flags(q, k, v, q, band_args(band)[1], None, (0, 0, 0, 0), False, False, 0.0, False, False,
                           packed, L, S, opts)
        return backward_plan(flags, q, k, v, q, None, 0.0, packed, L, S, opts)
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    atomic = mask_grad and mask_grad_is_atomic(mask, (B, H, L, S))
    flags = _bwd_flags(q, k, v, q, band_args(band)[1], mask, mstr, mbool, False, dropout_p, mask_grad, atomic, None,
                       L, S, opts)
    return backward_plan(flags, q, k, v, q, mask, dropout_p, None, L, S, opts,
                         dq_programs=not (opts.dq_from_ds and mask_grad and not atomic))


def _dq_buffer(plan: BackwardPlan, q: torch.Tensor) -> torch.Tensor:
    """dQ's buffer for ``plan``, laid out as q (the Gluon kernel addresses it by q's rows): fp32 and
    zeroed where dQ is added up ("atomic", "fused"), q's dtype where the dQ programs write it once,
    q itself where nothing writes it ("from_ds")."""
    if plan.dq == "from_ds":
        return q
    return torch.zeros_like(q, dtype=torch.float32) if plan.dq in ("atomic", "fused") else torch.empty_like(q)


def _backward(dout, q, k, v, out, lse, dlse, lse_strides, dk, dv, B, L, S, mask, dmask, dmstr, mask_grad, atomic,
              dropout_p, band: Band, scale, seed, packed: Packed | None, opts: KernelOptions,
              dq_programs: bool = True) -> torch.Tensor | None:
    """Plan the backward (``backward_plan``) and launch it; returns dQ laid out like ``q``: fp32 when
    dQ is added up (atomics, or the Gluon kernel's reduce-adds), else in q's dtype, written once by the dQ
    programs (no fp32 round trip). None when the plan leaves dQ to the caller ("from_ds")."""
    H, Hkv = q.shape[1], k.shape[1]
    nlse2, delta, stat_strides = _row_stats(out, dout, lse, dlse, lse_strides, B, L, packed)
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    ext, ext_strides, key_range = _key_range(m4, mstr, mbool, q)
    bargs, band_flags = band_args(band)
    flags = _bwd_flags(q, k, v, dout, band_flags, mask, mstr, mbool, key_range, dropout_p, mask_grad, atomic, packed,
                       L, S, opts)
    plan = backward_plan(flags, q, k, v, dout, mask, dropout_p, packed, L, S, opts, dq_programs)
    dq = _dq_buffer(plan, q)
    while plan.gluon:
        _ensure_allocator()
        fused = dq if plan.dq == "fused" else None
        if versions.run_experimental(_gluon_dkdv_name(False, False, fused is not None), ws_bwd.dkdv, q, k, v, dout,
                                     nlse2, delta, stat_strides, dk, dv, scale, bargs, band_flags, packed, B, L, S,
                                     dq=fused):
            if fused is not None:
                return dq
            break
        # its build failed (versions.run_experimental warned once, and turned it off): the plain dK / dV
        # kernel where the fused one failed, else the core's whole backward
        plan = backward_plan(flags, q, k, v, dout, mask, dropout_p, packed, L, S, opts, dq_programs)
        dq = _dq_buffer(plan, q)
    flags["DQ_ONLY"] = plan.gluon
    tiles = plan.tiles
    work = _work_list(packed, band, tiles, (("k", "BLOCK_N1"), ("q", "BLOCK_M2")), q.device, opts)
    flags["WORKLIST"] = work is not None
    n_kv_items, n_q_items = (0, 0) if work is None else work[1]
    cu_q, cu_k = (q, q) if packed is None else (packed.cu_q, packed.cu_k if packed.cu_k is not None else packed.cu_q)
    args = dict(zip(_BWD_STRIDES, (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *dk.stride(),
                                   *dv.stride(), *mstr, *dmstr, *stat_strides, *ext_strides)),
                Q=q, K=k, V=v, DO=dout, NLSE2=nlse2, Delta=delta, DQ=dq, DK=dk, DV=dv, MASK=m4, DMASK=dmask, CU_Q=cu_q,
                CU_K=cu_k, KEY_EXT=ext, WORK=q if work is None else work[0], B=B if work is None else 1, H=H,
                G=H // Hkv, L_max=L, S_max=S, qk_scale=scale * _RCP_LN2, sm_scale=scale, **bargs,
                dropout_p=float(dropout_p), seed=int(seed), N_KV_ITEMS=n_kv_items, N_Q_ITEMS=n_q_items,
                SEQ_BUCKET=seq_bucket(max(L, S)), **_NO_FLEX_BWD)
    skip_dq = plan.dq == "from_ds"

    def grid(m):  # dK/dV programs unless DQ_ONLY, then dQ programs unless dQ is added by atomics (core.attn_bwd)
        no_q = m["DQ_ATOMIC"] or skip_dq
        if work is not None:  # the lists span every sequence
            n_kv, n_q = n_kv_items * Hkv, n_q_items * H
        else:
            n_kv, n_q = _cdiv(S, m["BLOCK_N1"]) * B * Hkv, _cdiv(L, m["BLOCK_M2"]) * B * H
        return ((0 if plan.gluon else n_kv) + (0 if no_q else n_q),)

    _launch(_bwd, _BWD_LAUNCH, grid, args, flags, tiles)
    return None if skip_dq else dq


# ---- flex (attend.flex_attention): the core's block-sparse mode with generated hooks ----------

_FLEX_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")  # kernel_options that map onto Tiles


def _fit(tile: int, block: int) -> int:
    """The largest power-of-two tile <= ``tile`` that divides a BlockMask's ``block`` size."""
    while tile > 1 and block % tile:
        tile //= 2
    return tile


def flex_tiles(q, k, blocks, options: KernelOptions | dict | None = None,
               kernel_options: dict | None = None) -> Tiles | None:
    """The flex forward's tiles: the fixed config of a dense non-causal forward (or the
    interpreter's tile), with flex_attention's ``kernel_options`` BLOCK_M / BLOCK_N / num_warps /
    num_stages applied, shrunk until BLOCK_M divides the BlockMask's BQ and BLOCK_N its BKV
    (lists.coarsen covers the other direction). None where no tile of at least 16 fits."""
    opts = resolve(options)
    B, H, L, D = q.shape
    key = (D, q.element_size(), _dot_precision(q.dtype, opts), l_bucket(L), seq_bucket(k.shape[2]), H // k.shape[1],
           tuple(blocks.BLOCK_SIZE), tuple(sorted((kernel_options or {}).items())))
    try:
        return _flex_tiles(opts, *key)
    except TypeError:  # an unhashable option or kernel_options value: no memo
        return _flex_tiles.__wrapped__(opts, *key)


@functools.lru_cache(maxsize=256)
def _flex_tiles(opts: KernelOptions, D: int, elem: int, precision: str, l_bkt, s_bkt, group: int, block_size: tuple,
                ko_items: tuple) -> Tiles | None:
    """``flex_tiles`` from what it depends on (a flex call pays the choice once per shape class;
    decode calls repeat it per token)."""
    import dataclasses

    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=False, WINDOW=False, HAS_MASK=False, MASK_KEYS=False,
                 VARLEN=False, DOT_PRECISION=precision)
    tiles = pick_tiles("fwd", flags, elem, dataclasses.replace(opts, autotune=False), l_bkt, s_bkt, group)
    meta = {key: val for key, val in tiles.meta.items() if key in ("BLOCK_M", "BLOCK_N")}
    warps, stages = tiles.warps, tiles.stages
    if not opts.interpret:
        meta["BLOCK_N"], stages, warps = flex_tile(meta["BLOCK_N"], stages, warps, block_d(D), opts.flex_one_loop,
                                                   precision)
    ko = dict(ko_items)
    meta["BLOCK_M"] = int(ko.get("BLOCK_M", meta["BLOCK_M"]))
    meta["BLOCK_N"] = int(ko.get("BLOCK_N", meta["BLOCK_N"]))
    warps, stages = int(ko.get("num_warps", warps)), int(ko.get("num_stages", stages))
    BQ, BKV = block_size
    meta["BLOCK_M"], meta["BLOCK_N"] = _fit(meta["BLOCK_M"], BQ), _fit(meta["BLOCK_N"], BKV)
    if meta["BLOCK_M"] < 16 or meta["BLOCK_N"] < 16:
        return None
    return Tiles(dict(meta, LAZY_RESCALE=False, ONE_LOOP=opts.flex_one_loop), warps, stages)


def _list_strides(num, idx, full_num, full_idx, device) -> torch.Tensor:
    """The 14 int32 strides of one direction's four lists (a size-1 b / h dim broadcasts: 0),
    as core._list_row reads them. A tensor, not int arguments: Triton would specialize ints on
    divisibility, and a new length changes the lists' row strides. Made once per set of strides
    and device (``small_tensor``): a new tensor's host-to-device copy waited for the GPU's queue
    on every flex forward and twice per backward."""
    def st(t, n):
        return [0 if t.shape[i] == 1 else t.stride(i) for i in range(n - 1)] + [t.stride(n - 1)]
    return small_tensor(st(num, 3) + st(idx, 4) + st(full_num, 3) + st(full_idx, 4), torch.int32, device)


def _with_lists(blocks, transposes: bool = False, device: torch.device | None = None):
    """``blocks`` with every list the kernels read present: an absent full list is an empty one,
    and (``transposes``) absent query-side lists are computed from the key-side ones. The lists
    made here are on ``device`` (default: the lists'; "meta" for a warmup, which reads none)."""
    import dataclasses

    from .._flex.block_mask import _transpose

    ch = {}
    device = blocks.kv_num_blocks.device if device is None else device
    transpose = lambda num, idx: _transpose(num.to(device), idx.to(device))
    nq, nk = blocks.kv_num_blocks.shape[-1], blocks.kv_indices.shape[-1]
    if blocks.full_kv_num_blocks is None:
        zero = torch.zeros(1, 1, nq, 1, dtype=torch.int32, device=device)
        ch.update(full_kv_num_blocks=zero[..., 0], full_kv_indices=zero)
    if transposes:
        if blocks.q_num_blocks is None:
            ch.update(zip(("q_num_blocks", "q_indices"), transpose(blocks.kv_num_blocks, blocks.kv_indices)))
        if blocks.full_q_num_blocks is None:
            if blocks.full_kv_num_blocks is None:
                zero = torch.zeros(1, 1, nk, 1, dtype=torch.int32, device=device)
                ch.update(full_q_num_blocks=zero[..., 0], full_q_indices=zero)
            else:
                ch.update(zip(("full_q_num_blocks", "full_q_indices"),
                              transpose(blocks.full_kv_num_blocks, blocks.full_kv_indices)))
    return dataclasses.replace(blocks, **ch) if ch else blocks


def _flex_kv_args(k, v, blocks, device: torch.device | None = None):
    """(k strides, v strides, the key-side lists and their strides, on ``device``, default k's) of
    a flex launch; a key / value batch of 1 broadcasts (batch stride 0)."""
    kstr, vstr = list(k.stride()), list(v.stride())
    if k.shape[0] == 1:
        kstr[0] = 0
    if v.shape[0] == 1:
        vstr[0] = 0
    kv = (blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks, blocks.full_kv_indices)
    return kstr, vstr, (*kv, _list_strides(*kv, k.device if device is None else device))


@dataclass(frozen=True)
class FlexForwardPlan:
    """What a flex forward launch fixes for a class of calls (``flex_forward_plan``): the tiles, the
    constexprs (the hooks, the band's flags, TMA's choice) and whether max_scores is stored.
    ``flex_forward_run`` launches it on one call's tensors; a decode loop keeps one per class
    (``attend._flex.plan``)."""

    tiles: Tiles
    flags: dict  # every constexpr of the launch, the tiles' included
    band: Band | None
    band_args: dict  # the band's runtime arguments (band_args; every key's where band is None)
    want_max: bool


def flex_forward_plan(q, k, v, blocks, score_fns: dict | None = None, mask_fns: dict | None = None,
                      want_max: bool = False, options: KernelOptions | dict | None = None,
                      kernel_options: dict | None = None, band: Band | None = None) -> FlexForwardPlan | None:
    """``flex_forward``'s plan for these arguments (``score_fns`` / ``mask_fns``: a mod's generated
    functions, or None where there is no such mod), or None where no tile fits the BlockMask's
    BLOCK_SIZE. It reads q's head dim, dtype, length's bucket and batch x heads, k's heads and
    length's bucket, whether k and v take TMA descriptors (``_flex_tma``), the BlockMask's
    BLOCK_SIZE and the options: a call that agrees on these launches the same plan."""
    tiles = flex_tiles(q, k, blocks, options, kernel_options)
    if tiles is None:
        return None
    B, H, L, D = q.shape
    bargs, band_flags = band_args(Band() if band is None else band)
    sfns, mfns = score_fns or {}, mask_fns or {}
    tma = _flex_tma(k, v, options, kernel_options)
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), **band_flags, HAS_MASK=False, MASK_BOOL=False,
                 MASK_KEYS=False, KEY_RANGE=False, DROPOUT=False, **_DENSE_FLAGS, EVEN=False,
                 DOT_PRECISION=_dot_precision(q.dtype, resolve(options)), WORKLIST=False, USE_TMA=tma,
                 MASK_TMA=False, GRID_1D=_one_axis(B * H), FLEX=band is None,
                 SCORE_MOD=sfns.get("score_mod"), LOAD_SCORE_META=sfns.get("load_meta"),
                 MASK_MOD=mfns.get("mask_mod"), LOAD_MASK_META=mfns.get("load_meta"),
                 SPARSE_BQ=blocks.BLOCK_SIZE[0] if band is None else 128,  # a band reads no list: one build
                 SPARSE_BKV=blocks.BLOCK_SIZE[1] if band is None else 128, MAX_SCORES=want_max,
                 FLEX_RAGGED_IN_FULL=resolve(options).flex_ragged_in_full and tma and band is None)
    return FlexForwardPlan(tiles, {**flags, **tiles.meta}, band, bargs, want_max)


def flex_plan_key(q, k, v, options: KernelOptions | dict | None = None) -> tuple:
    """What ``flex_forward_plan`` (without kernel_options) reads of q, k and v beyond their dtypes,
    devices and shapes but the key length: that length's bucket, whether k and v take TMA
    descriptors, and the dots' precision (fp32's follows ``allow_tf32``)."""
    opts = resolve(options)
    return seq_bucket(k.shape[2]), _flex_tma(k, v, opts, None), _dot_precision(q.dtype, opts)


def flex_forward_run(plan: FlexForwardPlan, q, k, v, blocks, scale: float, score_args=None, mask_args=None):
    """Launches ``plan`` on this call's tensors: (out, lse (B, Hq, L) natural log, max_scores or
    None). ``score_args`` / ``mask_args``: the mods' ``codegen.capture_args`` (None where the plan
    has no such mod); ``blocks``: the lists (not read where the plan walks a band)."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    want_max, band = plan.want_max, plan.band
    out = empty_in_layout(q, (B, H, L, v.shape[3]))
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    mx = torch.empty((B, H, L), dtype=torch.float32, device=q.device) if want_max else lse
    if L == 0:
        return out, lse, (mx if want_max else None)
    q, scale = _positive_scale(q, scale)
    if band is None:
        blocks = _with_lists(blocks)
        kstr, vstr, kv_lists = _flex_kv_args(k, v, blocks)
        lists = (*kv_lists, mx)
    else:  # only FLEX_LISTS[5] is read (MAX_SCORES)
        assert k.shape[0] == v.shape[0] == B, "a band replaces the mask; k / v of batch B"
        kstr, vstr, lists = k.stride(), v.stride(), (q,) * 5 + (mx,)
    score_on, mask_on = score_args is not None, mask_args is not None
    args = dict(zip(_FWD_STRIDES, (*q.stride(), *kstr, *vstr, *out.stride(), 0, 0, 0, 0, H * L, L, 0, 0, 0)),
                Q=q, K=k, V=v, Out=out, LSE=lse, MASK=q, CU_Q=q, CU_K=q, SEQUSED_K=q, TABLE=q, KEY_EXT=q, WORK=q,
                FLEX_LISTS=lists, SCORE_PTRS=score_args.ptrs if score_on else None,
                SCORE_META=score_args.meta if score_on else None, MASK_PTRS=mask_args.ptrs if mask_on else None,
                MASK_META=mask_args.meta if mask_on else None,
                H=H, G=H // Hkv, L_max=L, S_max=S, qk_scale=scale * _RCP_LN2, **plan.band_args, dropout_p=0.0,
                seed=0, L_BUCKET=l_bucket(L), SEQ_BUCKET=seq_bucket(S))
    grid = _grid(_cdiv(L, plan.tiles.meta["BLOCK_M"]), B * H)
    _FLEX_FWD_LAUNCH(grid, args, plan.flags, plan.tiles.warps, plan.tiles.stages)
    return out, lse, (mx if want_max else None)


def flex_forward(q, k, v, blocks, scale: float, score=None, mask=None, want_max: bool = False, options: KernelOptions | dict | None = None,
                 kernel_options: dict | None = None, band: Band | None = None):
    """Flex attention through core.attn_fwd's FLEX mode. q ``(B, Hq, L, D)``; k / v ``(B or 1,
    Hkv, S, D)``; ``blocks`` a ``_flex.lists.BlockLists`` (int32, b / h dims 1 or full);
    ``score`` / ``mask``: (the mod's generated functions, its ``codegen.capture_args``), or None
    where there is no such mod. ``band`` (no ``mask``, k / v of batch B): the keys the BlockMask
    keeps are that band's (``_flex/band.py``), walked by the band's own loops with the score hook,
    no lists read (on Hopper ``flex_band_gluon`` may serve such a call first). Returns (out, lse
    (B, Hq, L) natural log, max_scores or None), or None where no tile fits the BlockMask's
    BLOCK_SIZE. ``flex_forward_plan`` then ``flex_forward_run``."""
    assert band is None or mask is None, "a band replaces the mask"
    plan = flex_forward_plan(q, k, v, blocks, score[0] if score else None, mask[0] if mask else None, want_max,
                             options, kernel_options, band)
    if plan is None:
        return None
    return flex_forward_run(plan, q, k, v, blocks, scale, score[1] if score else None, mask[1] if mask else None)


def flex_band_gluon(q, k, v, scale: float, score, band: Band, options: KernelOptions | dict | None = None):
    """Flex's score hooks over ``band`` (``flex_forward``'s band call, no max_scores) on the Gluon
    forward: (out, lse (B, Hq, L) natural log), or None where it does not serve the call
    (KernelOptions.flex_gluon or fwd_ws off, not an sm_90 device, fewer queries than one of its
    tiles (a decode step or a short chunk keeps the core's 16-row decode tiles: the Gluon route was
    timed at 8192 queries only), ``ws.eligible``'s dtypes, D and layouts: contiguous tensors, or a
    model's row views as packed sequences). The lse of row views is strided
    (``_layout.rows_lse``), as the dense forward's."""
    opts = resolve(options)
    if flex_band_gluon_refusal(q, k, opts) is not None:
        return None  # (the cheap half of ws.eligible first: forward allocates before it asks)
    return forward(q, k, v, None, 0.0, band, scale, 0, opts, score=score)


def flex_band_gluon_refusal(q, k, options: KernelOptions | dict | None = None,
                            name: str = "gluon_flex_forward") -> str | None:
    """Why ``flex_band_gluon`` declines a call on q / k before it reads the layouts (``ws.eligible``,
    in ``forward``), or None where it goes on to them; ``name``: the experimental kernel asked
    (``flex_lists_gluon``'s own)."""
    opts = resolve(options)
    if not (opts.flex_gluon and opts.fwd_ws):
        return f"KernelOptions.{'flex_gluon' if not opts.flex_gluon else 'fwd_ws'} is off"
    if not _gluon_device(q):
        return versions.GLUON_ERROR or f"{q.device.type} tensors, not on an sm_90 GPU"
    if q.shape[2] < ws.BLOCK_M or k.shape[2] == 0:
        return (f"{q.shape[2]} queries and {k.shape[2]} keys: it takes at least one tile of {ws.BLOCK_M} queries "
                "(a decode step or a short chunk keeps the core's decode tiles) and a key")
    if q.shape[3] != ws.HEAD_DIM or q.dtype not in ws.GL_DTYPE:
        return f"head dim {q.shape[3]} in {q.dtype}: it takes {ws.HEAD_DIM} in fp16 / bf16"
    if not versions.usable(name):
        return versions.experimental_status()[name]
    return None


def flex_lists_gluon(q, k, v, blocks, scale: float, score, mask, options: KernelOptions | dict | None = None):
    """Flex over a BlockMask's lists on the Gluon forward (``ws.py``'s LISTS: the listed key blocks,
    the mask_mod's hook on partial ones, the score hook on every score): (out, lse (B, Hq, L)
    natural log), or None where it does not serve the call (``flex_lists_gluon_refusal``, then
    ``ws.eligible``'s dense contiguous layouts, or its build failed: the core's lists then serve).
    ``score`` / ``mask``: (generated functions, ``codegen.capture_args``) or None."""
    opts = resolve(options)
    if flex_lists_gluon_refusal(q, k, blocks, opts) is not None:
        return None
    B, H, L, _ = q.shape
    S = k.shape[2]
    if not flex_lists_gluon_layouts(q, k, v):
        return None
    q, scale = _positive_scale(q, scale)
    out = torch.empty((B, H, L, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    blocks = _with_lists(blocks)
    _, _, kv_lists = _flex_kv_args(k, v, blocks)
    bargs, bflags = band_args(Band())
    _ensure_allocator()
    if not versions.run_experimental("gluon_flex_lists_forward", ws.forward, q, k, v, None, out, lse, lse.stride()[:2],
                                     scale, bargs, bflags, None, B, L, S, o_tma=opts.o_tma, score=score,
                                     pipe=opts.fwd_ws_pipeline, lists=kv_lists, mask=mask):
        return None
    return out, lse


def flex_lists_gluon_layouts(q, k, v) -> bool:
    """Whether ``flex_lists_gluon`` serves these layouts (``ws.eligible``'s dense contiguous tensors);
    for ``explain``."""
    return ws.eligible(q, k, v, None, (0, 0, 0, 0), False, 0.0, None, q.shape[2])


def flex_lists_gluon_refusal(q, k, blocks, options: KernelOptions | dict | None = None) -> str | None:
    """Why ``flex_lists_gluon`` declines a call before it reads the layouts, or None where it goes on
    to them: KernelOptions.flex_gluon_lists off, the lists' BLOCK_SIZE not 128 x 128, k / v of
    another batch, and ``flex_band_gluon_refusal``'s device, length, dtype and head dim."""
    opts = resolve(options)
    if not opts.flex_gluon_lists:
        return "KernelOptions.flex_gluon_lists is off"
    if tuple(blocks.BLOCK_SIZE) != (ws.BLOCK_M, ws.BLOCK_N):
        return f"the BlockMask's BLOCK_SIZE {tuple(blocks.BLOCK_SIZE)}: it walks lists of 128 x 128 blocks"
    if k.shape[0] != q.shape[0]:
        return f"k / v of batch {k.shape[0]} beside q's {q.shape[0]}: it takes k / v of q's batch"
    return _gluon_lists_refusal(blocks) or flex_band_gluon_refusal(q, k, opts, name="gluon_flex_lists_forward")


def _gluon_lists_refusal(blocks) -> str | None:
    """Why the Gluon kernels' LISTS cannot walk ``blocks``: not 128 x 128 blocks, or not int32 lists
    (an int64 TMA coordinate does not build); None where they can."""
    if ws_bwd is None:
        return versions.GLUON_ERROR
    if blocks is None or tuple(blocks.BLOCK_SIZE) != (ws_bwd.LIST_BLOCK, ws_bwd.LIST_BLOCK):
        size = None if blocks is None else tuple(blocks.BLOCK_SIZE)
        return f"the BlockMask's BLOCK_SIZE {size}: it walks lists of 128 x 128 blocks"
    if blocks.kv_indices.dtype != torch.int32:
        return f"lists of {blocks.kv_indices.dtype}: it reads int32 lists"
    return None


def flex_band_gluon_layouts(q, k, v, band: Band, options: KernelOptions | dict | None = None) -> bool:
    """Whether ``forward`` (``flex_band_gluon``'s) serves these layouts on the Gluon forward with the
    score hooks: ``ws.eligible`` on the tensors as ``forward`` hands them over (a model's row views
    as packed sequences where ``_rows_packed`` says so). For ``explain``; the launch asks inside
    ``_forward``."""
    opts = resolve(options)
    L = q.shape[2]
    packed = _rows_packed(opts, q, k, v, band=band) if rows_call(q, k, v, None, 0.0) else None
    if packed is not None:
        q, k, v = packed4(_tokens(q)), _tokens(k), _tokens(v)
    return ws.eligible(q, k, v, None, (0, 0, 0, 0), False, 0.0, packed, L, q_rows=opts.rows_q_gluon)


def _flex_tma(k, v, options: KernelOptions | dict | None, kernel_options: dict | None) -> bool:
    """Whether the flex forward reads K and V through TMA descriptors: flex_attention's
    kernel_options USE_TMA (PyTorch's key), else KernelOptions.flex_tma, where the copy engine can
    read k and v (``use_tma``; q is read by pointer loads). KernelOptions.tma, where set, decides
    over both (tests force descriptors under the interpreter with it)."""
    opts = resolve(options)
    asked = bool((kernel_options or {}).get("USE_TMA", opts.flex_tma))
    return asked and use_tma(opts, k, v, forced=opts.tma)


_FLEX_BWD_TILE_KEYS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")  # PyTorch's backward kernel_options


def flex_bwd_tiles(q, k, blocks, options: KernelOptions | dict | None = None,
                   kernel_options: dict | None = None, lists: bool = True) -> Tiles | None:
    """The flex backward's tiles: the fixed config of a dense non-causal deterministic backward
    (dQ programs, no atomics; or the interpreter's tile) through ``configs.flex_bwd_tile``, with
    flex_attention's ``kernel_options`` BLOCK_M1 / BLOCK_N1 / BLOCK_M2 / BLOCK_N2 / num_warps /
    num_stages on top, each halved until the query tiles divide the BlockMask's BQ (and
    STAT_PAD) and the key tiles its BKV. None where no tile of at least 16 fits. ``lists``: the
    launch walks the BlockMask's lists (else a band's loops): the program order's default."""
    import dataclasses

    opts = resolve(options)
    B, H, L, D = q.shape
    S = k.shape[2]
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=False, WINDOW=False, HAS_MASK=False, MASK_KEYS=False,
                 DROPOUT=False, MASK_GRAD=False, VARLEN=False, DETERMINISTIC=True,
                 DOT_PRECISION=_dot_precision(q.dtype, opts))
    tiles = pick_tiles("bwd", flags, q.element_size(), dataclasses.replace(opts, autotune=False),
                       seq_bucket=seq_bucket(max(L, S)), group=H // k.shape[1])
    meta = {key: tiles.meta[key] for key in _FLEX_BWD_TILE_KEYS}
    warps, stages = tiles.warps, tiles.stages
    if not opts.interpret:
        meta, stages, warps = flex_bwd_tile(meta, stages, warps, block_d(D), opts.flex_bwd_one_loop,
                                            flags["DOT_PRECISION"])
    ko = kernel_options or {}
    meta = {key: int(ko.get(key, val)) for key, val in meta.items()}
    warps, stages = int(ko.get("num_warps", warps)), int(ko.get("num_stages", stages))
    BQ, BKV = blocks.BLOCK_SIZE
    for key in _FLEX_BWD_TILE_KEYS:
        meta[key] = _fit(min(meta[key], _STAT_PAD), BQ) if key[-2] == "M" else _fit(meta[key], BKV)
    if min(meta.values()) < 16:
        return None
    # The program order (KernelOptions.head_major): each KV head's dK / dV programs, then its dQ
    # programs (Inductor's flex order) where the launch walks the lists, every head's dK / dV
    # programs first on a band's loops (benchmarks/RESULTS.md, "The list backward's program order").
    # Not with flex_bwd_split's halves.
    head_major = (lists if opts.head_major is None else opts.head_major) and not opts.flex_bwd_split
    return Tiles(dict(meta, DQ_ATOMIC=False, HEAD_MAJOR=head_major, ONE_LOOP=opts.flex_bwd_one_loop), warps, stages)


def _flex_gluon_dkdv(options, q, k, v, dout, band: Band | None, score, kernel_options, blocks=None) -> bool:
    """Whether ``flex_backward`` takes dK / dV from the Gluon kernel (ws_bwd.py) with the score
    hooks over a band, or walking a BlockMask's lists (``flex_dkdv_refusal``)."""
    return flex_dkdv_refusal(options, q, k, v, dout, band, score is not None, kernel_options, blocks) is None


def flex_dkdv_refusal(options, q, k, v, dout, band: Band | None, score: bool, kernel_options,
                      blocks=None) -> str | None:
    """Why ``flex_backward`` does not take dK / dV from the Gluon kernel, or None where it does: a
    band's loops with a score_mod (``score``; the captures' gradients come from the core's dQ
    programs, which visit each (query, key) pair once), or, with KernelOptions.flex_gluon_lists_bwd, a
    BlockMask's lists of 128 x 128 blocks (``blocks``; the mask_mod on its partial blocks); no
    kernel_options, KernelOptions.flex_gluon and bwd_ws on and flex_bwd_split off, an sm_90 device,
    the dense backward's sequence bucket rule for that kernel (``configs.WS_BWD_MIN_SEQ_BUCKET``)
    and ``ws_bwd.eligible``'s dense contiguous tensors (k / v of q's batch)."""
    opts = resolve(options)
    if band is None:
        if not opts.flex_gluon_lists_bwd:
            return "it serves a score_mod over a band (KernelOptions.flex_gluon_lists_bwd is off: not over lists)"
        why = _gluon_lists_refusal(blocks)
        if why is not None:
            return why
    elif not score:
        return "it serves a score_mod over a band only"
    if kernel_options:
        return "kernel_options given: they tune the core's flex backward"
    if not (opts.flex_gluon and opts.bwd_ws) or opts.flex_bwd_split:
        off = "flex_gluon" if not opts.flex_gluon else "bwd_ws" if not opts.bwd_ws else None
        return f"KernelOptions.{off} is off" if off else "KernelOptions.flex_bwd_split is on"
    if not _gluon_device(q):
        return versions.GLUON_ERROR or f"{q.device.type} tensors, not on an sm_90 GPU"
    name = _gluon_dkdv_name(True, band is None, False)
    if not versions.usable(name):
        return versions.experimental_status()[name]
    L, S = q.shape[2], k.shape[2]
    min_bucket = WS_BWD_MIN_SEQ_BUCKET if opts.bwd_ws_min_seq_bucket is None else opts.bwd_ws_min_seq_bucket
    if ws_backward(block_d(q.shape[3]), seq_bucket(max(L, S)), min_bucket) is None:
        return (f"{max(L, S)} tokens at head dim {q.shape[3]}: no tuning rule takes it there (below the sequence "
                "bucket where it was measured faster, or a head dim it has no rule for; docs/kernels.md)")
    if k.shape[0] != q.shape[0] or not ws_bwd.eligible(q, k, v, dout, None, 0.0, None, L, S):
        return ("the layouts: it takes contiguous (B, H, L, 128) fp16 / bf16 tensors with k / v of q's batch "
                "(a model's views keep the core's backward)")
    return None


def fused_dq_refusal(opts: KernelOptions, capture_grads: bool, flex: bool = False, lists: bool = False) -> str | None:
    """Why a backward that the Gluon dK / dV kernel serves does not take dQ from it too (ws_bwd's
    FUSED_DQ), or None where it does: KernelOptions.bwd_ws_fused_dq off, its build failed in this
    process (``flex``: flex's variant; ``lists``: over a BlockMask's lists), deterministic mode (the
    reduce-adds' order varies), or a flex capture that needs a gradient (``capture_grads``; the dQ
    programs scatter it)."""
    if not opts.bwd_ws_fused_dq:
        return "KernelOptions.bwd_ws_fused_dq is off"
    name = _gluon_dkdv_name(flex, lists, True)
    if not versions.usable(name):
        return versions.experimental_status()[name].removeprefix("off: ")
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic mode: the reduce-adds' order varies between runs"
    if capture_grads:
        return "a captured tensor needs a gradient: the dQ programs scatter it"
    return None


def _gluon_dkdv_name(flex: bool, lists: bool, fused: bool) -> str:
    """The experimental name (``versions.EXPERIMENTAL``) of the Gluon dK / dV kernel's variant."""
    return ("gluon_flex_lists_dkdv" if lists else "gluon_flex_dkdv" if flex else "gluon_dkdv") + (
        "_fused_dq" if fused else "")


def _specialized_as(t: torch.Tensor) -> tuple:
    """What Triton specializes a tensor argument and its strides on: a 16-byte aligned address,
    strides equal to 1, strides divisible by 16."""
    return t.data_ptr() % 16 == 0, tuple((st == 1, st % 16 == 0) for st in t.stride())


def flex_backward(dout, q, k, v, out, lse, dlse, blocks, scale: float, score=None, mask=None,
                  options: KernelOptions | dict | None = None, kernel_options: dict | None = None,
                  warmup: bool | str = False, band: Band | None = None):
    """Gradients of ``flex_forward`` through core.attn_bwd's FLEX mode: (dq, dk, dv), dk / dv
    shaped like k / v (summed over the batch where k / v broadcast it), or None where no tile fits
    the BlockMask's BLOCK_SIZE. ``score``: (the score_mod's generated functions, its
    ``codegen.capture_args`` with gradient buffers, whether to scatter the captures' gradient into
    them), or None; ``mask`` as flex_forward's. ``out`` / ``lse``: the forward's; ``dlse``: the
    gradient into the lse, or None. ``band``: as flex_forward's (the band's loops with the score
    hooks, no lists read).

    ``warmup``: compile the launch this call would make into core.attn_bwd's JIT cache and return
    None, launching nothing (nor the row statistics' preprocess): what a forward starts while its
    own kernel compiles (``_flex.dispatch``); with KernelOptions.flex_bwd_split, or where the Gluon
    dK / dV kernel serves the call (``_flex_gluon_dkdv``), ``warmup`` may name one of the two
    launches ("dkdv" or "dq") to compile only that one. ``out``, ``lse`` and
    ``dlse`` are not read then, and ``dout`` may be None: a gradient laid out as the forward's output. The real call reads a
    gradient that Triton would specialize otherwise (the stride-0 gradient of ``out.sum()``, say)
    from a copy in ``out``'s layout, so it finds that kernel compiled."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    tiles = flex_bwd_tiles(q, k, blocks, options, kernel_options, lists=band is None)
    if tiles is None or (warmup and (L == 0 or S == 0)):
        return None
    # A warmup's buffers are meta tensors: the real ones' strides and dtypes, no memory; Triton
    # specializes a meta tensor (data_ptr 0) as a 16-byte aligned pointer, as it does a fresh buffer.
    dev = torch.device("meta") if warmup else q.device
    # dK / dV from the Gluon kernel with the score hooks (the gradient read in out's layout, which
    # follows q's: the forward's warmup predicts the same from q)
    gluon_dkdv = _flex_gluon_dkdv(options, q, k, v, q, band, score, kernel_options, blocks)
    dq = torch.empty_like(q, device=dev)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, S, v.shape[3]), dtype=v.dtype, device=dev)
    if L == 0 or S == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    if band is None:
        blocks = _with_lists(blocks, transposes=True, device=dev if warmup else None)
    if warmup:
        if dout is None:  # as flex_forward lays out its output
            dout = empty_in_layout(torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=dev),
                                   (B, H, L, v.shape[3]))
        if warmup is True or warmup == "dq":  # the row statistics' kernel too: a process's first backward builds it
            # lse as flex_forward makes it; its gradient is one too (HAS_DLSE): autograd hands the
            # backward zeros for an lse the loss does not read, not None
            lse = torch.empty((B, H, L), dtype=torch.float32, device=dev)
            nlse2, delta, stat_strides = _row_stats(dout, dout, lse, lse, lse.stride()[:2], B, L, None, warmup=True)
        else:
            nlse2, delta = _stat_buffers(B, H, L, dev)
            stat_strides = nlse2.stride()[:2]
    else:
        if _specialized_as(dout) != _specialized_as(out) or (  # e.g. out.sum()'s gradient, expanded (stride 0)
                gluon_dkdv and not dout.is_contiguous()):
            # read in out's layout: the kernels its forward warmed up (the Gluon dK / dV kernel takes
            # a contiguous gradient only: a model's transposed one specializes as out does)
            dout = torch.empty_like(out).copy_(dout)
        nlse2, delta, stat_strides = _row_stats(out, dout, lse, dlse, lse.stride()[:2], B, L, None)
    m = tiles.meta
    if band is None:
        kstr, vstr, kv_lists = _flex_kv_args(k, v, blocks, dev)
        lists = (*kv_lists, blocks.q_num_blocks, blocks.q_indices, blocks.full_q_num_blocks, blocks.full_q_indices,
                 _list_strides(blocks.q_num_blocks, blocks.q_indices, blocks.full_q_num_blocks,
                               blocks.full_q_indices, dev))
        BQ, BKV = blocks.BLOCK_SIZE  # the loops walk whole listed blocks: unmasked loads only where none is ragged
    else:  # the band's loops read no list
        assert mask is None and k.shape[0] == v.shape[0] == B, "a band replaces the mask; k / v of batch B"
        kstr, vstr, lists = k.stride(), v.stride(), (q,) * 10
        BQ, BKV = max(m["BLOCK_M1"], m["BLOCK_M2"]), max(m["BLOCK_N1"], m["BLOCK_N2"])
    even = L % BQ == 0 and S % BKV == 0 and D == block_d(D)
    score_on, mask_on = score is not None, mask is not None
    sfns, score_args, score_grad = score if score_on else ({}, None, False)
    mfns, mask_args = mask if mask_on else ({}, None)
    bargs, band_flags = band_args(Band() if band is None else band)
    # a relative-position table's gradient from the diagonal pass, not the dQ programs' scatter
    diagonal = (band is not None and score_grad and "score_mod_grad_diag" in sfns and m["BLOCK_M2"] == m["BLOCK_N2"]
                and resolve(options).flex_diagonal_pass)
    args = dict(zip(_BWD_STRIDES, (*q.stride(), *kstr, *vstr, *dout.stride(), *dq.stride(), *dk.stride(),
                                   *dv.stride(), 0, 0, 0, 0, 0, 0, 0, 0, *stat_strides, 0, 0)),
                Q=q, K=k, V=v, DO=dout, NLSE2=nlse2, Delta=delta, DQ=dq, DK=dk, DV=dv, MASK=q, DMASK=q, CU_Q=q,
                CU_K=q, KEY_EXT=q, WORK=q, FLEX_LISTS=lists,
                SCORE_PTRS=score_args.ptrs if score_on else None, SCORE_META=score_args.meta if score_on else None,
                SCORE_GRADS=score_args.grads if score_on and score_grad else None,
                MASK_PTRS=mask_args.ptrs if mask_on else None, MASK_META=mask_args.meta if mask_on else None,
                B=B, H=H, G=H // Hkv, L_max=L, S_max=S, qk_scale=scale * _RCP_LN2, sm_scale=scale, **bargs,
                dropout_p=0.0, seed=0, N_KV_ITEMS=0, N_Q_ITEMS=0, SEQ_BUCKET=seq_bucket(max(L, S)))
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), **band_flags, HAS_MASK=False, MASK_BOOL=False,
                 MASK_KEYS=False, KEY_RANGE=False, DROPOUT=False, MASK_GRAD=False, MASK_GRAD_ATOMIC=False,
                 VARLEN=False, DETERMINISTIC=torch.are_deterministic_algorithms_enabled(), EVEN=even, USE_TMA=False,
                 DOT_PRECISION=_dot_precision(q.dtype, resolve(options)), WORKLIST=False, DQ_ONLY=False, DKDV_ONLY=False,
                 FLEX=band is None,
                 SCORE_MOD=sfns.get("score_mod"), SCORE_DSCORE=sfns.get("score_mod_dscore"),
                 SCORE_GRAD=sfns.get("score_mod_grad_captures") if score_grad and not diagonal else None,
                 LOAD_SCORE_META=sfns.get("load_meta"),
                 LOAD_GRAD_STRIDES=sfns.get("load_grad_strides") if score_grad else None,
                 MASK_MOD=mfns.get("mask_mod"), LOAD_MASK_META=mfns.get("load_meta"),
                 SPARSE_BQ=blocks.BLOCK_SIZE[0] if band is None else 128,  # a band reads no list: one build
                 SPARSE_BKV=blocks.BLOCK_SIZE[1] if band is None else 128)
    n_kv, n_q = _cdiv(S, m["BLOCK_N1"]) * B * Hkv, _cdiv(L, m["BLOCK_M2"]) * B * H
    launch = dict(**args, **flags, **tiles.meta, num_warps=tiles.warps, num_stages=tiles.stages)
    if resolve(options).flex_bwd_split:  # two kernels, each with only its programs' code
        parts = [("dkdv", (n_kv,), dict(DKDV_ONLY=True)), ("dq", (n_q,), dict(DQ_ONLY=True))]
    else:
        parts = [("both", (n_kv + n_q,), {})]
    # dQ from the Gluon kernel's reduce-adds too (no core launch) where no capture needs a gradient
    fused = gluon_dkdv and fused_dq_refusal(resolve(options), score_grad, flex=True, lists=band is None) is None
    if gluon_dkdv:  # then the core's dQ programs alone, unless fused (a warmup compiles both)
        _ensure_allocator()
        dq_acc = torch.zeros_like(q, dtype=torch.float32, device=dev) if fused else None
        gl_args = (q, k, v, dout, nlse2, delta, stat_strides, dk, dv, scale, bargs, band_flags, None, B, L, S,
                   (sfns, score_args) if score_on else None)
        # the query-side lists and the mask_mod over a BlockMask's lists
        gl_lists = dict(lists=lists[5:], mask=mask) if band is None else {}
        rest = [] if fused else [("dq", (n_q,), dict(DQ_ONLY=True, HEAD_MAJOR=False))]
        if warmup:  # "dkdv": only the Gluon kernel, "dq": only the dQ programs (two warmup threads)
            if warmup is True or warmup == "dkdv":
                ws_bwd.dkdv(*gl_args, warmup=True, dq=dq_acc, **gl_lists)
            parts = rest
        elif fused and versions.run_experimental(_gluon_dkdv_name(True, band is None, True), ws_bwd.dkdv, *gl_args,
                                                 dq=dq_acc, **gl_lists):
            parts, dq = rest, dq_acc
        elif versions.run_experimental(_gluon_dkdv_name(True, band is None, False), ws_bwd.dkdv, *gl_args,
                                       **gl_lists):
            parts = [("dq", (n_q,), dict(DQ_ONLY=True, HEAD_MAJOR=False))]  # (the fused build failed: dQ programs)
    if diagonal:  # core._diagonal_pass's programs: compiled with the dQ programs (the same warmup thread)
        n_blocks = max(_cdiv(L, m["BLOCK_M2"]), _cdiv(S, m["BLOCK_N2"]))
        parts.append(("dq", ((2 * n_blocks - 1) * B * H,), dict(
            DIAG_ONLY=True, HEAD_MAJOR=False, SCORE_GRAD_TILE=sfns["score_mod_grad_tile"],
            SCORE_GRAD_DIAG=sfns["score_mod_grad_diag"])))
    versions.await_compile_key()  # (Triton's own path below)
    for name, grid, only in parts:
        if not warmup:
            core.attn_bwd[grid](**dict(launch, **only))
        elif warmup is True or warmup == name:
            core.attn_bwd.warmup(grid=grid, **dict(launch, **only))
    if warmup:
        return None
    if dq.dtype != q.dtype:  # the Gluon kernel's fp32 sums
        dq = dq.to(q.dtype)
    if k.shape[0] != B:
        dk = dk.sum(0, keepdim=True)
    if v.shape[0] != B:
        dv = dv.sum(0, keepdim=True)
    return dq, dk, dv

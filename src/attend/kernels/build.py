"""Ahead-of-time builds of the core's kernels for a GPU target, with no GPU present.

Used by the CI check that every shipped tuning config compiles for sm_90 and sm_80, and that
the Hopper builds use ``wgmma``. ``attrs`` mirror what a real launch on the benchmarked shapes
specializes: 16-byte aligned pointers, unit last-dim strides, and row strides and lengths
divisible by 16.
"""

from __future__ import annotations

import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import core
from .configs import forward_tma
from .versions import COMPILE_OPTIONS

_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_FLOATS = {"qk_scale", "sm_scale", "dropout_p"}
_INT64 = {"seed"}
_POINTERS = {"Q", "K", "V", "Out", "LSE", "NLSE2", "DLSE", "MASK", "DMASK", "DO", "Delta", "DK", "DV", "DQ"}
_INT_POINTERS = {"CU_Q", "CU_K", "SEQUSED_K", "TABLE", "KEY_EXT", "WORK"}


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Types for every argument of a core kernel, and the specialization attrs."""
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            ty = "fp32" if name in ("LSE", "NLSE2", "DLSE", "Delta", "DMASK", "DQ") else dtype
            sig[name] = "*i1" if name == "MASK" and constexprs.get("MASK_BOOL") else f"*{ty}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _INT_POINTERS:
            sig[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name in _INT64:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name.startswith("stride") and (name.endswith("d") or name in ("stride_maskn", "stride_dmaskn")):
                # contiguous head dim and mask rows, as real launches specialize (Triton turns an
                # int argument equal to 1 into a constant: vector loads, and the pipeliner can
                # stage the mask tile through cp.async only then)
                constexprs.setdefault(name, 1)
                sig[name] = "constexpr"
            elif (name.startswith("stride") or name in ("L_max", "S_max")) and name not in constexprs:
                attrs[(i,)] = [["tt.divisibility", 16]]  # row strides of (.., 128)-wide tensors; even lengths
    return sig, attrs


# attn_fwd's flex inputs and hooks, absent (core.attn_fwd's FLEX): every non-flex build
NO_FLEX = dict(FLEX_LISTS=None, SCORE_PTRS=None, SCORE_META=None, SCORE_GRADS=None, MASK_PTRS=None, MASK_META=None,
               FLEX=False, SCORE_MOD=None, SCORE_DSCORE=None, SCORE_GRAD=None, LOAD_SCORE_META=None,
               LOAD_GRAD_STRIDES=None, MASK_MOD=None, LOAD_MASK_META=None, SPARSE_BQ=128, SPARSE_BKV=128,
               MAX_SCORES=False, DIAG_ONLY=False, SCORE_GRAD_TILE=None, SCORE_GRAD_DIAG=None)


def compile_kernel(fn, config: triton.Config, target: GPUTarget, dtype: str = "bfloat16", head_dim: int = 128,
                   **flags):
    """Compile one core kernel for ``target``; returns the compiled object (``.asm['ptx']``...)."""
    params = inspect.signature(fn.fn).parameters
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=True, WINDOW=False,
                      HAS_MASK=False, MASK_BOOL=False, MASK_KEYS=False, KEY_RANGE=False, DROPOUT=False, MASK_GRAD=False,
                      MASK_GRAD_ATOMIC=False, EVEN=True, USE_TMA=target.arch >= 90 and fn is core.attn_bwd, MASK_TMA=False, HEAD_MAJOR=False, WORKLIST=False, VARLEN=False, SEQUSED=False, PAGED=False, PAGE_SIZE=16, DETERMINISTIC=False, DOT_PRECISION="tf32", GRID_1D=False, ONE_LOOP=True,
                      DQ_ONLY=False, DKDV_ONLY=False, **NO_FLEX)
    constexprs.update(config.kwargs)  # a config may turn EVEN off
    if fn is core.attn_fwd and config.kwargs.get("TMA") and "USE_TMA" not in flags:
        # the forward's TMA loads where a fixed config asks for them, as launch._forward resolves it
        tma_kv, tma_mask = forward_tma(True, flags)
        constexprs["USE_TMA"] = tma_kv and target.arch >= 90
        constexprs["MASK_TMA"] = constexprs["USE_TMA"] and tma_mask
    constexprs.update(flags)
    constexprs = {k: v for k, v in constexprs.items() if k in params}
    sig, attrs = _signature(fn, _DTYPE[dtype], constexprs)
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, **COMPILE_OPTIONS)
    return triton.compile(src, target=target, options=options)


FLEX_VARIANTS = ("score_mod", "mask_mod", "score_and_mask")  # compile_flex's variants
FLEX_BAND_VARIANTS = ("score_mod_band",)  # the score hooks over a causal band, no lists
FLEX_VARLEN_VARIANTS = ("score_mod_varlen",)  # the same over packed sequences (varlen_attn's score_mod): forward only
FLEX_DIAGONAL_VARIANTS = ("score_table_diagonal",)  # a relative table's gradient, core._diagonal_pass: backward only


def compile_flex(target: GPUTarget, variant: str, dtype: str = "bfloat16", head_dim: int = 128,
                 config: triton.Config | None = None, kernel: str = "fwd", one_loop: bool = False, tma: bool = False,
                 ragged_in_full: bool = False, even: bool = False, tf32: bool = False):
    """Compile the core's FLEX mode, ``kernel`` "fwd" (core.attn_fwd) or "bwd" (core.attn_bwd,
    with the captures' gradient scatter), for ``target`` with hooks generated from a fixed set of
    mods (``attend._flex.build._mods``: softcap + captured ALiBi slopes + captured bias table;
    a document mask over captured ids, and causal): ``variant`` in FLEX_VARIANTS, or over a causal
    band (FLEX_BAND_VARIANTS), packed sequences (FLEX_VARLEN_VARIANTS, forward) or a relative
    table's diagonal pass (FLEX_DIAGONAL_VARIANTS, backward: ``table_mod``'s hooks). The config is the
    one launch.flex_tiles / flex_bwd_tiles starts from (the dense non-causal one's). ``one_loop`` /
    ``tma``: KernelOptions.flex_one_loop / flex_tma (the backward: flex_bwd_one_loop; no TMA);
    ``ragged_in_full``: KernelOptions.flex_ragged_in_full (the forward with TMA); ``even``: the
    lengths divide into the lists' blocks (launch's EVEN). fp32 dots run in IEEE precision (PyTorch's
    default, allow_tf32 off) unless ``tf32``, with the tiles launch picks for them."""
    import torch

    from .._flex import codegen
    from .._flex.build import _mods, table_mod
    from .._flex.trace import trace
    from .configs import flex_bwd_tile, flex_tile, heuristic

    block_d = max(16, triton.next_power_of_2(head_dim))
    varlen, diagonal = variant in FLEX_VARLEN_VARIANTS, variant in FLEX_DIAGONAL_VARIANTS
    # the element size and dot precision as launch._dot_precision gives them (fp32: allow_tf32)
    elem, precision = (4, "tf32" if tf32 else "ieee") if dtype == "float32" else (2, "tf32")
    if config is None and kernel == "fwd":  # as launch.flex_tiles (packed: launch._hook_tiles) picks it
        flags = dict(CAUSAL=True, VARLEN=True) if varlen else {}
        base = heuristic("fwd", block_d, flags=dict(flags, DOT_PRECISION=precision), elem=elem)
        block_n, stages, warps = flex_tile(base.kwargs["BLOCK_N"], base.num_stages, base.num_warps, block_d, one_loop,
                                           precision)
        config = triton.Config(dict(BLOCK_M=base.kwargs["BLOCK_M"], BLOCK_N=block_n), num_warps=warps,
                               num_stages=stages)
    elif config is None:  # as launch.flex_bwd_tiles picks it
        base = heuristic("bwd", block_d, flags=dict(DOT_PRECISION=precision), elem=elem)
        meta, stages, warps = flex_bwd_tile({k: base.kwargs[k] for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")},
                                            base.num_stages, base.num_warps, block_d, one_loop, precision)
        config = triton.Config(dict(meta, DQ_ATOMIC=False, HEAD_MAJOR=variant not in FLEX_BAND_VARIANTS),
                               num_warps=warps, num_stages=stages)  # head-major on the lists, as launch.flex_bwd_tiles
    fn = core.attn_fwd if kernel == "fwd" else core.attn_bwd
    score, mask = _mods()
    band = variant in FLEX_BAND_VARIANTS or varlen or diagonal  # flex_forward / flex_backward's ``band``: no lists
    if diagonal:  # the DIAG_ONLY launch (launch.flex_backward's ``diagonal``): square tiles, a table's hooks
        score = table_mod()
        config = triton.Config(dict(config.kwargs, BLOCK_N2=config.kwargs["BLOCK_M2"]), num_warps=config.num_warps,
                               num_stages=config.num_stages)
    graphs = dict(score=trace(score, "score") if variant != "mask_mod" else None,
                  mask=trace(mask, "mask") if variant in FLEX_VARIANTS and variant != "score_mod" else None)
    flags = dict(FLEX=not band, CAUSAL=band, EVEN=even, ONE_LOOP=one_loop, LAZY_RESCALE=False,
                 USE_TMA=tma and kernel == "fwd", MAX_SCORES=True, SPARSE_BQ=128, SPARSE_BKV=128)
    if kernel == "fwd":
        flags["FLEX_RAGGED_IN_FULL"] = ragged_in_full and not band
    ptr = lambda c: "*" + {torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}[c.tensor.dtype]
    lists = (f"*{_DTYPE[dtype]}" if band else "*i32",) * (5 if kernel == "fwd" else 10)  # a band's are q, unread
    tuples = dict(FLEX_LISTS=lists + ("*fp32",) if kernel == "fwd" else lists)
    for kind, prefix in (("score", "SCORE"), ("mask", "MASK")):
        g = graphs[kind]
        if g is None:
            continue
        fns = codegen.hooks(g, fast=dtype != "float32").functions  # as FlexCall.score_hooks picks them
        flags[f"{prefix}_MOD"] = fns[f"{kind}_mod"]
        flags[f"LOAD_{prefix}_META"] = fns["load_meta"]
        tuples[f"{prefix}_PTRS"] = tuple(ptr(c) for c in g.captures)
        tuples[f"{prefix}_META"] = "*i32"
        if kind == "score" and kernel == "bwd":  # the derivative, and the captures' gradient scatter
            flags.update(SCORE_DSCORE=fns["score_mod_dscore"], SCORE_GRAD=fns["score_mod_grad_captures"],
                         LOAD_GRAD_STRIDES=fns["load_grad_strides"])
            if diagonal:
                flags.update(SCORE_GRAD=None, DIAG_ONLY=True, SCORE_GRAD_TILE=fns["score_mod_grad_tile"],
                             SCORE_GRAD_DIAG=fns["score_mod_grad_diag"])
            tuples["SCORE_GRADS"] = tuple("*fp32" for _ in g.captures)
    params = inspect.signature(fn.fn).parameters
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, WINDOW=False,
                      HAS_MASK=False, MASK_BOOL=False, MASK_KEYS=False, KEY_RANGE=False, DROPOUT=False,
                      MASK_TMA=False, WORKLIST=False, VARLEN=varlen, SEQUSED=False, PAGED=False, PAGE_SIZE=16,
                      DOT_PRECISION=precision, GRID_1D=False, MASK_GRAD=False, MASK_GRAD_ATOMIC=False,
                      DETERMINISTIC=False, HEAD_MAJOR=False, DQ_ONLY=False, DKDV_ONLY=False, **NO_FLEX)
    constexprs.update(config.kwargs)
    constexprs.update(flags)
    constexprs = {key: val for key, val in constexprs.items() if key in params}
    for name in tuples:
        constexprs.pop(name, None)
    sig, attrs = _signature(fn, _DTYPE[dtype], constexprs)
    sig.update(tuples)
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, **COMPILE_OPTIONS)
    return triton.compile(src, target=target, options=options)


def _gluon_desc(dtype: str, rows: int, cols: int) -> str:
    """The signature type of a Gluon host tensor descriptor of [rows, cols] boxes (ws.descriptor's)."""
    from triton.experimental.gluon import language as gl

    gdt = {"float16": gl.float16, "bfloat16": gl.bfloat16, "float32": gl.float32}[dtype]
    return f"tensordesc<{_DTYPE[dtype]}[{rows}, {cols}],{gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)!r}>"


def _compile_gluon(fn, target: GPUTarget, sig: dict, ints: tuple, constexprs: dict):
    """Compile a Gluon kernel of ``sig`` (plus ``ints`` as i32 and ``constexprs``) at 4 warps."""
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = dict(sig, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs})
    options = dict(num_warps=4, **COMPILE_OPTIONS)
    return triton.compile(GluonASTSource(fn, sig, constexprs=constexprs), target=target, options=options)


def _varlen(varlen: bool, uniform: bool) -> int:
    """The Gluon kernels' VARLEN constexpr (ws_common.varlen_mode)."""
    from .ws_common import PACKED, UNIFORM

    if uniform and not varlen:
        raise ValueError("uniform=True describes packed sequences: pass varlen=True with it")
    return UNIFORM.value if uniform else PACKED.value if varlen else 0


def compile_ws(target: GPUTarget, dtype: str = "bfloat16", has_bias: bool = False, causal: bool = False,
               window: bool = False, varlen: bool = False, o_tma: bool = True, q_rows: bool = False,
               uniform: bool = False, score_mod: bool = False, pipe: bool | None = None, lists: bool = False):
    """Compile the warp-specialized Gluon forward (ws.py) for ``target`` (sm_90 only); ``o_tma`` as
    KernelOptions.o_tma (on by default); ``uniform`` (with ``varlen``): packed sequences that all
    have L_max queries and S_max keys (a model's row views: offsets computed, none read;
    ``ws_common.sequence`` / ``varlen_mode``), the key edges masked only where causal or windowed
    (the build takes S_max in whole key blocks); ``score_mod``: flex's score hooks generated from
    ``attend._flex.build._mods``'s score_mod (softcap, captured ALiBi slopes and bias table), with
    the hardware tanh, as a 16-bit flex call over a band takes them; ``pipe``: KernelOptions.fwd_ws_pipeline
    (None: as a launch decides it, ``ws.pipelined``); ``lists``: a BlockMask's lists walked (LISTS)
    with ``_mods``' mask_mod on the partial blocks, keys ragged (EDGES)."""
    from . import ws
    from .ws_common import hook_constexprs

    q, kv = _gluon_desc(dtype, ws.ROWS, ws.HEAD_DIM), _gluon_desc(dtype, ws.BLOCK_N, ws.HEAD_DIM)
    constexprs = dict(ROWS=ws.ROWS, BLOCK_N=ws.BLOCK_N, D=ws.HEAD_DIM, STAGES=ws.STAGES, QBUFS=1 if has_bias else 2,
                      HAS_BIAS=has_bias, CAUSAL=causal, WINDOW=window, VARLEN=_varlen(varlen, uniform),
                      EDGES=causal or window or (varlen and not uniform) or lists, TBUF=ws.TBUF, O_TMA=o_tma,
                      Q_ROWS=q_rows, PIPE=ws.pipelined(pipe, score_mod))
    ints = ("stride_o", "stride_lseh", "n_tiles", "n_m", "sec", "H", "G", "L_max", "S_max", "diag", "win_right",
            "win_left")
    sig = dict(q_desc=q, k_desc=kv, v_desc=kv, b_desc=_gluon_desc(dtype, ws.ROWS, ws.BLOCK_N) if has_bias else q,
               o_desc=q, out_ptr=f"*{_DTYPE[dtype]}", lse_ptr="*fp32", cu_q="*i32", cu_k="*i32", counter_ptr="*i32",
               qk_scale="fp32")
    fns, ptrs = _mod_hooks("score") if score_mod else (None, ())  # as ws.forward passes them
    constexprs.update(hook_constexprs(fns, derivative=False))
    sig.update(score_ptrs=ptrs, score_meta="*i32", sm_scale="fp32")
    list_constexprs, list_sig = _list_args(lists)
    constexprs.update(list_constexprs)
    sig.update(list_sig)
    return _compile_gluon(ws.attn_fwd_ws, target, sig, ints, constexprs)


def _mod_hooks(kind: str) -> tuple[dict, tuple]:
    """The generated hooks of ``attend._flex.build._mods``' score_mod (``kind`` "score": softcap,
    captured ALiBi slopes and bias table) or mask_mod ("mask": a document mask over captured ids, and
    causal), with the hardware tanh, as a 16-bit flex call on a GPU takes them, and the signature
    types of its captures' pointers."""
    import torch

    from .._flex import codegen
    from .._flex.build import _mods
    from .._flex.trace import trace

    g = trace(_mods()[0 if kind == "score" else 1], kind)
    ptrs = tuple("*" + {torch.float32: "fp32", torch.int64: "i64"}[c.tensor.dtype] for c in g.captures)
    return codegen.hooks(g, fast=True).functions, ptrs


def _list_args(lists: bool) -> tuple[dict, dict]:
    """(constexprs, signature entries) of both Gluon kernels' LISTS: the mask_mod's hooks
    (``_mod_hooks``) and the five int32 list pointers, or their placeholders."""
    fns, ptrs = _mod_hooks("mask") if lists else ({}, ())
    return (dict(LISTS=lists, HAS_MASK_MOD=lists, MASK_MOD=fns.get("mask_mod", False),
                 LOAD_MASK_META=fns.get("load_meta", False)),
            dict(list_ptrs=("*i32",) * 5 if lists else (), mask_ptrs=ptrs, mask_meta="*i32"))


def compile_ws_bwd(target: GPUTarget, dtype: str = "bfloat16", causal: bool = False, window: bool = False,
                   varlen: bool = False, q_rows: bool = False, uniform: bool = False, score_mod: bool = False,
                   fused_dq: bool = False, lists: bool = False):
    """Compile the warp-specialized Gluon dK / dV kernel (ws_bwd.py) for ``target`` (sm_90 only);
    ``uniform`` and ``score_mod`` as compile_ws's (the score hook and its derivative); ``fused_dq``:
    dQ added by TMA reduce-adds from the kernel (FUSED_DQ), as ``ws_bwd.dkdv`` builds it given a dq;
    ``lists``: a BlockMask's lists walked (LISTS) with ``attend._flex.build._mods``'s mask_mod (a
    document mask over captured ids, and causal) on the partial blocks."""
    from . import ws_bwd
    from .ws_common import hook_constexprs

    qd, kv = _gluon_desc(dtype, ws_bwd.BLOCK_M, ws_bwd.HEAD_DIM), _gluon_desc(dtype, ws_bwd.KEYS, ws_bwd.HEAD_DIM)
    constexprs = dict(KEYS=ws_bwd.KEYS, BLOCK_M=ws_bwd.BLOCK_M, D=ws_bwd.HEAD_DIM, STAGES=ws_bwd.STAGES,
                      KBUFS=ws_bwd.FUSED_KBUFS if fused_dq else ws_bwd.KBUFS, STAT_PAD=core.STAT_PAD.value,
                      CAUSAL=causal, WINDOW=window, VARLEN=_varlen(varlen, uniform),
                      TBUF=ws_bwd.TBUF, Q_ROWS=q_rows, FUSED_DQ=fused_dq)
    ints = ("stride_dk", "stride_dv", "stride_statb", "stride_stath", "n_tiles", "n_n", "sec", "H", "G", "L_max",
            "S_max", "diag", "win_right", "win_left")
    row = f"tensordesc<fp32[{ws_bwd.BLOCK_M}],{ws_bwd.ROW_LAYOUT!r}>"
    dq = _gluon_desc("float32", ws_bwd.BLOCK_M, ws_bwd.HEAD_DIM // 2) if fused_dq else qd
    sig = dict(q_desc=qd, do_desc=qd, k_desc=kv, v_desc=kv, nl_desc=row, dl_desc=row, dq_desc=dq,
               dk_ptr=f"*{_DTYPE[dtype]}",
               dv_ptr=f"*{_DTYPE[dtype]}", cu_q="*i32", cu_k="*i32", counter_ptr="*i32", qk_scale="fp32",
               sm_scale="fp32")
    fns, ptrs = _mod_hooks("score") if score_mod else (None, ())  # as ws_bwd.dkdv passes them
    constexprs.update(hook_constexprs(fns, derivative=True))
    sig.update(score_ptrs=ptrs, score_meta="*i32")
    list_constexprs, list_sig = _list_args(lists)
    constexprs.update(list_constexprs, SPARSE_BQ=ws_bwd.LIST_BLOCK)
    sig.update(list_sig)
    return _compile_gluon(ws_bwd.attn_bwd_dkdv_ws, target, sig, ints, constexprs)


KERNELS = {"fwd": core.attn_fwd, "bwd": core.attn_bwd}
# The warp-specialized Gluon forward (ws.py), sm_90 only: compile_ws's flags per variant.
WS_FEATURES = {"no_mask": {}, "float_bias": dict(has_bias=True), "causal_bias": dict(has_bias=True, causal=True),
               "varlen_window": dict(causal=True, window=True, varlen=True),
               "q_rows_causal": dict(causal=True, q_rows=True),
               "rows_causal": dict(causal=True, varlen=True, uniform=True),  # a model's views, packed
               "rows": dict(varlen=True, uniform=True),  # likewise, no edge masks (whole key blocks)
               "score_mod_causal": dict(causal=True, score_mod=True),  # flex's score hooks over a band
               "rows_score_mod": dict(varlen=True, uniform=True, score_mod=True),  # ... on a model's views
               "score_mod_causal_pipeline": dict(causal=True, score_mod=True, pipe=True),  # fwd_ws_pipeline=True
               "causal_one_block_at_a_time": dict(causal=True, pipe=False),  # fwd_ws_pipeline=False
               # a BlockMask's lists and mask_mod (flex's document masks), pipelined or not, with a score_mod
               "lists": dict(lists=True), "lists_score_mod": dict(lists=True, score_mod=True)}
# The warp-specialized Gluon dK / dV kernel (ws_bwd.py), sm_90 only: compile_ws_bwd's flags per variant.
WS_BWD_FEATURES = {"no_band": {}, "causal": dict(causal=True),
                   "varlen_window": dict(causal=True, window=True, varlen=True),
                   "q_rows_causal": dict(causal=True, q_rows=True),
                   "rows_causal": dict(causal=True, varlen=True, uniform=True),
                   "score_mod_causal": dict(causal=True, score_mod=True),  # flex's score hooks over a band
                   "rows_score_mod": dict(varlen=True, uniform=True, score_mod=True),  # ... on a model's views
                   # dQ from the kernel by TMA reduce-adds (ws_bwd.dkdv given a dq)
                   "no_band_fused_dq": dict(fused_dq=True), "causal_fused_dq": dict(causal=True, fused_dq=True),
                   "q_rows_causal_fused_dq": dict(causal=True, q_rows=True, fused_dq=True),
                   "rows_causal_fused_dq": dict(causal=True, varlen=True, uniform=True, fused_dq=True),
                   "score_mod_causal_fused_dq": dict(causal=True, score_mod=True, fused_dq=True),
                   "varlen_window_fused_dq": dict(causal=True, window=True, varlen=True, fused_dq=True),
                   # a BlockMask's lists and mask_mod (flex's document masks), with and without a score_mod
                   "lists_fused_dq": dict(lists=True, fused_dq=True),
                   "lists_score_mod_fused_dq": dict(lists=True, score_mod=True, fused_dq=True)}
# Feature variants compiled once each (heuristic config, D=128, sm_90) besides the plain builds,
# which assume EVEN lengths (multiples of configs.EVEN_TILE), as the benchmarked shapes have.
_FEATURES = {
    "ragged_lengths": dict(EVEN=False),
    "bool_mask_dropout": dict(CAUSAL=False, HAS_MASK=True, MASK_BOOL=True, DROPOUT=True),
    "bias_grad": dict(CAUSAL=False, HAS_MASK=True, MASK_GRAD=True),
    "broadcast_bias_grad": dict(CAUSAL=False, HAS_MASK=True, MASK_GRAD=True, MASK_GRAD_ATOMIC=True),
    "varlen_sliding_window": dict(VARLEN=True, WINDOW=True, EVEN=False),
    "varlen_work_list": dict(VARLEN=True, WORKLIST=True, EVEN=False),
    "key_padding_mask": dict(CAUSAL=False, HAS_MASK=True, MASK_BOOL=True, MASK_KEYS=True, KEY_RANGE=True),
}
# The forward's TMA loads (KernelOptions.fwd_tma), forced on, besides the fixed configs that ask for them.
_FWD_FEATURES = {"paged_seqused": dict(VARLEN=True, SEQUSED=True, PAGED=True, PAGE_SIZE=16),
                 "one_grid_axis": dict(GRID_1D=True),  # batch x heads past CUDA's cap on grid y
                 "tma_loads": dict(USE_TMA=True), "tma_varlen": dict(VARLEN=True, EVEN=False, USE_TMA=True),
                 "tma_bias": dict(CAUSAL=False, HAS_MASK=True, USE_TMA=True, MASK_TMA=True),
                 # a window's edges in the inner loop (ONE_LOOP; its fixed config keeps three loops)
                 "window_one_loop_tma": dict(VARLEN=True, WINDOW=True, EVEN=False, USE_TMA=True, ONE_LOOP=True)}
# The backward reads through TMA descriptors on sm_90 where it can, and through pointers otherwise.
# One query row (decode shapes: Triton turns L_max == 1 into a constant, the query loops fold away)
# over grouped heads, whose loop then becomes the innermost one (it must not be pipelined).
_BWD_FEATURES = {"pointer_loads": dict(USE_TMA=False), "head_major_order": dict(HEAD_MAJOR=True),
                 "one_query_row": dict(L_max=1, CAUSAL=False, EVEN=False),
                 "window_one_loop": dict(VARLEN=True, WINDOW=True, EVEN=False, ONE_LOOP=True),
                 "dq_programs_only": dict(DQ_ONLY=True, HEAD_MAJOR=False)}  # beside ws_bwd's dK / dV


def rule_jobs() -> list[tuple]:
    """One sm_90 build per config of every fixed-config rule (configs.RULES), at the rule's head
    dim (128 where it has none) and with the launch flags that select it, except where that is
    already a plain build (a listed config, default flags, D=128)."""
    from .configs import BWD_CONFIGS, FWD_CONFIGS, RULES

    def key(kind, c):
        return kind, tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages

    plain = {key(k, c) for k, cfgs in (("fwd", FWD_CONFIGS), ("bwd", BWD_CONFIGS)) for c in cfgs}
    from .configs import Key

    jobs = []
    for i, rule in enumerate(RULES):
        precision = rule.flags.get("DOT_PRECISION")
        dims = [rule.d or 128]
        if rule.d is None and precision in ("ieee", "tf32x3"):  # fp32's any-head-dim rules: where they match
            probe = lambda d: Key(rule.kind, d, l_bucket=1 if rule.name.startswith("decode") else None,  # noqa: E731
                                  elem=rule.elem, precision=precision)
            dims += [d for d in (64, 256) if rule.matches(probe(d))]
        for bucket, c in sorted(rule.tiles.items()):
            kind = "fwd" if rule.kind == "fwd" else "bwd"
            if not rule.flags and rule.elem == 2 and (rule.d or 128) == 128 and key(kind, c) in plain:
                continue
            for d in dims:
                jobs.append(("rule", i, 90, d, f"rule_{i}_{rule.kind}_{rule.name}_{bucket}"))
                if precision in ("ieee", "tf32x3"):  # FMA loops / operand splits: the non-causal build holds more
                    jobs.append(("rule", i, 90, d, f"rule_{i}_{rule.kind}_{rule.name}_noncausal_{bucket}"))
    return jobs


def job_name(job: tuple) -> str:
    """A build's file name in a dump (``--dump``): kernel, config index (-1: fixed), arch, head dim, variant."""
    kind, index, arch, head_dim, *feature = job
    return f"{kind}-{index}-sm{arch}-d{head_dim}" + (f"-{feature[0]}" if feature else "")


def _build_one(job: tuple, dump: str | None = None) -> dict:
    report = _build(job)
    if dump is not None:
        import os

        with open(os.path.join(dump, job_name(job) + ".ptx"), "w") as f:
            f.write(report.pop("_ptx"))
    report.pop("_ptx", None)
    return report


def _build(job: tuple) -> dict:
    kind, index, arch, head_dim, *feature = job
    if kind == "fwd_ws":
        compiled = compile_ws(GPUTarget("cuda", arch, 32), **WS_FEATURES[feature[0]])
        return _report(compiled, kind, "warp-specialized", arch, head_dim, feature[0])
    if kind in ("flex", "flex_bwd"):  # the core's FLEX mode with generated hooks (compile_flex)
        dtype = "bfloat16" if arch >= 90 else "float16"
        kernel = "fwd" if kind == "flex" else "bwd"
        compiled = compile_flex(GPUTarget("cuda", arch, 32), feature[0], dtype=dtype, head_dim=head_dim,
                                kernel=kernel, tma=arch >= 90)  # as launch._flex_tma picks it (flex_tma)
        prefix = "flex_" if kernel == "fwd" else "flex_bwd_"
        return _report(compiled, kernel, f"flex (launch.flex_{'' if kernel == 'fwd' else 'bwd_'}tiles)", arch,
                       head_dim, prefix + feature[0])
    if kind == "probe":  # versions.tma_atomic_add through ws_common.tma_add_tile: an fp32 [64, 128] tile
        from .ws_common import tma_add_tile

        desc = _gluon_desc("float32", 64, 128)
        compiled = _compile_gluon(tma_add_tile, GPUTarget("cuda", arch, 32), dict(src_desc=desc, dst_desc=desc), (), {})
        return _report(compiled, kind, "probe", arch, head_dim, feature[0])
    if kind == "bwd_ws":
        compiled = compile_ws_bwd(GPUTarget("cuda", arch, 32), **WS_BWD_FEATURES[feature[0]])
        return _report(compiled, kind, "warp-specialized", arch, head_dim, feature[0])
    from .configs import BWD_CONFIGS, FWD_CONFIGS, RULES, heuristic

    if kind == "rule":  # a fixed-config rule's config (rule_jobs), with the flags that select it
        rule = RULES[index]
        config = rule.tiles[int(feature[0].rsplit("_", 1)[1])]
        kernel = "fwd" if rule.kind == "fwd" else "bwd"
        dtype = {2: "bfloat16", 4: "float32"}[rule.elem]
        flags = dict(rule.flags, CAUSAL=False) if "_noncausal_" in feature[0] else rule.flags
        compiled = compile_kernel(KERNELS[kernel], config, GPUTarget("cuda", arch, 32), dtype=dtype,
                                  head_dim=head_dim, **flags)
        return _report(compiled, kernel, str(config), arch, head_dim, feature[0])
    flags = {**_FEATURES, **_FWD_FEATURES, **_BWD_FEATURES}[feature[0]] if feature else {}
    # Feature variants take the fixed config a launch with those features takes.
    config = {"fwd": FWD_CONFIGS, "bwd": BWD_CONFIGS}[kind][index] if index >= 0 else heuristic(
        kind, head_dim, flags={"CAUSAL": True, **flags})
    dtype = "bfloat16" if arch >= 90 else "float16"
    compiled = compile_kernel(KERNELS[kind], config, GPUTarget("cuda", arch, 32), dtype=dtype, head_dim=head_dim,
                              **flags)
    return _report(compiled, kind, str(config), arch, head_dim, feature[0] if feature else "")


def _report(compiled, kind: str, config: str, arch: int, head_dim: int, feature: str) -> dict:
    """What the build check asserts about one build: its MMA instructions, TMA use (and TMA
    reduce-adds), shared memory, and the registers and stack ptxas gave it (None where Triton ships
    no cuobjdump)."""
    ptx = compiled.asm["ptx"]
    regs, stack = resources(compiled.asm.get("cubin"))
    return dict(kernel=kind, config=config, arch=arch, head_dim=head_dim, feature=feature, wgmma="wgmma" in ptx,
                mma_sync="mma.sync" in ptx, tma="cp.async.bulk.tensor" in ptx, shared=compiled.metadata.shared,
                tma_reduce_add=any("cp.reduce.async.bulk.tensor" in line and ".add" in line
                                   for line in ptx.splitlines()),
                tanh_approx="tanh.approx.f32" in ptx, regs=regs, stack=stack, _ptx=ptx)


def resources(cubin: bytes | None) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes) of a cubin's kernel, from the cuobjdump that Triton ships
    beside its ptxas; (None, None) where there is none. The stack holds what ptxas spilled: on sm_90
    it gave fp32's IEEE forward at 64x64 and 4 warps 32 registers and a 7.5 KB stack, 24x slower than
    its causal build (docs/kernels.md, "Tuning: fp32 with IEEE dots")."""
    import os
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if cubin is None or not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (None, None)


def build_all(archs=(90, 80), processes: int = 2, dump: str | None = None) -> list[dict]:
    """Compile every shipped config of every core kernel for each arch at head dim 128, the fixed
    (heuristic) configs at head dims 64 and 256, the feature variants, and every fixed-config rule's
    configs (``rule_jobs``), the flex forward's and backward's variants (``compile_flex``), and the
    TMA reduce-add probe (``ws_common.tma_add_tile``, sm_90); one dict per build.
    ``dump``: a folder that receives each build's PTX as ``job_name(job).ptx``."""
    import functools
    from concurrent.futures import ProcessPoolExecutor

    from .configs import BWD_CONFIGS, FWD_CONFIGS

    jobs = [(kind, i, arch, 128) for kind, cfgs in (("fwd", FWD_CONFIGS), ("bwd", BWD_CONFIGS))
            for i in range(len(cfgs)) for arch in archs]
    jobs += [(kind, -1, 90, d) for kind in ("fwd", "bwd") for d in (64, 256)]
    jobs += [(kind, -1, 90, 128, feature) for kind in ("fwd", "bwd") for feature in _FEATURES]
    jobs += [("fwd", -1, 90, 128, feature) for feature in _FWD_FEATURES]
    jobs += [("bwd", -1, 90, 128, feature) for feature in _BWD_FEATURES]
    jobs += [("fwd_ws", -1, 90, 128, feature) for feature in WS_FEATURES]
    jobs += [("bwd_ws", -1, 90, 128, feature) for feature in WS_BWD_FEATURES]
    jobs += [("probe", -1, 90, 128, "tma_add_tile")]
    jobs += rule_jobs()
    jobs += [(kind, -1, arch, 128, variant) for kind in ("flex", "flex_bwd") for variant in FLEX_VARIANTS
             for arch in archs]
    jobs += [(kind, -1, arch, 128, variant) for kind in ("flex", "flex_bwd") for variant in FLEX_BAND_VARIANTS
             for arch in archs]
    jobs += [("flex", -1, arch, 128, variant) for variant in FLEX_VARLEN_VARIANTS for arch in archs]
    jobs += [("flex_bwd", -1, arch, 128, variant) for variant in FLEX_DIAGONAL_VARIANTS for arch in archs]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(functools.partial(_build_one, dump=dump), jobs))


def normalize_ptx(ptx: str) -> list[str]:
    """The PTX lines that carry code: no comments, ``.loc`` / ``.file`` lines, debug sections, or
    the labels only debug info references. (The kernels' parameters keep their order: a launch
    names its arguments, ``fastlaunch.Launcher``, but the signatures stay as they are.)"""
    lines, in_debug = [], False
    for line in ptx.splitlines():
        s = line.split("//", 1)[0].strip()
        if in_debug:
            in_debug = not s.startswith("}")
            continue
        if s.startswith(".section") and ".debug" in s:
            in_debug = True
            continue
        if not s or s.startswith((".loc", ".file", "$L__tmp", "$L__func_begin", "$L__func_end")):
            continue
        lines.append(s)
    return lines


def compare(before: str, after: str) -> int:
    """Compare two ``--dump`` folders build by build; prints one line per build that differs, is
    missing from ``after`` or is new in it, and returns how many differ or are missing."""
    import difflib
    import os

    names = sorted(set(os.listdir(before)) & set(os.listdir(after)))
    gone = sorted(set(os.listdir(before)) - set(os.listdir(after)))
    for name in gone:
        print(f"{name}: missing from {after}")
    for name in sorted(set(os.listdir(after)) - set(os.listdir(before))):
        print(f"{name}: new in {after}")
    differ = 0
    for name in names:
        a, b = os.path.join(before, name), os.path.join(after, name)
        la, lb = normalize_ptx(open(a).read()), normalize_ptx(open(b).read())
        if la != lb:
            diff = [d for d in difflib.unified_diff(la, lb, lineterm="", n=0) if d[:1] in "+-"]
            print(f"{name}: {len(diff) - 2} lines differ, first: {diff[2:6]}")
            differ += 1
    print(f"{len(names) - differ} of the {len(names)} builds in both identical; {len(gone)} missing")
    return differ + len(gone)


if __name__ == "__main__":
    import argparse
    import json
    import os
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", metavar="DIR", help="also write each build's PTX to DIR")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two dumps; build nothing")
    opts = parser.parse_args()
    if opts.compare:
        sys.exit(1 if compare(*opts.compare) else 0)
    if opts.dump:
        os.makedirs(opts.dump, exist_ok=True)
    json.dump(build_all(dump=opts.dump), sys.stdout)

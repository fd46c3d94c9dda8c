"""The flex front door's one seam: traced mods + block lists in, (out, lse, max_scores) out.

:func:`run` is what ``attend.flex_attention.flex_attention`` calls after validating arguments.
:func:`_fused` runs the Triton core's flex mode (forward ``launch.flex_forward``, backward
``launch.flex_backward``; docs/flex.md); the calls it declines run the blocked torch path
(:mod:`.eager`). A forward that autograd will differentiate starts compiling its backward's kernel
on a worker thread before its own kernel compiles (:func:`_backward_warmup`), which hands each of
the backward's compiles to a forked process (kernels/forkcompile.py: Triton's compiler holds the GIL
through its AST-to-IR pass), so a new mod's first forward and backward pay for about one compile, not
three.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import threading
import time
from dataclasses import dataclass

import torch

from .._layout import Band
from ..kernels import options as kernel_options
from . import codegen, eager
from .lists import BlockLists
from .trace import ModGraph


@dataclass
class FlexCall:
    """Everything one flex call computes from (the core's launcher takes the same)."""

    query: torch.Tensor  # [B, Hq, L, E]
    key: torch.Tensor  # [B or 1, Hkv, S, E]
    value: torch.Tensor  # [B or 1, Hkv, S, Ev]
    score: ModGraph | None  # None: identity score_mod
    mask: ModGraph | None  # None: no mask work (partial blocks kept whole)
    blocks: BlockLists
    scale: float
    kernel_options: dict | None = None  # flex_attention's: BLOCK_M / BLOCK_N / num_warps / num_stages
    band: Band | None = None  # the mask as a band (band.py), where the BlockMask lists exactly its blocks
    # and k / v have the query's batch (a broadcast key batch walks the lists)
    want_max: bool = True  # whether the caller reads max_scores: else the fused paths compute none
    path: str | None = None  # the forward's FORWARD_PATHS entry, as ``run`` chose it (None: not chosen yet)

    @property
    def score_captures(self) -> list[torch.Tensor]:
        return [c.tensor for c in self.score.captures] if self.score is not None else []

    @property
    def mask_captures(self) -> list[torch.Tensor]:
        return [c.tensor for c in self.mask.captures] if self.mask is not None else []

    @functools.cached_property
    def score_hooks(self) -> codegen.Hooks | None:
        """The score_mod's generated Triton functions (generated once per structure; looked up
        once per call: the lookup builds the structure key). fp16 / bf16 on a GPU take the
        hardware's tanh (``codegen.source``)."""
        if self.score is None:
            return None
        opts = kernel_options.current()
        fast = opts.flex_fast_tanh and not opts.interpret and self.query.is_cuda and self.query.dtype in (
            torch.float16, torch.bfloat16)
        return codegen.hooks(self.score, fast, self.wide_index)

    @functools.cached_property
    def mask_hooks(self) -> codegen.Hooks | None:
        return codegen.hooks(self.mask, wide=self.wide_index) if self.mask is not None else None

    @property
    def wide_index(self) -> bool:
        """Whether the indices may pass ``codegen.FLOAT_INDEX_LIMIT`` (the ``wide`` hooks)."""
        return codegen.wide_index(self.query.shape[2], self.key.shape[2])

    def hooks(self) -> dict:
        """The generated Triton functions of this call's mods (generated once per structure)."""
        out = {}
        if self.score is not None:
            out.update(self.score_hooks.functions)
        if self.mask is not None:
            out.update(self.mask_hooks.functions)
        return out


# How many calls each path ran (tests assert which path a call took): forwards, then backwards
# of fused forwards (the core's flex backward, or a recomputation through the blocked path).
# "band": calls run on the dense fused path (a band mask_mod and no score_mod; ``_band_route``);
# "band_hooks" / "band_hooks_backward": the core's flex forwards / backwards that walked a band with
# the score hooks (``_hook_band``); "band_hooks_gluon": such forwards on the Gluon forward instead.
PATHS = {"fused": 0, "blocked": 0, "fused_backward": 0, "blocked_backward": 0, "band": 0, "band_hooks": 0,
         "band_hooks_backward": 0, "band_hooks_gluon": 0, "lists_gluon": 0}


def _fusable(call: FlexCall) -> bool:
    """Whether the core's flex mode takes the call (``_unfusable``)."""
    return _unfusable(call) is None


def _unfusable(call: FlexCall) -> str | None:
    """Why the core's flex mode does not take the call, or None where it does: CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1 in fp16 / fp32 (the interpreter has no bf16 arithmetic); fp16 /
    bf16 / fp32, equal head dims up to 256, non-empty lengths. The blocked path runs the rest."""
    import os

    q, k, v = call.query, call.key, call.value
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"query dtype {q.dtype}: the kernels take fp16, bf16 and fp32"
    elif q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if q.dtype not in (torch.float16, torch.float32):
            return f"{q.dtype} under Triton's interpreter, which has fp16 and fp32 arithmetic only"
    else:
        return f"{q.device.type} tensors: the Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"query, key and value dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernels take one"
    if not v.shape[-1] == q.shape[-1] <= 256:
        return f"head dims {q.shape[-1]} (query / key) and {v.shape[-1]} (value): the kernels take one, up to 256"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return f"{q.shape[2]} queries and {k.shape[2]} keys: nothing to run a kernel on"
    return None


def _hook_band(call: FlexCall, opts: kernel_options.KernelOptions | None = None) -> Band | None:
    """The band the core's kernels walk with the score hooks instead of the lists and the mask
    hook (``call.band``, a score_mod, ``KernelOptions.flex_bands`` on in ``opts``, default the
    options in force); None: the lists."""
    return None if _hook_band_refusal(call, opts or kernel_options.current()) else call.band


_NOT_A_BAND = ("the mask is not a band (no mask, or the blocks attend's create_block_mask built from a causal / "
               "sliding-window mask_mod), or a key batch of 1 is broadcast")


def _hook_band_refusal(call: FlexCall, opts: kernel_options.KernelOptions) -> str | None:
    """Why ``_hook_band`` gives no band (None where it gives one)."""
    if call.band is None:
        return _NOT_A_BAND
    if call.score is None:
        return "no score_mod: the dense kernels serve a band alone"
    if not opts.flex_bands:
        return "KernelOptions.flex_bands is off"
    return None


def _band_refusal(call: FlexCall, opts: kernel_options.KernelOptions) -> str | None:
    """Why ``_band_route`` (a band mask and no score_mod on attend's dense kernels) declines the
    call, or None where it takes it (the core's flex mode must also take it: ``_unfusable``)."""
    if call.band is None:
        return _NOT_A_BAND
    if call.score is not None:
        return "a score_mod: the dense kernels call no hook"
    if call.want_max:
        return "max_scores asked: the dense kernels keep no row max"
    if call.kernel_options:
        return "kernel_options given: they tune the flex kernel"
    if not opts.flex_bands:
        return "KernelOptions.flex_bands is off"
    return _unfusable(call)


def _gluon_refusal(call: FlexCall, opts: kernel_options.KernelOptions, lists: bool = False) -> str | None:
    """Why the band hooks' forward (``lists``: a call over a BlockMask's lists) does not try the Gluon
    forward first (None where it does; the launch still checks the layouts, ``ws.eligible``)."""
    from ..kernels import launch

    if call.want_max:
        return "max_scores asked: the Gluon forward keeps no row max"
    if call.kernel_options:
        return "kernel_options given: they tune the core's flex kernel"
    if lists:
        return launch.flex_lists_gluon_refusal(call.query, call.key, call.blocks, opts)
    return launch.flex_band_gluon_refusal(call.query, call.key, opts)


# Where a flex call's forward runs, fastest first: ``forward_path`` picks one, ``run`` runs it.
FORWARD_PATHS = {
    "band": "attend's dense kernels over the mask's band: no list read, no mask or score work per block",
    "gluon_hooks": "the Hopper Gluon forward with the score hooks over the mask's band",
    "band_hooks": "the Triton core with the score hooks over the mask's band (no list read, no mask hook)",
    "gluon_lists": "the Hopper Gluon forward walking the BlockMask's lists, the mask_mod on partial blocks only",
    "lists": "the Triton core walking the BlockMask's lists, the mask_mod on partial blocks only",
    "blocked": "the blocked torch-ops path (no Triton kernel)",
}
BACKWARD_PATHS = {
    "dense": "the dense kernels' backward over the band",
    "gluon_fused": "dK, dV and dQ from the Hopper Gluon kernel with the score hooks over the band or the "
                   "BlockMask's lists (dQ by TMA reduce-adds; no dQ programs)",
    "gluon_dkdv": "dK / dV from the Hopper Gluon kernel with the score hooks over the band or the BlockMask's "
                  "lists, dQ and the captures' gradients from the Triton core's dQ programs",
    "core": "the Triton core's flex backward (dK / dV and dQ programs; the captures' gradients from the dQ "
            "programs)",
    "blocked": "the blocked path's autograd (a recomputation where the forward was fused)",
}


@dataclass
class FlexRoute:
    """Where a flex call runs, forward and backward, and why each faster path declined it
    (``attend.flex_attention.explain``); ``str()`` prints it."""

    call: str
    forward: str  # a FORWARD_PATHS key
    forward_declined: dict  # faster path -> why not
    backward: str | None  # a BACKWARD_PATHS key; None where no input needs a gradient
    backward_declined: dict
    notes: list

    def __str__(self) -> str:
        lines = [f"call: {self.call}", f"forward: {self.forward}: {FORWARD_PATHS[self.forward]}"]
        lines += [f"  not {path}: {why}" for path, why in self.forward_declined.items()]
        if self.backward is None:
            lines.append("backward: none (no input needs a gradient)")
        else:
            lines.append(f"backward: {self.backward}: {BACKWARD_PATHS[self.backward]}")
            lines += [f"  not {path}: {why}" for path, why in self.backward_declined.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _band_text(band: Band) -> str:
    if band.left < 0 and band.right < 0:
        return "every key"
    side = "bottom-right" if band.bottom_right else "top-left"
    if band.left < 0:
        return f"causal ({side}{f', {band.right} keys past the diagonal' if band.right else ''})"
    right = "the diagonal" if band.right == 0 else "no right bound" if band.right < 0 else f"{band.right} past it"
    return f"a window of {band.left} keys before the diagonal to {right} ({side})"


def route(call: FlexCall, grad: bool, what: str) -> FlexRoute:
    """The ``FlexRoute`` of ``call`` under the options in force, described as ``what``; ``grad``:
    some input needs a gradient. The paths are ``forward_path`` / ``backward_path``'s, as ``run``
    and ``gradients`` take them, with the Gluon forward's layout check (``launch.flex_band_gluon_layouts``,
    which the launch makes) asked here too."""
    from ..kernels import launch

    opts = kernel_options.current()
    fwd, declined = forward_path(call, opts)
    if fwd == "gluon_hooks" and not launch.flex_band_gluon_layouts(call.query, call.key, call.value, call.band, opts):
        fwd, declined["gluon_hooks"] = "band_hooks", (
            "the layouts: it takes contiguous tensors, or a model's (B, S, H, D) views as packed sequences "
            "(ws.eligible)")
    if fwd == "gluon_lists" and not launch.flex_lists_gluon_layouts(call.query, call.key, call.value):
        fwd, declined["gluon_lists"] = "lists", "the layouts: it takes contiguous (B, H, L, 128) tensors (ws.eligible)"
    routed = dataclasses.replace(call, path=fwd)
    cap_grads = grad and any(t.requires_grad for t in routed.score_captures)
    bwd, bdeclined = backward_path(routed, cap_grads, opts) if grad else (None, {})
    notes = []
    if call.band is not None:
        notes.append(f"the mask is a band: {_band_text(call.band)}")
    if fwd in ("band_hooks", "lists", "blocked") and call.want_max:
        notes.append("max_scores asked: the row max is computed and stored")
    return FlexRoute(what, fwd, declined, bwd, bdeclined, notes)


def forward_path(call: FlexCall, opts: kernel_options.KernelOptions) -> tuple[str, dict[str, str]]:
    """(the ``FORWARD_PATHS`` entry ``run`` takes for ``call`` under ``opts``, {each faster path: why it
    declined the call}). "gluon_hooks" is the Gluon forward's turn: where its layout check refuses
    at the launch, the call runs "band_hooks" (``explain`` asks that check too)."""
    declined = {}
    why = _band_refusal(call, opts)
    if why is None:
        return "band", declined
    declined["band"] = why
    why = _unfusable(call)
    if why is None and launch_tiles(call) is None:
        why = f"no tile of at least 16 fits the BlockMask's BLOCK_SIZE {tuple(call.blocks.BLOCK_SIZE)}"
    if why is not None:
        declined.update(gluon_hooks=why, band_hooks=why, lists=why)
        return "blocked", declined
    why = _hook_band_refusal(call, opts)
    if why is not None:
        declined.update(gluon_hooks=why, band_hooks=why)
        why = _gluon_refusal(call, opts, lists=True)
        if why is None:
            return "gluon_lists", declined
        declined["gluon_lists"] = why
        return "lists", declined
    why = _gluon_refusal(call, opts)
    if why is None:
        return "gluon_hooks", declined
    declined["gluon_hooks"] = why
    return "band_hooks", declined


def _forward_kernel(call: FlexCall, q, k, v, score_caps, mask_caps):
    """The core's (or the Gluon route's) flex forward of ``call`` on these tensors: (out, lse,
    max_scores), max_scores None where ``call.want_max`` is off (the kernel then stores none)."""
    from ..kernels import launch

    score = mask = None
    band = _hook_band(call)
    if call.score is not None:
        score = (call.score_hooks.functions,
                 codegen.capture_args(list(score_caps), q.device, grads=[], scalars=call.score.scalars))
    if call.mask is not None and band is None:
        mask = (call.mask_hooks.functions,
                codegen.capture_args(list(mask_caps), q.device, grads=[], scalars=call.mask.scalars))
    if call.path == "gluon_lists":  # None where its layout check refuses: the core's lists then
        res = launch.flex_lists_gluon(q, k, v, call.blocks, call.scale, score, mask)
        if res is not None:
            PATHS["lists_gluon"] += 1
            return res[0], res[1], None
        call.path = "lists"
    if call.path == "gluon_hooks":  # None where its layout check refuses: the core's band hooks then
        res = launch.flex_band_gluon(q, k, v, call.scale, score, band)
        if res is not None:
            PATHS["band_hooks_gluon"] += 1
            return res[0], res[1], None
        call.path = "band_hooks"  # what runs (a decode plan may then serve the call's class: plan.keep)
    res = launch.flex_forward(q, k, v, call.blocks, call.scale, score, mask, want_max=call.want_max,
                              kernel_options=call.kernel_options, band=band)
    if band is not None and res is not None:
        PATHS["band_hooks"] += 1
    return res


def _backward_mods(call: FlexCall, q, score_caps, mask_caps, score_grad: bool, band: Band | None,
                   grads=None) -> tuple:
    """The ``score`` / ``mask`` arguments of launch.flex_backward (no mask where ``band``, the
    call's ``_hook_band``, replaces it). ``grads``: the score captures' gradient buffers (default: fresh fp32 zeros;
    a warmup passes meta stand-ins)."""
    score = mask = None
    if call.score is not None:
        score = (call.score_hooks.functions,
                 codegen.capture_args(list(score_caps), q.device, grads=grads, scalars=call.score.scalars), score_grad)
    if call.mask is not None and band is None:
        mask = (call.mask_hooks.functions,
                codegen.capture_args(list(mask_caps), q.device, grads=[], scalars=call.mask.scalars))
    return score, mask


def _backward_kernel(call: FlexCall, dout, dlse, q, k, v, out, lse, score_caps, mask_caps, cap_grads: list[bool]):
    """The core's flex backward (kernels.launch.flex_backward): (dq, dk, dv, capture grads), or
    None where no backward tile fits the BlockMask's BLOCK_SIZE."""
    from ..kernels import launch

    band = _hook_band(call)
    score, mask = _backward_mods(call, q, score_caps, mask_caps, any(cap_grads), band)
    res = launch.flex_backward(dout, q, k, v, out, lse, dlse, call.blocks, call.scale, score, mask,
                               kernel_options=call.kernel_options, band=band)
    if res is None:
        return None
    if band is not None:
        PATHS["band_hooks_backward"] += 1
    grads = score[1].grads if score is not None else ()
    cap = [g.to(c.dtype) if want else None for c, g, want in zip(score_caps, grads, cap_grads)]
    return (*res, cap)


# The backward's kernels compile on these threads while the forward's compiles on the caller's (one
# per launch: the split's two, or the Gluon dK / dV kernel and the dQ programs; four, so a second
# new mod's warmup need not queue behind a first one's).
_WARMUP_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="attend-flex-warmup")
# How long, at most and in all, a forward waits for its warmup threads to hand their compiles to
# forked children (KernelOptions.compile_fork) before compiling its own kernel: the launch's
# Python, tens of ms.
# Started later, the warmup's Python would take turns on the GIL with the forward's, and the forks
# would copy the caller's thread in the middle of its compile's LLVM passes (any lock held there
# stays held in the child).
_FORK_START_WAIT_S = 0.5
# Warmups started, by what selects the backward's kernels (``_warmup_key``): their Futures while
# they run, None once done (a warm process starts none, and keeps no finished Future alive).
_WARMUPS: dict[tuple, list[concurrent.futures.Future] | None] = {}
_NEVER = object()  # _WARMUPS' answer for a key never warmed up


def _warms_up(q: torch.Tensor) -> bool:
    """Whether a forward on ``q`` warms up its backward: CUDA tensors (the interpreter compiles
    nothing; the CPU has no Triton compile)."""
    return q.is_cuda


def _warmup_key(call: FlexCall, q, k, score_grad: bool, opts: kernel_options.KernelOptions) -> tuple:
    """What selects the backward's compiled kernel, as far as it is cheap to see: the mods'
    structures, the tiles' inputs (launch.flex_bwd_tiles), the constexpr flags and the lengths'
    divisibility (Triton specializes ints on it). A case it misses (say a new stride class) only
    leaves the real backward to compile, as it would without a warmup."""
    from ..kernels import launch

    B, H, L, D = q.shape
    S = k.shape[2]
    BQ, BKV = call.blocks.BLOCK_SIZE
    ko = call.kernel_options
    band = _hook_band(call, opts)
    if band is not None:  # no lists: the band's loops are even by the tiles (launch.flex_backward)
        tiles = launch.flex_bwd_tiles(q, k, call.blocks, opts, ko)
        if tiles is not None:
            BQ = max(tiles.meta["BLOCK_M1"], tiles.meta["BLOCK_M2"])
            BKV = max(tiles.meta["BLOCK_N1"], tiles.meta["BLOCK_N2"])
    return (q.device, q.dtype, D, H // k.shape[1], launch.seq_bucket(max(L, S)), BQ, BKV,
            L % BQ == 0 and S % BKV == 0, L % 16 == 0, S % 16 == 0,
            call.score_hooks.path if call.score is not None else None,
            call.mask_hooks.path if call.mask is not None else None, score_grad,
            torch.are_deterministic_algorithms_enabled(),
            launch._dot_precision(q.dtype, opts),
            None if ko is None else repr(sorted(ko.items())),
            None if opts.bwd_config is None else repr(opts.bwd_config), opts.flex_bwd_one_loop,
            opts.flex_bwd_split, opts.head_major, band,
            # the Gluon dK / dV route (launch._flex_gluon_dkdv): its options and the layouts it takes
            opts.flex_gluon, opts.flex_gluon_lists_bwd, opts.bwd_ws, opts.bwd_ws_min_seq_bucket, opts.bwd_ws_fused_dq,
            q.is_contiguous(), k.is_contiguous(),
            # a variant whose build failed since: the warmup builds the one the backward now takes
            tuple(launch.versions.usable(launch._gluon_dkdv_name(True, lists, True)) for lists in (False, True)))


def _backward_warmup(call: FlexCall, q, k, v, score_caps, mask_caps, score_grad: bool,
                     opts: kernel_options.KernelOptions) -> list[concurrent.futures.Future] | None:
    """Start compiling the core's flex backward for this call on the warmup threads (called before
    the forward's launch, so the compiles overlap; each of flex_bwd_split's two launches on a thread
    of its own); the Futures to wait for before the real backward launches, or None where there is
    nothing to wait for: the knob is off
    (``KernelOptions.flex_bwd_precompile``), not CUDA, deterministic mode with a capture gradient
    (the blocked backward runs), or a warmup for this kernel already finished."""
    if not (opts.flex_bwd_precompile and _warms_up(q)):
        return None
    if score_grad and torch.are_deterministic_algorithms_enabled():
        return None
    key = _warmup_key(call, q, k, score_grad, opts)
    fut = _WARMUPS.get(key, _NEVER)
    if fut is not _NEVER:
        return fut
    from ..kernels import forkcompile, launch

    stand_ins = [torch.empty(c.shape, dtype=torch.float32, device="meta") for c in score_caps]
    band = _hook_band(call, opts)
    score, mask = _backward_mods(call, q, score_caps, mask_caps, score_grad, band, grads=stand_ins)
    futs = []
    # two launches, each compiled on a thread of its own: the split's halves, or the Gluon dK / dV
    # kernel beside the core's dQ programs (the dQ gradient is laid out as q: its layout decides;
    # with the dQ fused, "dq" builds only the row statistics' kernel)
    two = opts.flex_bwd_split or launch._flex_gluon_dkdv(opts, q, k, v, q, band, score, call.kernel_options,
                                                         call.blocks)
    parts = ("dkdv", "dq") if two else (True,)
    # the JITs' per-device caches, made here once: two threads (the split's two, or a warmup and the
    # caller's own launches) must not both create one
    _device_cache(q)
    started = []
    try:
        for part in parts:
            started.append(threading.Event())
            futs.append(_WARMUP_THREAD.submit(_warm_backward, call, q, k, v, score, mask, opts, part, started[-1]))
    except RuntimeError:  # the interpreter is shutting down (a thread outlives the main one), or no thread starts
        return futs or None  # what started; the rest compiles when the backward runs, as with the knob off
    warmups = _WARMUPS  # the callbacks write where the key was recorded, whatever replaces it since
    warmups[key] = futs

    def finished(_):
        if all(f.done() for f in futs):
            warmups[key] = None

    for f in futs:
        f.add_done_callback(finished)
    if opts.compile_fork and forkcompile.available():  # the forks before the forward's compile
        deadline = time.monotonic() + _FORK_START_WAIT_S
        for ev in started:
            ev.wait(max(0.0, deadline - time.monotonic()))
    return futs


def _device_cache(q: torch.Tensor) -> None:
    """Create the compiled-kernel caches of core.attn_bwd, its row statistics kernel and the Gluon
    dK / dV kernel for q's device (Triton makes one on first use, in a defaultdict, so two threads
    compiling at once could each make one and lose one)."""
    from ..kernels import core, versions

    ws_bwd = versions.gluon_kernels()[1]
    for fn in (core.attn_bwd, core.attn_bwd_preprocess, getattr(ws_bwd, "attn_bwd_dkdv_ws", None)):
        caches = getattr(fn, "device_caches", None)
        if caches is not None and q.is_cuda:
            caches[q.device.index if q.device.index is not None else torch.cuda.current_device()]


def _warm_backward(call: FlexCall, q, k, v, score, mask, opts: kernel_options.KernelOptions, part: bool | str,
                   started: threading.Event) -> None:
    """A warmup thread's work: launch.flex_backward's warmup (compile, launch nothing) of ``part``
    (True: every launch) on q's device, each compile in a forked child where
    ``KernelOptions.compile_fork`` allows (kernels/forkcompile.py); ``started`` is set once the
    compiles are handed to the children (leaving the block then waits for them), or the warmup
    failed."""
    from ..kernels import forkcompile, launch

    try:
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext(), \
                forkcompile.compiling_elsewhere(opts.compile_fork):
            launch.flex_backward(None, q, k, v, None, None, None, call.blocks, call.scale, score, mask, options=opts,
                                 kernel_options=call.kernel_options, warmup=part, band=_hook_band(call, opts))
            started.set()
    finally:
        started.set()


class _FusedForward(torch.autograd.Function):
    """The core's flex forward and backward. The backward recomputes through the blocked path's
    autograd (deterministic) where the core's would not be: deterministic mode with score captures
    that require grad (their gradient is scattered by atomics), or no backward tile fits."""

    @staticmethod
    def forward(ctx, call, q, k, v, *caps):
        n = len(call.score_captures)
        ctx.options = kernel_options.current()
        ctx.warmup = _backward_warmup(call, q, k, v, caps[:n], caps[n:], any(ctx.needs_input_grad[4:4 + n]),
                                      ctx.options)
        res = _forward_kernel(call, q, k, v, caps[:n], caps[n:])
        ctx.call = call
        ctx.save_for_backward(q, k, v, res[0], res[1], *caps)
        if res[2] is not None:  # None where the caller reads no max (the Gluon route computes none)
            ctx.mark_non_differentiable(res[2])
        return res

    @staticmethod
    def backward(ctx, dout, dlse, dmax):
        for fut in ctx.warmup or ():
            try:
                fut.result()
            except Exception:  # a failed warmup costs nothing: the launch below compiles (and raises) as it would
                pass
        with kernel_options.use(ctx.options):  # the forward's (autograd may run this on another thread)
            return (None, *gradients(ctx.call, dout, dlse, ctx.saved_tensors, ctx.needs_input_grad[1:]))


def backward_path(call: FlexCall, cap_grads: bool, opts: kernel_options.KernelOptions) -> tuple[str, dict[str, str]]:
    """(the ``BACKWARD_PATHS`` entry of ``call``'s backward under ``opts``, {each faster path: why it
    declined}); ``cap_grads``: a score capture needs a gradient. ``call.path`` "band" and "blocked"
    keep their forward's autograd; a call whose forward path is not chosen (the torch.compile op's
    backward) takes the one ``forward_path`` gives it: "dense" after a band forward (``gradients``
    runs the dense kernels' backward then), else fused where the core takes it."""
    from ..kernels import launch

    if call.path == "band" or call.path is None and _band_refusal(call, opts) is None:
        return "dense", {}
    declined = {}
    why = "the forward ran on the blocked path" if call.path == "blocked" else _unfusable(call)
    if why is None and cap_grads and torch.are_deterministic_algorithms_enabled():
        why = "deterministic mode and a captured tensor that needs a gradient (the kernels scatter it by atomics)"
    band = _hook_band(call, opts)
    if why is None and launch.flex_bwd_tiles(call.query, call.key, call.blocks, opts, call.kernel_options,
                                             lists=band is None) is None:
        why = f"no backward tile of at least 16 fits the BlockMask's BLOCK_SIZE {tuple(call.blocks.BLOCK_SIZE)}"
    if why is not None:
        declined.update(gluon_fused=why, gluon_dkdv=why, core=why)
        return "blocked", declined
    why = launch.flex_dkdv_refusal(opts, call.query, call.key, call.value, call.query, band, call.score is not None,
                                   call.kernel_options, call.blocks)
    if why is None:
        fused_why = launch.fused_dq_refusal(opts, cap_grads, flex=True, lists=band is None)
        if fused_why is None:
            return "gluon_fused", declined
        declined["gluon_fused"] = fused_why
        return "gluon_dkdv", declined
    declined.update(gluon_fused=why, gluon_dkdv=why)
    return "core", declined


def gradients(call: FlexCall, dout, dlse, saved, needs) -> list:
    """Gradients of a flex call for ``saved = (q, k, v, out, lse, *score captures, *mask captures)``
    (out / lse: the forward's), one per ``needs`` flag (q, k, v, then each capture), None where not
    needed: the core's flex backward (with the Gluon dK / dV kernel where it serves) or a
    recomputation through the blocked path's autograd (deterministic), as ``backward_path`` says."""
    q, k, v, out, lse, *caps = saved
    needs = list(needs)
    n = len(call.score_captures)
    cap_grads = needs[3:3 + n]
    path = backward_path(call, any(cap_grads), kernel_options.current())[0]
    if path == "dense":  # the compiled op's backward of a band forward (eager's is the dense kernels' autograd)
        from ..ops.attention import band_gradients

        grads = band_gradients(dout, q, k, v, out, lse, dlse, call.band, call.scale, "triton")
        return [g if w else None for g, w in zip(grads, needs[:3])] + [None] * len(caps)
    if path != "blocked":
        res = _backward_kernel(call, dout, dlse, q, k, v, out, lse, caps[:n], caps[n:], cap_grads)
        if res is not None:  # (backward_path checked that a tile fits)
            PATHS["fused_backward"] += 1
            dq, dk, dv, dcaps = res
            return [dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, *dcaps,
                    *[None] * (len(caps) - n)]
    PATHS["blocked_backward"] += 1
    leaves = [t.detach().requires_grad_(bool(w)) for t, w in zip((q, k, v, *caps), needs)]
    wants = [t for t in leaves if t.requires_grad]
    with torch.enable_grad():
        out, lse, _ = eager.attention(leaves[0], leaves[1], leaves[2], call.score, leaves[3:3 + n], call.mask,
                                      leaves[3 + n:], call.blocks, call.scale)
        outs, gouts = [out], [dout]
        if dlse is not None:
            outs.append(lse)
            gouts.append(torch.where(torch.isfinite(lse), dlse, 0.0))
        got = iter(torch.autograd.grad(outs, wants, gouts, allow_unused=True)) if wants else iter(())
    return [next(got) if t.requires_grad else None for t in leaves]


def _fused(call: FlexCall):
    """The fused Triton core's flex mode (kernels.launch.flex_forward, or the Gluon forward on the
    "gluon_hooks" path): (out, lse, max_scores), for a call ``forward_path`` sent here."""
    caps = [*call.score_captures, *call.mask_captures]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (call.query, call.key, call.value, *caps)):
        res = _FusedForward.apply(call, call.query, call.key, call.value, *caps)
    else:
        res = _forward_kernel(call, call.query, call.key, call.value, call.score_captures, call.mask_captures)
    PATHS["fused"] += 1
    return res


def launch_tiles(call: FlexCall):
    from ..kernels import launch

    return launch.flex_tiles(call.query, call.key, call.blocks, kernel_options=call.kernel_options)


def _band_route(call: FlexCall):
    """A band mask and no score_mod (``call.band``, set by flex_attention where the BlockMask is
    its mask's exact blocks) on attend's dense fused path over that band: (out, lse, None), for a
    call ``forward_path`` sent here (``_band_refusal``)."""
    from ..ops.attention import fused_attention

    out, lse = fused_attention(call.query, call.key, call.value, None, 0.0, call.band, call.scale, "triton")
    PATHS["band"] += 1
    return out, lse, None


def run(call: FlexCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out [B, Hq, L, Ev], lse [B, Hq, L] natural log, max_scores [B, Hq, L]; None on the fused
    paths where ``call.want_max`` is off, the blocked path computing it always), on the path
    ``forward_path`` picks (kept in ``call.path``). The options in force are read once for the call
    (``kernel_options.hold``)."""
    token = kernel_options.hold()
    try:
        call.path = forward_path(call, kernel_options.current())[0]
        if call.path == "band":
            return _band_route(call)
        if call.path != "blocked":
            return _fused(call)
        PATHS["blocked"] += 1
        return eager.attention(call.query, call.key, call.value, call.score, call.score_captures, call.mask,
                               call.mask_captures, call.blocks, call.scale)
    finally:
        kernel_options.release(token)

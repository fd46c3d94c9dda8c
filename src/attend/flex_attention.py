"""FlexAttention with PyTorch's contract (``torch.nn.attention.flex_attention``), without needing ``torch.compile``.

``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)`` are traced with
``torch.fx`` into a small graph, and generated once per *structure* into ``@triton.jit`` hooks
(the modded score, its derivative in the score, the captured tensors' gradient scatter, the mask),
so a new sequence length, batch, head count or captured tensor value never generates or compiles
anything. Tensors a mod captures (``bias[h]``, ``doc[b, q_idx]``, ``table[h, q_idx - kv_idx + c]``)
are kernel inputs and receive gradients. An op the generator cannot translate raises an error
naming the op and the line of the mod that uses it.

Inside ``torch.compile(fullgraph=True)`` the call becomes the ``attend::flex_fwd`` custom op, with
the tensors the mods read as its inputs (docs/flex.md, "Inside torch.compile").

``create_block_mask`` classifies each (query block, key block) as empty, partial or full by
evaluating the mask per block (a Triton kernel built from the generated mask hook, or bounded
torch tiles), never building an ``L x S`` tensor; its lists are identical to PyTorch's.

Equivalent plain torch (what ``flex_attention`` computes)::

    s = (q @ k.transpose(-2, -1)) * scale                      # [B, H, L, S]
    s = score_mod(s, b, h, q_idx, kv_idx)                       # elementwise
    s = s.masked_fill(~mask_mod(b, h, q_idx, kv_idx), -inf)     # where the BlockMask says partial
    out = softmax(s, -1) @ v                                    # a row with nothing kept gives 0

Causal ``create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4 * 128, 4 * 128)``, per
(query block, key block): ``F`` full (listed in ``full_kv_*``, no mask work), ``P`` partial
(listed in ``kv_*``, mask_mod applied), ``.`` skipped::

    P . . .
    F P . .
    F F P .
    F F F P
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch

from ._flex import compiled as _compiled_mods
from ._flex import dispatch as _dispatch
from ._flex import lists as _lists
from ._flex import plan as _plan
from ._flex import trace as _trace
from ._flex.block_mask import BlockMask, _sliced_mask_mod_error, from_torch, listed_band
from ._flex.block_mask import create_block_mask as _create_block_mask
from ._flex.trace import FlexTraceError
from ._layout import Band as _Band
from ._versions import GRAPH_MADE_MODS, outside_graph

__all__ = ["flex_attention", "BlockMask", "create_block_mask", "create_mask", "and_masks", "or_masks", "noop_mask",
           "AuxRequest", "AuxOutput", "FlexTraceError", "explain", "FlexRoute", "BoundMod"]

FlexRoute = _dispatch.FlexRoute
BoundMod = _compiled_mods.BoundMod  # (attend's: a mod over tensors a compiled function makes; docs/flex.md)

_MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention`` returns (``return_aux=``)."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs: ``lse`` (natural log) and ``max_scores`` (the row max of the modded,
    masked scores), each ``[B, Hq, L]`` fp32, or None when not requested."""

    lse: torch.Tensor | None = None
    max_scores: torch.Tensor | None = None


def noop_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """A mask_mod that masks nothing."""
    return b.new_ones(size=(), dtype=torch.bool)


def and_masks(*mask_mods: _MaskMod) -> _MaskMod:
    """A mask_mod that keeps a position only where every ``mask_mod`` keeps it."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"and_masks takes mask_mod callables, got {mask_mods!r}")

    def and_mask(b, h, q_idx, kv_idx):
        out = b.new_ones(size=(), dtype=torch.bool)
        for m in mask_mods:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return and_mask


def or_masks(*mask_mods: _MaskMod) -> _MaskMod:
    """A mask_mod that keeps a position where any ``mask_mod`` keeps it."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"or_masks takes mask_mod callables, got {mask_mods!r}")

    def or_mask(b, h, q_idx, kv_idx):
        out = b.new_zeros(size=(), dtype=torch.bool)
        for m in mask_mods:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return or_mask


def create_mask(mask_mod: _MaskMod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device="cpu") -> torch.Tensor:
    """The dense ``(B, H, Q_LEN, KV_LEN)`` bool mask of ``mask_mod`` (``None`` B/H = 1).

    This one does materialize ``L x S`` (it is the dense mask); ``create_block_mask`` does not.
    """
    B, H = B or 1, H or 1
    i32 = dict(dtype=torch.int32, device=device)
    b = torch.arange(B, **i32).view(B, 1, 1, 1)
    h = torch.arange(H, **i32).view(1, H, 1, 1)
    q = torch.arange(Q_LEN, **i32).view(1, 1, Q_LEN, 1)
    kv = torch.arange(KV_LEN, **i32).view(1, 1, 1, KV_LEN)
    return torch.as_tensor(mask_mod(b, h, q, kv), device=device).expand(B, H, Q_LEN, KV_LEN).to(torch.bool)


def create_block_mask(mask_mod: _MaskMod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device=None,
                      BLOCK_SIZE: int | tuple[int, int] = 128, _compile: bool = False,
                      separate_full_blocks: bool = True, compute_dq_write_order: bool = False,
                      dq_kv_order: bool = True) -> BlockMask:
    """The :class:`BlockMask` of ``mask_mod`` for ``B x H x Q_LEN x KV_LEN`` (``None`` B / H: 1, broadcast).

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` (True = attend), traced and generated into
            Triton; captured tensors (``doc[b, q_idx]``) are read in place.
        B, H: batch and query-head counts the mask varies over, or None.
        Q_LEN, KV_LEN: query and key lengths.
        device: where the lists live (default: CUDA if available, else CPU).
        BLOCK_SIZE: ``Q_BLOCK_SIZE`` or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``.
        _compile: accepted for compatibility; there is nothing to compile (a warning says so).
        separate_full_blocks: list fully kept blocks separately (the kernel skips mask work there).
        compute_dq_write_order, dq_kv_order: PyTorch's metadata for its deterministic block-sparse
            FLASH backward; attend's backward does not use it (True raises).

    Returns:
        BlockMask whose lists equal PyTorch's ``create_block_mask`` for the same mask. Peak memory
        is the int8 ``[B, H, Q_LEN / BQ, KV_LEN / BKV]`` block status, never ``L x S``.

    Inside torch.compile (torch 2.13 and later), on int sizes, it is built in the graph, no graph break: a band mask_mod
    (causal, a sliding window: a function of ``q_idx - kv_idx`` alone) by arithmetic, and the call
    takes the band's routes as eagerly; any other mask by a custom op over the tensors the mod
    reads (a new value of them reuses the graph). The mod must be made outside the compiled
    function, or close over nothing: one made inside over a variable runs create_block_mask outside
    the graph (a graph break, which ``fullgraph=True`` refuses): build it outside, or build the
    BlockMask before the compiled function, once per shape.
    """
    args = (mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, _compile, separate_full_blocks, compute_dq_write_order,
            dq_kv_order)
    if not torch.compiler.is_compiling():
        return _block_mask(*args)
    if not (compute_dq_write_order or _compile) and GRAPH_MADE_MODS:
        from ._flex import compiled

        bm = compiled.graph_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, separate_full_blocks)
        if bm is not None:
            return bm
    return _block_mask_outside_graph(*args)


def _block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, _compile, separate_full_blocks,
                compute_dq_write_order, dq_kv_order) -> BlockMask:
    if compute_dq_write_order:
        raise NotImplementedError("create_block_mask: compute_dq_write_order=True (PyTorch's dQ write-order metadata) "
                                  "is not produced by attend; its backward does not need it")
    if _compile:
        warnings.warn("create_block_mask(_compile=True) has no effect in attend: the mask is generated into "
                      "Triton without torch.compile", DeprecationWarning, stacklevel=2)
    return _create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE,
                              separate_full_blocks=separate_full_blocks)


# Dynamo cannot trace the mask_mod's tracing and generated Triton kernel (the lists' sizes are read
# on the host): create_block_mask runs eagerly between two graphs.
_block_mask_outside_graph = outside_graph(
    _block_mask, reason="attend.flex_attention.create_block_mask runs outside a compiled graph (it traces the "
    "mask_mod and runs a generated kernel); build the BlockMask before the compiled function, once per shape, "
    "or compile with fullgraph=False")


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: _ScoreMod | None = None,
                   block_mask=None, scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: dict | None = None, *, return_aux: AuxRequest | None = None):
    """Attention with a traced ``score_mod`` and a block-sparse ``block_mask``, with gradients.

    Args:
        query: ``(B, Hq, L, E)``.
        key: ``(B, Hkv, S, E)`` (batch may be 1 with a block_mask of batch B: broadcast).
        value: ``(B, Hkv, S, Ev)``.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` applied to ``q @ k^T * scale``;
            may read captured tensors, which then receive gradients.
        block_mask: attend's or PyTorch's :class:`BlockMask` for ``(L, S)``; None = no mask.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (query head ``h`` reads key head
            ``h // (Hq // Hkv)``).
        return_lse: also return the log-sum-exp (deprecated in PyTorch; use ``return_aux``).
        kernel_options: a dict of PyTorch's FlexKernelOptions; BLOCK_M, BLOCK_N, num_warps and
            num_stages set the core's tiles (shrunk to divide the block_mask's BLOCK_SIZE), USE_TMA
            whether the forward reads K / V through TMA descriptors (sm_90 and up; default on, as
            ``KernelOptions.flex_tma``, unless ``KernelOptions.tma`` is set);
            the other keys are accepted and ignored.
        return_aux: ``AuxRequest(lse, max_scores)``: return ``(out, AuxOutput)``.

    Returns:
        ``out (B, Hq, L, Ev)`` in the inputs' dtype; ``(out, lse)`` with ``return_lse``;
        ``(out, AuxOutput)`` with ``return_aux``. lse is natural-log fp32; a row with no kept key
        has ``out = 0``, ``lse = -inf``, ``max_scores = -inf``.
    """
    if torch.compiler.is_compiling():
        out, lse, max_scores = _compiled(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                                         kernel_options, return_aux)
    else:
        graph = _plan.traced(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options,
                             return_lse, return_aux)
        res = _plan.forward(graph, query, key, value, scale, enable_gqa, return_aux)
        if res is None:
            call, return_aux, return_lse = _validate(query, key, value, score_mod, block_mask, scale, enable_gqa,
                                                     return_lse, kernel_options, return_aux, graph)
            res = _dispatch.run(call)
            _plan.keep(graph, call, scale, enable_gqa)
        out, lse, max_scores = res
        # contiguous, as PyTorch returns it (the Gluon route's lse of a model's views is strided)
        lse = lse.contiguous() if return_lse or (return_aux is not None and return_aux.lse) else lse
    if return_aux is not None:
        return out, AuxOutput(lse if return_aux.lse else None, max_scores if return_aux.max_scores else None)
    if return_lse:
        return out, lse
    return out


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: _ScoreMod | None = None,
            block_mask=None, scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
            kernel_options: dict | None = None, *, return_aux: AuxRequest | None = None) -> FlexRoute:
    """Say where :func:`flex_attention` would run this call, forward and backward, and why each faster
    path declines it, under the kernel options in force. Takes flex_attention's arguments and
    checks them the same way (the same errors); runs no attention kernel (the mods are traced, as
    a call would). Returns a :class:`FlexRoute`: ``.forward`` and ``.backward`` name the paths
    (``.backward`` is None where no input needs a gradient), ``.forward_declined`` and
    ``.backward_declined`` map each faster path to its reason; ``str()`` prints it all. The paths
    and their order are docs/flex.md's ("Paths")."""
    if torch.compiler.is_compiling():
        raise RuntimeError("flex_attention.explain runs eagerly; call it outside torch.compile")
    graph = _plan.traced(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, return_lse,
                         return_aux)
    call, _, _ = _validate(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                           return_aux, graph)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value, *call.score_captures, *call.mask_captures))
    route = _dispatch.route(call, grad, _describe(call, score_mod, block_mask))
    if _plan.serves(graph, route.forward, grad):
        route.notes.append("a decode plan: the first call of this class keeps its forward's decisions, later "
                           "ones only launch it (docs/flex.md, \"Decode plans\")")
    return route


def _describe(call, score_mod, block_mask) -> str:
    q, k = call.query, call.key
    mods = []
    if call.score is not None:
        n = len(call.score.captures)
        mods.append(f"score_mod {getattr(score_mod, '__name__', type(score_mod).__name__)}"
                    f"{f' ({n} captured tensors)' if n else ''}")
    if block_mask is not None and tuple(block_mask.BLOCK_SIZE) != (1 << 30, 1 << 30):
        mm = block_mask.mask_mod
        mods.append(f"block_mask of BLOCK_SIZE {tuple(block_mask.BLOCK_SIZE)} from "
                    f"{getattr(mm, '__name__', type(mm).__name__)}")
    return (f"query {tuple(q.shape)}, key / value {tuple(k.shape)} {q.dtype} on {q.device}"
            + "".join(f", {m}" for m in mods))


_LIST_ATTRS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
               "full_q_num_blocks", "full_q_indices")


def _compiled(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options, return_aux):
    """flex_attention inside torch.compile (Dynamo traces this): the mods become constants and the
    tensors they read graph inputs (``_flex/compiled.py``), then the ``attend::flex_fwd`` op."""
    from ._flex import compiled
    from .ops import flex as flex_op

    scale = _check(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                   return_aux)
    score_key, score_caps, score_slots, numbers = compiled.parts(score_mod, "score") if score_mod is not None \
        else ("", [], (), [])
    lists, block_size = [], [1 << 30, 1 << 30]
    mask_key, mask_caps, mask_slots = "", [], ()
    if block_mask is not None and tuple(block_mask.BLOCK_SIZE) != (1 << 30, 1 << 30):
        if tuple(block_mask.seq_lengths) != (query.shape[2], key.shape[2]):
            raise ValueError(f"flex_attention: block_mask was created for (Q_LEN, KV_LEN) = "
                             f"{tuple(block_mask.seq_lengths)}, the call has ({query.shape[2]}, {key.shape[2]})")
        lists = [getattr(block_mask, a) for a in _LIST_ATTRS]
        _check_lists(lists[0], query)
        block_size = list(block_mask.BLOCK_SIZE)
        mask_mod = block_mask.mask_mod
        if mask_mod is _sliced_mask_mod_error:
            raise RuntimeError("flex_attention: block_mask was sliced and its mask_mod reset; assign a mask_mod "
                               "that fits the slice (block_mask.mask_mod = ...)")
        if mask_mod is not None and mask_mod is not noop_mask and getattr(mask_mod, "__name__", "") != "noop_mask":
            mask_key, mask_caps, mask_slots, mask_numbers = compiled.parts(mask_mod, "mask")
            numbers = numbers + mask_numbers
    want_max = return_aux is not None and bool(return_aux.max_scores)
    # a BlockMask create_block_mask built in this graph: its lists are its mask_mod's exact blocks
    # while it holds that mask_mod and those lists (then a band mask takes the band's routes)
    built = getattr(block_mask, "_graph_lists", None) if lists else None
    band_lists = built is not None and built[0] is mask_mod and all(a is b for a, b in zip(built[1], lists[:4]))
    return flex_op.flex(query, key, value, score_caps, mask_caps, lists, numbers, scale,
                        flex_op.spec(score_key, mask_key, tuple(score_slots), tuple(mask_slots), tuple(block_size),
                                     kernel_options, want_max, band_lists))


def _check(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
           return_aux) -> float:
    """The argument checks both paths share (no tracing: Dynamo runs these too); returns the scale."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flex_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flex_attention: {name} must be 4-D (B, H, seq, dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"flex_attention: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 "
                            f"or float64")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"flex_attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                         f"{value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"flex_attention: query, key and value must be on one device, got {query.device}, "
                         f"{key.device}, {value.device}")
    B, Hq, L, E = query.shape
    if key.shape[-1] != E:
        raise ValueError(f"flex_attention: key has head dim {key.shape[-1]}, query has {E}; they must match")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"flex_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must agree in "
                         f"batch, heads and length")
    Hkv, S = key.shape[1], key.shape[2]
    if not enable_gqa and Hq != Hkv:
        raise ValueError(f"flex_attention: query has {Hq} heads, key has {Hkv}; pass enable_gqa=True for grouped "
                         f"heads")
    if Hq % Hkv:
        raise ValueError(f"flex_attention: key has {Hkv} heads, query has {Hq}; {Hq} is not a multiple of {Hkv}")
    if key.shape[0] != B and not (key.shape[0] == 1 and block_mask is not None):
        raise ValueError(f"flex_attention: query has batch {B}, key has {key.shape[0]}; they must match (or key has "
                         f"batch 1 with a block_mask)")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"flex_attention: score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, got "
                        f"{type(score_mod).__name__}")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"flex_attention: kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    if return_lse and return_aux is not None:
        raise ValueError("flex_attention: pass return_lse or return_aux, not both (return_lse is deprecated: use "
                         "return_aux=AuxRequest(lse=True))")
    if return_aux is not None and not (isinstance(return_aux, tuple) and hasattr(return_aux, "max_scores")):
        raise TypeError(f"flex_attention: return_aux must be an AuxRequest or None, got {type(return_aux).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.is_floating_point():
        if torch.compiler.is_compiling():
            raise TypeError("flex_attention: under torch.compile, scale must be a Python float or None (a tensor "
                            "would be read on the host); got a 0-d tensor")
        scale = float(scale)  # a 0-d tensor, as PyTorch's flex_attention takes it (read on the host; no gradient)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"flex_attention: scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"flex_attention: scale must be finite, got {scale}")
    return float(scale)


def _check_lists(kv_num_blocks: torch.Tensor, query: torch.Tensor, block_q: int | None = None,
                 kv_indices: torch.Tensor | None = None, block_kv: int | None = None, key_len: int = 0) -> None:
    """A BlockMask's lists must be on the query's device, with batch 1 or B and heads 1 or Hq, and
    (``block_q`` given) a row per query block of the call; (``kv_indices`` given) a column per key
    block, as the backward walks one row of the query-side lists per key block."""
    B, Hq = query.shape[0], query.shape[1]
    if block_q is not None and kv_num_blocks.shape[-1] < -(-query.shape[2] // block_q):
        raise ValueError(f"flex_attention: block_mask lists {kv_num_blocks.shape[-1]} query blocks; the call's "
                         f"{query.shape[2]} queries in blocks of {block_q} need {-(-query.shape[2] // block_q)} "
                         f"(a mask made longer with _adjust lists no blocks past its original length)")
    if kv_indices is not None and kv_indices.shape[-1] < -(-key_len // block_kv):
        raise ValueError(f"flex_attention: block_mask's kv_indices has {kv_indices.shape[-1]} key blocks; the call's "
                         f"{key_len} keys in blocks of {block_kv} need {-(-key_len // block_kv)} (a mask made "
                         f"longer with _adjust lists no blocks past its original length)")
    if kv_num_blocks.device != query.device:
        raise ValueError(f"flex_attention: block_mask is on {kv_num_blocks.device}, query on "
                         f"{query.device}; move it with block_mask.to(device)")
    lead = tuple(kv_num_blocks.shape[:-1])
    bb, bh = (1,) * (2 - len(lead)) + lead if len(lead) < 2 else lead[-2:]
    if bb not in (1, B) or bh not in (1, Hq):
        raise ValueError(f"flex_attention: block_mask has batch {bb} and heads {bh}; expected 1 or {B} and "
                         f"1 or {Hq}")


def _validate(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options, return_aux,
              score_graph=None):
    """(the FlexCall, return_aux, return_lse) after the argument checks; ``score_graph``: the
    score_mod's trace where the caller has it (``_plan.traced``)."""
    scale = _check(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                   return_aux)
    B, Hq, L, E = query.shape
    S = key.shape[2]
    mask_graph = None
    if block_mask is None:
        blocks = _lists.dense(L, S, query.device)
    else:
        bm = from_torch(block_mask)
        if bm.BLOCK_SIZE == (1 << 30, 1 << 30):  # PyTorch's "no mask" placeholder
            blocks = _lists.dense(L, S, query.device)
        else:
            if tuple(bm.seq_lengths) != (L, S):
                raise ValueError(f"flex_attention: block_mask was created for (Q_LEN, KV_LEN) = {tuple(bm.seq_lengths)}, "
                                 f"the call has ({L}, {S}); create a block mask for these lengths (or crop one with "
                                 f"block_mask._adjust({L}, {S}) where the mask allows)")
            _check_lists(bm.kv_num_blocks, query, bm.BLOCK_SIZE[0], bm.kv_indices, bm.BLOCK_SIZE[1], S)
            if bm.mask_mod is _sliced_mask_mod_error:
                raise RuntimeError("flex_attention: block_mask was sliced and its mask_mod reset; assign a mask_mod "
                                   "that fits the slice (block_mask.mask_mod = ...)")
            blocks = _lists.from_block_mask(_lists_4d(bm))
            if bm.mask_mod is not noop_mask and getattr(bm.mask_mod, "__name__", "") != "noop_mask":
                mask_graph = _trace.trace_cached(bm.mask_mod, "mask")
                if mask_graph.output is True or _is_const(mask_graph, True):
                    mask_graph = None  # keeps everything: partial blocks need no mask work
    if score_graph is None and score_mod is not None:
        score_graph = _trace.trace_cached(score_mod, "score")
    if score_graph is not None and _is_identity(score_graph):
        score_graph = None
    for g in (score_graph, mask_graph):
        for c in (g.captures if g is not None else []):
            if c.tensor.device != query.device:
                raise ValueError(f"flex_attention: a {g.kind}_mod captures a tensor of shape {tuple(c.tensor.shape)} "
                                 f"on {c.tensor.device}; query is on {query.device}")
    wants_max = return_aux is not None and bool(return_aux.max_scores)
    band = _band_of(block_mask, mask_graph, L, S) if key.shape[0] == B else None  # no broadcast key batch there
    call = _dispatch.FlexCall(query, key, value, score_graph, mask_graph, blocks, float(scale), kernel_options,
                              band, wants_max)
    return call, return_aux, return_lse


def _band_of(block_mask, mask_graph, L: int, S: int):
    """The band of keys the call keeps, where its lists are exactly that band's blocks: no
    block_mask (every key), or lists create_block_mask built from the band mask_mod the BlockMask
    still holds (``block_mask.listed_band``); else None."""
    if block_mask is None or tuple(block_mask.BLOCK_SIZE) == (1 << 30, 1 << 30):
        return _Band()
    if not isinstance(block_mask, BlockMask) or not block_mask._built_by_its_mask_mod():  # PyTorch's: no record
        return None
    return listed_band(block_mask._kv_lists(), mask_graph, (L, S), block_mask.BLOCK_SIZE)


def _lists_4d(bm: BlockMask) -> BlockMask:
    """A BlockMask whose lists are [B', H', rows, cols] (indexing may have dropped b / h dims)."""
    if bm.kv_num_blocks.dim() == 3:
        return bm
    lead = 3 - bm.kv_num_blocks.dim()
    fix = lambda t: None if t is None else t.reshape((1,) * lead + tuple(t.shape))
    return BlockMask(bm.seq_lengths, *(fix(getattr(bm, a)) for a in BlockMask._TENSOR_ATTRS),
                     BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod)


def _is_const(graph, value) -> bool:
    from ._flex.trace import Ref

    o = graph.output
    return isinstance(o, Ref) and graph.nodes[o.i].op == "const" and graph.nodes[o.i].args[0] == value


def _is_identity(graph) -> bool:
    from ._flex.trace import Ref

    return isinstance(graph.output, Ref) and graph.output.i == 0

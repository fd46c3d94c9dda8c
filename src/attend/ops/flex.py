"""``attend::flex_fwd`` / ``attend::flex_bwd``: FlexAttention as custom ops, for compiled graphs.

``flex_attention`` uses these inside ``torch.compile`` (``_flex/compiled.py`` explains how the
mods become a string and their tensors inputs); eager calls keep the direct path
(``_flex.dispatch.run``), which needs no op dispatch. ``lists`` are the BlockMask's eight list
tensors in PyTorch's order (empty for no block mask); ``numbers`` the values of the mods' scalar
slots read at run time; ``spec`` one JSON object of the call's trace-time constants (:func:`spec`):
the mods' ``compiled.encode`` strings ("" for no mod), which slots ``numbers`` fill, the
BlockMask's BLOCK_SIZE and flex_attention's kernel_options.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch

from .._flex import compiled, dispatch
from .._flex import lists as _lists
from .._flex.band import band as band_of_graph
from .._flex.block_mask import block_status as mask_block_status
from .._flex.block_mask import kv_in_range, listed_band
from .._layout import Band, empty_in_layout
from .._versions import assume_constant_result


@assume_constant_result
def spec(score_key: str, mask_key: str, score_slots: tuple, mask_slots: tuple, block_size: tuple,
         kernel_options: dict | None, want_max: bool = True, band_lists: bool = False) -> str:
    """The ops' ``spec`` argument (a constant of the traced graph). ``want_max``: whether the caller
    reads max_scores; where not, the op's third output is left unwritten, and the call may take the
    Gluon forwards, which keep no row max. ``band_lists``: the lists are the exact blocks of the
    mask_mod, a band, as create_block_mask built them in the graph (``compiled.graph_block_mask``)."""
    return json.dumps(dict(score_key=score_key, mask_key=mask_key, score_slots=list(score_slots),
                           mask_slots=list(mask_slots), block_size=[int(b) for b in block_size],
                           kernel_options=kernel_options or {}, want_max=bool(want_max),
                           band_lists=bool(band_lists)), sort_keys=True)


@functools.lru_cache(maxsize=256)
def _spec(text: str) -> dict:
    return json.loads(text)


def _call(q, k, v, score_caps, mask_caps, lists, numbers, scale, text):
    c = _spec(text)
    L, S = q.shape[2], k.shape[2]
    if lists:
        lead = lambda t, n: None if t is None else t.reshape((1,) * (n - t.dim()) + tuple(t.shape))
        fixed = [lead(t, 3 if i % 2 == 0 else 4) for i, t in enumerate(lists)]
        # as the eager path's from_torch: ascending (the core bounds the last listed full block), and
        # no block past the keys (a PyTorch BlockMask cropped with _adjust may list one)
        fixed[:4] = kv_in_range(*fixed[:4], S, c["block_size"][1])
        blocks = _lists.BlockLists(*fixed, tuple(c["block_size"]), (L, S))
    else:
        blocks = _lists.dense(L, S, q.device, cache=False)  # CUDA graph trees own their runs' memory
    n = len(c["score_slots"])
    score = compiled.graph(c["score_key"], score_caps, numbers[:n], c["score_slots"])
    mask = compiled.graph(c["mask_key"], mask_caps, numbers[n:], c["mask_slots"])
    band = _band_of(lists, mask, q, k, tuple(c["block_size"]), c.get("band_lists", False))
    return dispatch.FlexCall(q, k, v, score, mask, blocks, scale, c["kernel_options"] or None, band,
                             want_max=c.get("want_max", True))


def _band_of(lists: list, mask, q: torch.Tensor, k: torch.Tensor, block: tuple, band_lists: bool) -> Band | None:
    """The eager path's ``flex_attention._band_of`` on what the op sees: no block_mask keeps every
    key (a score_mod then walks the dense loops too); else, where k / v are not a broadcast batch,
    the mask's band if the lists are its exact blocks: built in the graph (``band_lists``) or, by
    ``block_mask.listed_band``, before it. None: the call walks the lists."""
    if not lists:
        return Band()
    if k.shape[0] != q.shape[0]:
        return None
    if band_lists:
        return band_of_graph(mask, q.shape[2], k.shape[2]) if mask is not None else None
    return listed_band(lists[:4], mask, (q.shape[2], k.shape[2]), block)


def _flex_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_caps: list[torch.Tensor],
    mask_caps: list[torch.Tensor],
    lists: list[Optional[torch.Tensor]],
    numbers: list[float],
    scale: float,
    spec: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call(q, k, v, score_caps, mask_caps, lists, numbers, scale, spec)
    with torch.no_grad():
        out, lse, mx = dispatch.run(call)
    if mx is None:  # the caller reads no max_scores (``spec``'s want_max): an output of the fake's shape, unwritten
        mx = torch.empty_like(lse, memory_format=torch.contiguous_format)
    return _in_layout(out, _out_like(q, v)), lse.contiguous(), mx  # the fake's layouts (a row view's lse is strided)


flex_fwd = torch.library.custom_op("attend::flex_fwd", _flex_fwd, mutates_args=())


@flex_fwd.register_fake
def _(q, k, v, score_caps, mask_caps, lists, numbers, scale, spec):
    B, H, L, _ = q.shape
    stat = q.new_empty((B, H, L), dtype=torch.float32)
    return _out_like(q, v), stat, torch.empty_like(stat)


def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output as the ops promise it: (B, H, L, Ev) in the query's layout."""
    return empty_in_layout(q, (*q.shape[:3], v.shape[-1]))


def _in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it with ``like``'s strides where they differ (the blocked path and
    autograd choose their own layouts; a compiled graph relies on the fake's)."""
    if t.stride() == like.stride():
        return t
    return like.copy_(t)


class _Autograd:
    """Autograd inside an op's implementation, which the dispatcher runs with autograd excluded:
    the blocked path's backward recomputes through torch's autograd."""

    def __enter__(self):
        keys = torch._C.DispatchKey
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
            exclude = exclude.remove(key)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._guard.__enter__()
        self._grad = torch.enable_grad()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)


def _flex_bwd(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    score_caps: list[torch.Tensor],
    mask_caps: list[torch.Tensor],
    lists: list[Optional[torch.Tensor]],
    numbers: list[float],
    scale: float,
    spec: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    call = _call(q, k, v, score_caps, mask_caps, lists, numbers, scale, spec)
    flags = list(needs) + [False] * len(mask_caps)
    with _Autograd():
        grads = dispatch.gradients(call, dout, dlse, (q, k, v, out, lse, *score_caps, *mask_caps), flags)
    zero = lambda g, like: torch.zeros_like(like) if g is None else _in_layout(g, torch.empty_like(like))
    dq, dk, dv = (zero(g, t) for g, t in zip(grads[:3], (q, k, v)))
    return dq, dk, dv, [zero(g, c) for g, c in zip(grads[3:3 + len(score_caps)], score_caps)]


flex_bwd = torch.library.custom_op("attend::flex_bwd", _flex_bwd, mutates_args=())


@flex_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, score_caps, mask_caps, lists, numbers, scale, spec, needs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(c) for c in score_caps]


def _setup_context(ctx, inputs, output):
    q, k, v, score_caps, mask_caps, lists, numbers, scale, spec = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, *score_caps, *mask_caps, *[t for t in lists if t is not None])
    ctx.shape = (len(score_caps), len(mask_caps), [t is not None for t in lists])
    ctx.params = (numbers, scale, spec)
    ctx.needs = [t.requires_grad for t in (q, k, v, *score_caps)]


def _backward(ctx, dout, dlse, dmax):
    n_score, n_mask, present = ctx.shape
    q, k, v, out, lse, *rest = ctx.saved_tensors
    score_caps, mask_caps, kept = rest[:n_score], rest[n_score:n_score + n_mask], iter(rest[n_score + n_mask:])
    lists = [next(kept) if p else None for p in present]
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv, dcaps = flex_bwd(dout, dlse, q, k, v, out, lse, list(score_caps), list(mask_caps), lists,
                                 *ctx.params, ctx.needs)
    dcaps = [g if need else None for g, need in zip(dcaps, ctx.needs[3:])]
    # one gradient per input in the inputs' structure: lists of tensors as lists of None, and (as
    # autograd's pytree sees it) the list of numbers as [] when empty, else as one None
    numbers = ctx.params[0]
    return dq, dk, dv, dcaps, [None] * n_mask, [None] * len(present), [] if not numbers else None, None, None


flex_fwd.register_autograd(_backward, setup_context=_setup_context)


def flex(query, key, value, score_caps, mask_caps, lists, numbers: list, scale: float, spec_text: str):
    """``attend::flex_fwd`` with autograd: (out, lse, max_scores). ``numbers``: the values of the
    score_mod's scalar slots, then the mask_mod's, read at run time; ``spec_text``: :func:`spec`."""
    return flex_fwd(query, key, value, score_caps, mask_caps, lists, list(numbers), float(scale), spec_text)


def _block_status(captures: list[torch.Tensor], numbers: list[float], like: torch.Tensor, B: int, H: int, L: int,
                  S: int, spec: str) -> torch.Tensor:
    c = json.loads(spec)
    mask = compiled.graph(c["key"], captures, numbers, c["slots"])
    return mask_block_status(mask, B, H, L, S, *c["block"], like.device)


block_status = torch.library.custom_op("attend::flex_block_status", _block_status, mutates_args=())
"""create_block_mask's int8 [B, H, query blocks, key blocks] status matrix (EMPTY / PARTIAL / FULL)
of the mask_mod ``spec`` encodes (``compiled.encode``; its scalar slots set to ``numbers``) over its
``captures``, on ``like``'s device, as eager create_block_mask finds it (``block_mask.block_status``),
for a compiled graph
(``compiled.graph_block_mask``). The sizes are arguments, so a symbolic length stays one."""


@block_status.register_fake
def _(captures, numbers, like, B, H, L, S, spec):
    BQ, BKV = json.loads(spec)["block"]
    return like.new_empty((B, H, (L + BQ - 1) // BQ, (S + BKV - 1) // BKV), dtype=torch.int8)


@assume_constant_result
def block_status_spec(key: str, slots: tuple, block: tuple) -> str:
    """``block_status``'s ``spec`` (a constant of the traced graph): the encoded mask_mod, its
    run-time slots and (BQ, BKV)."""
    return json.dumps(dict(key=key, slots=list(slots), block=[int(n) for n in block]), sort_keys=True)

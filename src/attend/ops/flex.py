"""``attend::flex_fwd`` / ``attend::flex_bwd``: FlexAttention as custom ops, for compiled graphs.

``flex_attention`` uses these inside ``torch.compile`` (``_flex/compiled.py`` explains how the
mods become a string and their tensors inputs); eager calls keep the direct path
(``_flex.dispatch.run``), which needs no op dispatch. ``score_key`` / ``mask_key`` are
``compiled.encode`` strings ("" for no mod); ``lists`` the BlockMask's eight list tensors in
PyTorch's order (empty for no block mask); ``kernel_options`` a JSON object.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from .._flex import compiled, dispatch
from .._flex import lists as _lists


def _call(q, k, v, score_caps, mask_caps, lists, score_key, mask_key, scale, block_size, kernel_options,
          numbers=(), score_slots=(), mask_slots=()):
    L, S = q.shape[2], k.shape[2]
    if lists:
        lead = lambda t, n: None if t is None else t.reshape((1,) * (n - t.dim()) + tuple(t.shape))
        fixed = [lead(t, 3 if i % 2 == 0 else 4) for i, t in enumerate(lists)]
        blocks = _lists.BlockLists(*fixed, tuple(block_size), (L, S))
    else:
        blocks = _lists.dense(L, S, q.device)
    n = len(score_slots)
    score = compiled.graph(score_key, score_caps, numbers[:n], score_slots)
    mask = compiled.graph(mask_key, mask_caps, numbers[n:], mask_slots)
    return dispatch.FlexCall(q, k, v, score, mask, blocks, scale, json.loads(kernel_options) or None)


def _flex_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_caps: list[torch.Tensor],
    mask_caps: list[torch.Tensor],
    lists: list[Optional[torch.Tensor]],
    score_key: str,
    mask_key: str,
    scale: float,
    block_size: list[int],
    kernel_options: str,
    numbers: list[float],
    score_slots: list[int],
    mask_slots: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call(q, k, v, score_caps, mask_caps, lists, score_key, mask_key, scale, block_size, kernel_options,
                 numbers, score_slots, mask_slots)
    with torch.no_grad():
        out, lse, mx = dispatch.run(call)
    return _in_layout(out, _out_like(q, v)), lse, mx


flex_fwd = torch.library.custom_op("attend::flex_fwd", _flex_fwd, mutates_args=())


@flex_fwd.register_fake
def _(q, k, v, score_caps, mask_caps, lists, score_key, mask_key, scale, block_size, kernel_options, numbers,
      score_slots, mask_slots):
    B, H, L, _ = q.shape
    stat = q.new_empty((B, H, L), dtype=torch.float32)
    return _out_like(q, v), stat, torch.empty_like(stat)


def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output as the ops promise it: (B, H, L, Ev) in the query's layout (launch._like_layout)."""
    from ..kernels.launch import _like_layout

    return _like_layout(q, (*q.shape[:3], v.shape[-1]))


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
    score_key: str,
    mask_key: str,
    scale: float,
    block_size: list[int],
    kernel_options: str,
    numbers: list[float],
    score_slots: list[int],
    mask_slots: list[int],
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    call = _call(q, k, v, score_caps, mask_caps, lists, score_key, mask_key, scale, block_size, kernel_options,
                 numbers, score_slots, mask_slots)
    flags = list(needs) + [False] * len(mask_caps)
    with _Autograd():
        grads = dispatch.gradients(call, dout, dlse, (q, k, v, out, lse, *score_caps, *mask_caps), flags)
    zero = lambda g, like: torch.zeros_like(like) if g is None else _in_layout(g, torch.empty_like(like))
    dq, dk, dv = (zero(g, t) for g, t in zip(grads[:3], (q, k, v)))
    return dq, dk, dv, [zero(g, c) for g, c in zip(grads[3:3 + len(score_caps)], score_caps)]


flex_bwd = torch.library.custom_op("attend::flex_bwd", _flex_bwd, mutates_args=())


@flex_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, score_caps, mask_caps, lists, score_key, mask_key, scale, block_size,
      kernel_options, numbers, score_slots, mask_slots, needs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(c) for c in score_caps]


def _setup_context(ctx, inputs, output):
    (q, k, v, score_caps, mask_caps, lists, score_key, mask_key, scale, block_size, kernel_options, numbers,
     score_slots, mask_slots) = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, *score_caps, *mask_caps, *[t for t in lists if t is not None])
    ctx.shape = (len(score_caps), len(mask_caps), [t is not None for t in lists])
    ctx.params = (score_key, mask_key, scale, block_size, kernel_options, numbers, score_slots, mask_slots)
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
    # one gradient per input, lists as lists (mask captures and block lists have none)
    # one gradient per input in the inputs' structure: lists of tensors as lists of None, and
    # (as autograd's pytree sees them) an empty list of numbers as [], a non-empty one as one None
    none_or_empty = lambda xs: [] if len(xs) == 0 else None
    block_size, numbers, score_slots, mask_slots = ctx.params[3], ctx.params[5], ctx.params[6], ctx.params[7]
    return (dq, dk, dv, dcaps, [None] * n_mask, [None] * len(present), None, None, None, none_or_empty(block_size),
            None, none_or_empty(numbers), none_or_empty(score_slots), none_or_empty(mask_slots))


flex_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch._dynamo.assume_constant_result
def _options_json(kernel_options: dict | None) -> str:
    """flex_attention's kernel_options as the op's JSON argument (a constant of the traced graph)."""
    return json.dumps(kernel_options or {}, sort_keys=True)


def flex(query, key, value, score_caps, mask_caps, lists, score_key: str, mask_key: str, scale: float,
         block_size: list[int], kernel_options: dict | None, numbers: list = (), score_slots: list = (),
         mask_slots: list = ()):
    """``attend::flex_fwd`` with autograd: (out, lse, max_scores). ``numbers``: the values of the
    score_mod's scalar slots ``score_slots``, then the mask_mod's ``mask_slots``, read at run time."""
    return flex_fwd(query, key, value, score_caps, mask_caps, lists, score_key, mask_key, float(scale),
                    [int(b) for b in block_size], _options_json(kernel_options), list(numbers), list(score_slots),
                    list(mask_slots))

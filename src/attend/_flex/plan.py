"""Decode plans: a flex forward decided once per class of call, then only launched.

A decode loop calls flex_attention once per layer and token with the same mods and shapes, the keys
one longer each step. Validating such a call, choosing its path, looking up its hooks and tiles and
building its constexprs took about 80 us of host time on the 2-core CPU with the launch stubbed (on
an H100 the whole call took 332 us: benchmarks/RESULTS.md, "A Gemma 2 decode call's host time"),
while its kernel runs for a few microseconds. As FlashInfer's plan / run split does,
:func:`forward` keeps per class of call what those steps decided (the path, the hooks,
``launch.FlexForwardPlan``), and a later call of the class only traces its mods' data (their
captures and scalars: per call), fills its pointers and lengths and launches.

A class is everything those steps read: the score_mod's structure (``ModGraph.key``, its captures'
signatures included) and index width, q's dtype, device, shape and strides, k's and v's dtypes,
devices and shapes but the key length, that length's bucket, whether k and v take TMA descriptors,
the dots' precision (fp32's follows ``torch.backends.cuda.matmul.allow_tf32``), the scale, GQA,
whether max_scores is asked, and the kernel options in force (by value;
``KernelOptions.flex_plans=False`` turns plans off). Served: eager calls with a score_mod, no
block_mask (a decode step's mask is its keys), no kernel_options and no input that needs a
gradient, on the "band_hooks" path (the core's flex forward with the score hooks over every key).
Every other call, and the first of each class, takes ``flex_attention``'s full path; the first call
of a class chooses the path there too.
"""

from __future__ import annotations

import torch

from ..kernels import options as kernel_options
from . import codegen, dispatch, trace
from .trace import ModGraph

PLAN_CACHE_SIZE = 256  # classes kept; past it the table starts over
_PLANS: dict[tuple, tuple | None] = {}  # class -> (its launch.FlexForwardPlan, the scale), or None: the full path
STATS = {"planned": 0, "made": 0}  # calls a plan served, plans made (tests read them)


def _tensors(query, key, value) -> bool:
    return (type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
            and query.dim() == key.dim() == value.dim() == 4)


def _class(graph: ModGraph, query, key, value, scale, enable_gqa: bool, want_max: bool,
           opts: kernel_options.KernelOptions) -> tuple:
    from ..kernels import launch

    return (graph.key, codegen.wide_index(query.shape[2], key.shape[2]), query.dtype, key.dtype, value.dtype,
            query.device, key.device, value.device, query.shape, query.stride(), key.shape[:2], key.shape[3],
            value.shape[:2], value.shape[3], launch.flex_plan_key(query, key, value, opts), scale, enable_gqa,
            want_max, opts)


def traced(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options_, return_lse: bool,
           return_aux) -> ModGraph | None:
    """The score_mod's trace where the call may have a plan (the cheap conditions first), else None."""
    if (score_mod is None or block_mask is not None or kernel_options_ is not None or not _tensors(query, key, value)
            or not (scale is None or type(scale) in (float, int)) or type(enable_gqa) is not bool):
        return None
    if return_aux is not None and (return_lse or not (isinstance(return_aux, tuple)
                                                      and hasattr(return_aux, "max_scores"))):
        return None  # the full path's checks refuse it
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    try:
        return trace.trace_cached(score_mod, "score")
    except Exception:  # the full path reports it, after the argument checks
        return None


def serves(graph: ModGraph | None, path: str, grad: bool) -> bool:
    """Whether the calls of a class whose first call ``traced`` gave ``graph``, took ``path`` and
    needs a gradient or not (``grad``) launch a plan after that first call (``explain``'s note)."""
    return graph is not None and path == "band_hooks" and not grad and kernel_options.current().flex_plans


def forward(graph: ModGraph | None, query, key, value, scale, enable_gqa: bool, return_aux):
    """(out, lse, max_scores) of a call its class's plan serves; None where the call takes the full
    path (no plan for its class, or none made yet: ``keep`` then makes it from the full path's
    decision). ``graph``: ``traced``'s."""
    if graph is None or not _PLANS:
        return None
    caps = graph.captures
    if any(c.tensor.device != query.device or (c.tensor.requires_grad and torch.is_grad_enabled()) for c in caps):
        return None
    S = key.shape[2]
    if S == 0 or value.shape[2] != S or query.shape[2] == 0:
        return None
    want_max = return_aux is not None and bool(return_aux.max_scores)
    opts = kernel_options.current()
    if not opts.flex_plans:
        return None
    hit = _PLANS.get(_class(graph, query, key, value, scale, enable_gqa, want_max, opts))
    if hit is None:
        return None
    from ..kernels import launch

    plan, scale = hit  # the scale the full path resolved for the class (the default from the head dim)
    args = codegen.capture_args([c.tensor for c in caps], query.device, grads=[], scalars=graph.scalars)
    res = launch.flex_forward_run(plan, query, key, value, None, scale, args)
    STATS["planned"] += 1
    dispatch.PATHS["fused"] += 1
    dispatch.PATHS["band_hooks"] += 1
    return res


def keep(graph: ModGraph | None, call: dispatch.FlexCall, scale, enable_gqa: bool) -> None:
    """After ``dispatch.run`` ran ``call`` (whose score_mod ``traced`` gave ``graph``): keep its
    class's plan where the path it took is one a plan serves, else mark the class as not planned."""
    if graph is None or call.score is not graph:
        return
    opts = kernel_options.current()
    if not opts.flex_plans:
        return
    q, k, v = call.query, call.key, call.value
    cls = _class(graph, q, k, v, scale, enable_gqa, call.want_max, opts)
    if cls in _PLANS:
        return
    fl = None
    if call.path == "band_hooks":  # the score hooks over call.band (dispatch.forward_path)
        from ..kernels import launch

        fl = launch.flex_forward_plan(q, k, v, call.blocks, call.score_hooks.functions, None, call.want_max,
                                      opts, None, call.band)
        STATS["made"] += fl is not None
    if len(_PLANS) >= PLAN_CACHE_SIZE:
        _PLANS.clear()
    _PLANS[cls] = None if fl is None else (fl, call.scale)

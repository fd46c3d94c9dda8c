"""``varlen_attn``'s ``score_mod``: packed sequences with a flex score_mod.

The score_mod sees ``b`` the sequence's index, ``h`` the query head and ``q_idx`` / ``kv_idx``
the query's and key's positions in their own sequence (as FlashAttention's varlen kernels see a
softcap or ALiBi: per sequence, not in the packed buffer).

- ``fused``: eager inference calls (no tensor that autograd records) on attend's Triton kernels run
  the core's VARLEN forward with the mod's generated hooks, one launch for the whole batch, as
  ``varlen_attn`` without a mod runs (``launch.varlen_forward``'s ``score``).
- Every other call (gradients, torch.compile, the CPU blocked path) runs ``flex_attention`` once
  per sequence over that sequence's band of keys (``attend.varlen``), so gradients and compilation
  follow flex's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad

from .._layout import Band, Packed
from ..kernels import options as kernel_options
from . import codegen
from .trace import ModGraph, Ref, trace_cached

# Calls each way ran (tests assert which one a call took).
PATHS = {"fused": 0, "per_sequence": 0}


def has_tangents(tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent (a dual tensor)."""
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def score_graph(score_mod: Callable, query: torch.Tensor) -> ModGraph | None:
    """``score_mod``'s trace, None for the identity; its captures must be on the query's device."""
    graph = trace_cached(score_mod, "score")
    if isinstance(graph.output, Ref) and graph.output.i == 0:
        return None
    for c in graph.captures:
        if c.tensor.device != query.device:
            raise ValueError(f"varlen_attn: score_mod captures a tensor of shape {tuple(c.tensor.shape)} on "
                             f"{c.tensor.device}; query is on {query.device}")
    return graph


def fused(kernel: str | None, tensors) -> bool:
    """Whether a call on ``tensors`` (its inputs and the mod's captures) runs on the core's score
    hooks: eager, on attend's Triton kernels (``kernel``: ``backends.kernel_for``'s), and nothing
    that autograd would record (forward-mode tangents included)."""
    if kernel != "triton" or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and not has_tangents(tensors)


def forward_fused(graph: ModGraph, q, k, v, packed: Packed, max_q: int, max_k: int, scale: float, band: Band):
    """(out (T, H, D), lse (H, T)) from the core's VARLEN forward with the score hooks."""
    from ..kernels import launch

    opts = kernel_options.current()
    fast = opts.flex_fast_tanh and not opts.interpret and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    hooks = codegen.hooks(graph, fast, codegen.wide_index(max_q, max_k))
    args = codegen.capture_args([c.tensor for c in graph.captures], q.device, grads=[], scalars=graph.scalars)
    PATHS["fused"] += 1
    return launch.varlen_forward(q, k, v, packed, max_q, max_k, scale, band, score=(hooks.functions, args))

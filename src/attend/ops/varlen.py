"""``attend::varlen_fwd`` / ``attend::varlen_bwd``: packed-sequence attention as custom ops.

``kernel`` names the launchers (``registry.Kernel``): "triton" (the core's VARLEN feature) or
"blocked" (the CPU torch-ops path, one sequence at a time). ``band`` is the ``Band`` of keys each
query sees, per sequence, in the ops' encoding (``Band.to_op``; varlen's ``window_size`` is
bottom-right aligned). Paged KV (``block_table``) and
``seqused_k`` are forward-only, as in PyTorch. Eager calls on plain tensors skip the custom ops'
dispatch (``_eager``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._layout import Band, Packed
from ..kernels import options as kernel_options
from ._eager import call, eager_twin, is_eager
from .registry import launchers


def packed_of(cu_q, cu_k, seqused_k, block_table, k) -> Packed:
    """The call's ``Packed``, its index tensors as dense rows (the Triton kernels read them so: a
    strided view, ``cu[::2]`` or a transposed table, becomes a contiguous copy)."""
    page = k.shape[1] if block_table is not None else 16  # a paged pool is (pages, page_size, Hkv, D)
    dense = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return Packed(dense(cu_q), dense(cu_k), dense(seqused_k), dense(block_table), page)


def _varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    max_q: int,
    max_k: int,
    scale: float,
    band: list[int],
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fwd = launchers(kernel).varlen_forward
    return fwd(q, k, v, packed_of(cu_q, cu_k, seqused_k, block_table, k), max_q, max_k, scale, Band.from_op(band))


varlen_fwd = torch.library.custom_op("attend::varlen_fwd", _varlen_fwd, mutates_args=())


@varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, scale, band, kernel):
    T, H, _ = q.shape
    return q.new_empty((T, H, v.shape[-1])), q.new_empty((H, T), dtype=torch.float32)


def _varlen_bwd(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    band: list[int],
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bwd = launchers(kernel).varlen_backward
    return bwd(dout, q, k, v, out, lse, packed_of(cu_q, cu_k, None, None, k), max_q, max_k, scale, Band.from_op(band),
               dlse=dlse)


varlen_bwd = torch.library.custom_op("attend::varlen_bwd", _varlen_bwd, mutates_args=())


@varlen_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, band, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, scale, band, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, band, kernel)
    ctx.kernel_options = kernel_options.current()
    ctx.inference_only = [n for n, t in (("seqused_k", seqused_k), ("block_table", block_table)) if t is not None]


def _backward(ctx, dout, dlse):
    if ctx.inference_only:
        raise RuntimeError(f"varlen_attn: no backward with {' and '.join(ctx.inference_only)} (inference only, "
                           "as in PyTorch); pass packed keys with cu_seq_k to train")
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, band, kernel = ctx.params
    args = (dout.contiguous(), dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, band, kernel)
    with kernel_options.use(ctx.kernel_options):  # the forward's (autograd may run this on another thread)
        dq, dk, dv = _varlen_bwd(*args) if is_eager(dout, dlse, q, k, v) else varlen_bwd(*args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
_EagerVarlen = eager_twin("_EagerVarlen", _varlen_fwd, _setup_context, _backward)


def varlen_attention(q, k, v, cu_q, cu_k, seqused_k, block_table, max_q: int, max_k: int, scale: float, band: Band,
                     kernel: str):
    """``attend::varlen_fwd`` with autograd (arguments as the op's, but ``band`` a ``Band``); eager
    calls skip its dispatch, and eager calls that autograd would not record (inference) skip the
    autograd.Function too."""
    args = (q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, scale, band.to_op(), kernel)
    return call(varlen_fwd, _EagerVarlen, _varlen_fwd, args, args[:3])

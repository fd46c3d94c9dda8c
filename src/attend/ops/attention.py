"""``attend::fused_fwd`` / ``attend::fused_bwd``: one op pair over every fused kernel.

``kernel`` names the launchers (``registry.Kernel``: "blocked", torch ops on any device;
"triton", attend's Triton core); ``band`` is the ``Band`` of keys each query sees, in the ops'
encoding (``Band.to_op``).
``torch.compile`` sees one opaque op per call, with a fake implementation and a registered
autograd formula, never a graph break. Eager calls run the same functions through an
autograd.Function twin (``_eager``), skipping the custom op's host overhead.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._layout import Band, is_rows, empty_in_layout, rows_call, rows_lse
from ._eager import call, eager_twin, is_eager
from ..kernels import options as kernel_options
from .registry import launchers


def _fused_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float,
    band: list[int],
    scale: float,
    seed: Optional[torch.Tensor],
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fwd = launchers(kernel).forward
    out, lse = fwd(q, k, v, mask, dropout_p, Band.from_op(band), scale, int(seed.item()) if seed is not None else 0)
    return out, lse


fused_fwd = torch.library.custom_op("attend::fused_fwd", _fused_fwd, mutates_args=())


@fused_fwd.register_fake
def _(q, k, v, mask, dropout_p, band, scale, seed, kernel):
    B, H, L, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if kernel == "triton" and rows_call(q, k, v, mask, dropout_p):  # launch.forward's layouts
        return empty_in_layout(q, (*q.shape[:3], v.shape[-1])), rows_lse(q, lse_dtype)
    out = q.new_empty((B, H, L, v.shape[-1]))
    lse = q.new_empty((B, H, L), dtype=lse_dtype)
    return out, lse


def _fused_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float,
    band: list[int],
    scale: float,
    seed: Optional[torch.Tensor],
    kernel: str,
    mask_grad: bool,
    dlse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bwd = launchers(kernel).backward
    s = int(seed.item()) if seed is not None else 0
    dq, dk, dv, dmask = bwd(dout, q, k, v, out, lse, mask, dropout_p, Band.from_op(band), scale, s, mask_grad,
                            dlse=dlse)
    if dmask is None:
        dmask = q.new_empty((0,))
    return dq, dk, dv, dmask


fused_bwd = torch.library.custom_op("attend::fused_bwd", _fused_bwd, mutates_args=())


@fused_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, dropout_p, band, scale, seed, kernel, mask_grad, dlse=None):
    dmask = torch.empty_like(mask) if mask_grad and mask is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, band, scale, seed, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.params = (dropout_p, band, scale, kernel)
    ctx.kernel_options = kernel_options.current()


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dropout_p, band, scale, kernel = ctx.params
    mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
    args = (_like_out(dout, out), q, k, v, out, lse, mask, dropout_p, band, scale, seed, kernel, mask_grad, dlse)
    # Traced (torch.compile): the custom op, so the graph holds one opaque node. Eager: the same
    # function without the dispatcher round trip (host time the GPU waits on at small shapes).
    # The kernel options in force at the forward apply (autograd may run this on another thread).
    with kernel_options.use(ctx.kernel_options):
        grads = _fused_bwd(*args) if is_eager(dout, q, k, v, mask, dlse) else fused_bwd(*args)
    dq, dk, dv, dmask = grads
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None


def _like_out(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The output gradient laid out as the output: a row call's (``_layout.is_rows``: the model's
    own layout, so usually as it comes), else contiguous (an expanded gradient has stride 0)."""
    if is_rows(out) and out.shape[1] > 1 and out.shape[2] > 1:
        return dout if is_rows(dout) else dout.transpose(1, 2).contiguous().transpose(1, 2)
    return dout.contiguous()


fused_fwd.register_autograd(_backward, setup_context=_setup_context)


def band_gradients(dout, q, k, v, out, lse, dlse, band: Band, scale: float, kernel: str) -> tuple:
    """(dq, dk, dv) of a maskless ``fused_attention`` call over ``band`` from its out and lse: what
    its autograd runs, for a caller whose forward ran without autograd (``attend::flex_bwd`` of a
    band mask, whose forward ran the dense kernels)."""
    dq, dk, dv, _ = _fused_bwd(_like_out(dout, out), q, k, v, out, lse, None, 0.0, band.to_op(), float(scale), None,
                               kernel, False, dlse)
    return dq, dk, dv


_EagerFused = eager_twin("_EagerFused", _fused_fwd, _setup_context, _backward)


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    band: Band,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a fused kernel on 4-D ``(B, H, L, E)`` tensors over ``band``; returns ``(out, lse)``.

    The dropout seed is drawn from PyTorch's default CPU generator, so ``torch.manual_seed``
    reproduces the dropout mask.
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    args = (q, k, v, mask, float(dropout_p), band.to_op(), float(scale), seed, kernel)
    return call(fused_fwd, _EagerFused, _fused_fwd, args, (q, k, v, mask))

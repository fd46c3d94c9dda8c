"""The flex front door's one seam: traced mods + block lists in, (out, lse, max_scores) out.

:func:`run` is what ``attend.flex_attention.flex_attention`` calls after validating arguments.
:func:`_fused` runs the Triton core's flex mode (forward ``launch.flex_forward``, backward
``launch.flex_backward``; docs/flex.md); the calls it declines run the blocked torch path
(:mod:`.eager`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @property
    def score_captures(self) -> list[torch.Tensor]:
        return [c.tensor for c in self.score.captures] if self.score is not None else []

    @property
    def mask_captures(self) -> list[torch.Tensor]:
        return [c.tensor for c in self.mask.captures] if self.mask is not None else []

    def hooks(self) -> dict:
        """The generated Triton functions of this call's mods (generated once per structure)."""
        out = {}
        if self.score is not None:
            out.update(codegen.hooks(self.score).functions)
        if self.mask is not None:
            out.update(codegen.hooks(self.mask).functions)
        return out


# How many calls each path ran (tests assert which path a call took): forwards, then backwards
# of fused forwards (the core's flex backward, or a recomputation through the blocked path).
PATHS = {"fused": 0, "blocked": 0, "fused_backward": 0, "blocked_backward": 0}


def _fusable(call: FlexCall) -> bool:
    """Whether the core's flex mode takes the call: CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 in fp16 / fp32 (the interpreter has no bf16 arithmetic); fp16 / bf16 / fp32,
    equal head dims up to 256, non-empty lengths. The blocked path runs the rest."""
    import os

    q, k, v = call.query, call.key, call.value
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
    elif q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if q.dtype not in (torch.float16, torch.float32):
            return False
    else:
        return False
    return (k.dtype == q.dtype and v.dtype == q.dtype and v.shape[-1] == q.shape[-1] <= 256
            and q.shape[2] > 0 and k.shape[2] > 0)


def _forward_kernel(call: FlexCall, q, k, v, score_caps, mask_caps, want_max: bool):
    from ..kernels import launch

    score = mask = None
    if call.score is not None:
        score = (codegen.hooks(call.score).functions,
                 codegen.capture_args(list(score_caps), q.device, grads=[], scalars=call.score.scalars))
    if call.mask is not None:
        mask = (codegen.hooks(call.mask).functions,
                codegen.capture_args(list(mask_caps), q.device, grads=[], scalars=call.mask.scalars))
    return launch.flex_forward(q, k, v, call.blocks, call.scale, score, mask, want_max=want_max,
                               kernel_options=call.kernel_options)


def _backward_kernel(call: FlexCall, dout, dlse, q, k, v, out, lse, score_caps, mask_caps, cap_grads: list[bool]):
    """The core's flex backward (kernels.launch.flex_backward): (dq, dk, dv, capture grads), or
    None where no backward tile fits the BlockMask's BLOCK_SIZE."""
    from ..kernels import launch

    score = mask = None
    grads = None
    if call.score is not None:
        args = codegen.capture_args(list(score_caps), q.device, scalars=call.score.scalars)
        score = (codegen.hooks(call.score).functions, args, any(cap_grads))
        grads = args.grads
    if call.mask is not None:
        mask = (codegen.hooks(call.mask).functions,
                codegen.capture_args(list(mask_caps), q.device, grads=[], scalars=call.mask.scalars))
    res = launch.flex_backward(dout, q, k, v, out, lse, dlse, call.blocks, call.scale, score, mask,
                               kernel_options=call.kernel_options)
    if res is None:
        return None
    cap = [g.to(c.dtype) if want else None for c, g, want in zip(score_caps, grads or (), cap_grads)]
    return (*res, cap)


class _FusedForward(torch.autograd.Function):
    """The core's flex forward and backward. The backward recomputes through the blocked path's
    autograd (deterministic) where the core's would not be: deterministic mode with score captures
    that require grad (their gradient is scattered by atomics), or no backward tile fits."""

    @staticmethod
    def forward(ctx, call, q, k, v, *caps):
        n = len(call.score_captures)
        res = _forward_kernel(call, q, k, v, caps[:n], caps[n:], True)
        ctx.call = call
        ctx.save_for_backward(q, k, v, res[0], res[1], *caps)
        ctx.mark_non_differentiable(res[2])
        return res

    @staticmethod
    def backward(ctx, dout, dlse, dmax):
        return (None, *gradients(ctx.call, dout, dlse, ctx.saved_tensors, ctx.needs_input_grad[1:]))


def gradients(call: FlexCall, dout, dlse, saved, needs) -> list:
    """Gradients of a flex call for ``saved = (q, k, v, out, lse, *score captures, *mask captures)``
    (out / lse: the forward's), one per ``needs`` flag (q, k, v, then each capture), None where not
    needed. The core's flex backward where the core ran the forward (``_fusable``), unless
    deterministic mode meets a score capture that needs a gradient (scattered by atomics); else a
    recomputation through the blocked path's autograd (deterministic)."""
    q, k, v, out, lse, *caps = saved
    needs = list(needs)
    n = len(call.score_captures)
    cap_grads = needs[3:3 + n]
    if _fusable(call) and not (any(cap_grads) and torch.are_deterministic_algorithms_enabled()):
        res = _backward_kernel(call, dout, dlse, q, k, v, out, lse, caps[:n], caps[n:], cap_grads)
        if res is not None:
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
    """The fused Triton core's flex mode (kernels.launch.flex_forward): (out, lse, max_scores),
    or None to decline the call (``_fusable``, or no tile fits the BlockMask's BLOCK_SIZE)."""
    if not _fusable(call):
        return None
    if launch_tiles(call) is None:
        return None
    caps = [*call.score_captures, *call.mask_captures]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (call.query, call.key, call.value, *caps)):
        res = _FusedForward.apply(call, call.query, call.key, call.value, *caps)
    else:
        res = _forward_kernel(call, call.query, call.key, call.value, call.score_captures, call.mask_captures, True)
    PATHS["fused"] += 1
    return res


def launch_tiles(call: FlexCall):
    from ..kernels import launch

    return launch.flex_tiles(call.query, call.key, call.blocks, kernel_options=call.kernel_options)


def run(call: FlexCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, Ev], lse [B, Hq, L] natural log, max_scores [B, Hq, L])."""
    res = _fused(call)
    if res is not None:
        return res
    PATHS["blocked"] += 1
    return eager.attention(call.query, call.key, call.value, call.score, call.score_captures, call.mask,
                           call.mask_captures, call.blocks, call.scale)

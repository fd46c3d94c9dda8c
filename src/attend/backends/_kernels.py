"""Which of attend's kernels serves a tensor's device, and what the Triton core accepts."""

from __future__ import annotations

import os

import torch

from .._params import SDPAParams
from ..ops import EXPERIMENTAL, KERNELS, experimental_status

TRITON_DTYPES = (torch.float16, torch.bfloat16)
TRITON_MASK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_for(t: torch.Tensor) -> str | None:
    """"triton", "blocked" or None (no kernel) for a tensor's device and dtype.

    CPU tensors go to the Triton core only under the interpreter, and never in bfloat16 or
    float64: Triton 3.6's interpreter computes bf16 dots wrongly, and the core has no fp64.
    """
    # is_cuda / is_cpu, not device.type: this runs per call (dispatch key, checks, run), and building
    # the device object costs five times as much; the environment is read last for the same reason.
    if t.is_cuda:
        return "triton"
    if t.is_cpu:
        use_triton = t.dtype in (torch.float16, torch.float32) and "triton" in KERNELS and interpreter_on()
        return "triton" if use_triton else "blocked"
    return None


def triton_reasons(p: SDPAParams) -> list[str]:
    """Reasons attend's Triton core cannot take the call (mask support aside)."""
    if "triton" not in KERNELS:
        from ..ops import TRITON_IMPORT_ERROR

        return [f"attend's Triton core is unavailable: {TRITON_IMPORT_ERROR}"]
    reasons = []
    e, ev = p.query.shape[-1], p.value.shape[-1]
    if e > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head_dim {e} > {TRITON_MAX_HEAD_DIM}")
    if e != ev:
        reasons.append(f"query/key head_dim {e} != value head_dim {ev}")
    if e < 1:
        reasons.append("head_dim 0")
    return reasons


def triton_mask_reasons(p: SDPAParams) -> list[str]:
    reasons = triton_reasons(p)
    m = p.dense_mask
    if (m is not None and m.is_floating_point() and m.requires_grad and torch.is_grad_enabled()
            and torch.are_deterministic_algorithms_enabled()):
        full = (*p.query.shape[:-1], p.key.shape[-2])
        if tuple(m.shape) != full:
            reasons.append(f"attn_mask {tuple(m.shape)} requires grad and broadcasts to {full}; its gradient "
                           "needs atomic adds, which deterministic mode forbids")
    return reasons


def kernel_notes(p: SDPAParams) -> list[str]:
    """Which of attend's kernels a FLASH / EFFICIENT call on ``p``'s tensors runs: the Triton core
    (on the GPU or under the interpreter) or the blocked torch-ops path, on an sm_90 GPU the
    state of each experimental Gluon kernel (available, or off and why), and the core's backward
    plan (``launch.BackwardPlan``: kernels, dQ strategy, tiles) under the kernel options in force."""
    kernel = kernel_for(p.query)
    if kernel == "blocked":
        return ["kernel: attend's blocked torch-ops path"]
    if kernel is None:
        return []
    where = "" if p.query.is_cuda else " under Triton's interpreter"
    notes = [f"kernel: attend's Triton core{where}"]
    if p.query.is_cuda and torch.cuda.get_device_capability(p.query.device)[0] == 9:
        notes += [f"experimental {EXPERIMENTAL[name]}: {state}" for name, state in experimental_status().items()]
    if p.query.shape[-1] == p.value.shape[-1] and 0 < p.query.shape[-1] <= TRITON_MAX_HEAD_DIM:
        notes += _layout_note(p)
        notes.append(_backward_plan(p))
    return notes


def _layout_note(p: SDPAParams) -> list[str]:
    """A model's row views (``_layout.rows_call``): how the launchers run them."""
    from .._layout import rows_call
    from .._params import to_4d
    from ..kernels import launch
    from ._base import band_of, mask_for_kernel

    q, k, v = to_4d(p.query), to_4d(p.key), to_4d(p.value)  # as run_fused hands them to the launchers
    if not rows_call(q, k, v, mask_for_kernel(p), p.dropout):
        return []
    how = {"packed": "as B packed sequences of one length (the Gluon forward reads their (T, H * D) rows)",
           "gluon": "through the Gluon forward reading q / out as (B * L, H * D) rows beside dense K / V",
           "core": "as strided dense calls of the core"}[launch.rows_forward_route(q, k, v, band_of(p))]
    return [f"layout: (B, L, H, D) row views (a model's projections), run {how}; out, lse and the "
            "gradients come back in that layout"]


def _backward_plan(p: SDPAParams) -> str:
    from .._params import to_4d
    from ..kernels import launch
    from ._base import band_of, mask_for_kernel

    mask = mask_for_kernel(p)
    mask_grad = mask is not None and mask.is_floating_point() and mask.requires_grad
    plan = launch.explain_backward(to_4d(p.query), to_4d(p.key), to_4d(p.value), mask, p.dropout, band_of(p),
                                   mask_grad)
    return f"{plan}"

"""Launchers for the Triton core: allocate outputs, pick tiles and grids, return ``(out, lse)``.

Same signatures as ``attend.cpu.blocked`` so the ops layer can swap them. Tensors may be CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (then a fixed small tile is used).
"""

from __future__ import annotations

import os

import torch
import triton

from . import core
from .configs import BWD_CONFIGS, FWD_CONFIGS, INTERPRET_TILE, heuristic, pruner

_RCP_LN2 = core.RCP_LN2.value
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# ATTEND_AUTOTUNE=0 skips the per-key benchmark of candidate configs (first calls are then fast)
# and uses configs.heuristic instead.
_AUTOTUNE = os.environ.get("ATTEND_AUTOTUNE", "1") != "0"

_fwd = triton.autotune(FWD_CONFIGS, key=["HEAD_DIM", "CAUSAL", "HAS_MASK", "DROPOUT", "L_BUCKET", "SEQ_BUCKET"],
                       prune_configs_by={"early_config_prune": pruner("fwd")})(core.attn_fwd)
_bwd = triton.autotune(BWD_CONFIGS, key=["HEAD_DIM", "CAUSAL", "HAS_MASK", "DROPOUT", "MASK_GRAD", "SEQ_BUCKET"],
                       prune_configs_by={"early_config_prune": pruner("bwd")}, reset_to_zero=["DMASK"])(core.attn_bwd)


def _causal_off(causal: int, L: int, S: int) -> int:
    return 0 if causal == 1 else S - L


def _mask_args(mask: torch.Tensor | None, B: int, H: int, L: int, S: int, like: torch.Tensor):
    """(tensor, 4 strides, is_bool) for the kernel; broadcast dims get stride 0 (never copied)."""
    if mask is None:
        return like, (0, 0, 0, 0), False
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    m4 = m4.expand(B, H, L, S)
    return m4, tuple(m4.stride()), m4.dtype == torch.bool


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, and to 16: tl.dot needs K >= 16 (loads mask the pad)."""
    return max(16, triton.next_power_of_2(head_dim))


def _l_bucket(L: int) -> int:
    return 1 if L <= 16 else (64 if L <= 64 else 128)


def _seq_bucket(S: int) -> int:
    # The H100 runs picked different backward tiles at S=1024 and S=16384 (RESULTS.md).
    return 1024 if S <= 1024 else (4096 if S <= 4096 else 16384)


def _launch(tuned, kernel, kind: str, grid_of, args, flags, l_bucket=None):
    """Launch ``kernel`` with the interpreter's small tile, the autotuner, or the heuristic
    config. ``grid_of(meta)`` gives the grid from the tile sizes."""
    if _INTERPRET:  # the interpreter ignores warps and stages
        t = INTERPRET_TILE
        tiles = dict(BLOCK_M=t, BLOCK_N=t) if kind == "fwd" else dict(BLOCK_M1=t, BLOCK_N1=t, BLOCK_M2=t, BLOCK_N2=t)
        kernel[grid_of(tiles)](*args, **flags, **tiles, num_warps=4, num_stages=1)
    elif _AUTOTUNE:
        tuned[grid_of](*args, **flags)
    else:
        c = heuristic(kind, flags["BLOCK_D"], l_bucket)
        kernel[grid_of(c.kwargs)](*args, **flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def forward(q, k, v, mask, dropout_p: float, causal: int, scale: float, seed: int):
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty((B, H, L, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if L == 0:
        return out, lse
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    args = (q, k, v, out, lse, m4, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstr,
            H, H // Hkv, L, S, scale * _RCP_LN2, _causal_off(causal, L, S) if causal else 0,
            float(dropout_p), int(seed), _l_bucket(L), _seq_bucket(S))
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), HAS_MASK=mask is not None,
                 MASK_BOOL=mbool, DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(q.dtype))
    _launch(_fwd, core.attn_fwd, "fwd", lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H), args, flags, _l_bucket(L))
    return out, lse


def mask_grad_is_atomic(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> bool:
    """A mask smaller than (B, H, L, S) collects its gradient by atomic adds (nondeterministic)."""
    m4 = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return tuple(m4) != tuple(shape)


def backward(dout, q, k, v, out, lse, mask, dropout_p: float, causal: int, scale: float, seed: int, mask_grad: bool):
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    BLOCK_D = block_d(D)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if L == 0 or S == 0:
        dmask = torch.zeros_like(mask) if mask_grad else None
        return torch.zeros_like(q), dk.zero_(), dv.zero_(), dmask
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    pre_m = 64
    core.attn_bwd_preprocess[(triton.cdiv(L, pre_m), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, L, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_m,
    )
    m4, mstr, mbool = _mask_args(mask, B, H, L, S, q)
    off = _causal_off(causal, L, S) if causal else 0
    dq = torch.empty_like(q)
    # d(mask) in fp32 in the mask's own (possibly broadcast) shape; the kernel addresses it
    # through the expanded view's strides (0 on broadcast dims). The autotuner zeroes DMASK
    # between trials, so it is always a real buffer of its own, never q.
    if mask_grad:
        dmask = torch.zeros(mask.shape, dtype=torch.float32, device=q.device)
        dmstr = _mask_args(dmask, B, H, L, S, q)[1]
    else:
        dmask, dmstr = torch.zeros(1, dtype=torch.float32, device=q.device), (0, 0, 0, 0)
    atomic = mask_grad and mask_grad_is_atomic(mask, (B, H, L, S))
    flags = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=bool(causal), HAS_MASK=mask is not None, MASK_BOOL=mbool,
                 DROPOUT=dropout_p > 0.0, MASK_GRAD=bool(mask_grad), MASK_GRAD_ATOMIC=atomic,
                 DOT_PRECISION=_dot_precision(q.dtype))
    args = (q, k, v, dout, lse, delta, dq, dk, dv, m4, dmask, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(), *mstr, *dmstr,
            B, H, G, L, S, scale * _RCP_LN2, scale, off, float(dropout_p), int(seed), _seq_bucket(max(L, S)))

    def grid(m):  # dK/dV programs, then dQ programs (core.attn_bwd)
        return (triton.cdiv(S, m["BLOCK_N1"]) * B * Hkv + triton.cdiv(L, m["BLOCK_M2"]) * B * H,)

    _launch(_bwd, core.attn_bwd, "bwd", grid, args, flags)
    return dq, dk, dv, (dmask.to(mask.dtype) if mask_grad else None)

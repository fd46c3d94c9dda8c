"""Shared test helpers: float64 references and tolerances scaled by a same-precision reference."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, attend's Triton kernels run on CPU tensors under Triton's interpreter; that
# must be set before triton is imported. Tests use the fixed configs, not the autotuner.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTEND_AUTOTUNE", "0")

import attend  # noqa: E402
import attend.backends._kernels as _kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Kernels behind FLASH/EFFICIENT that the suite can reach here: the blocked torch-ops path
# (CPU only) and the Triton core (GPU, or CPU under the interpreter).
KERNELS = ["blocked", "triton"] if DEVICE == "cpu" else ["triton"]
# Dtypes each kernel runs here (the interpreter's bf16 dot is wrong; the core has no fp64).
KERNEL_DTYPES = {
    "blocked": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    "triton": [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []),
}


@pytest.fixture
def use_kernel(monkeypatch):
    """Route CPU FLASH/EFFICIENT calls to one kernel: 'blocked' turns the interpreter route off;
    'triton' and None (MATH tests) keep the default route."""

    def choose(kernel: str | None) -> None:
        if kernel == "blocked":
            monkeypatch.setattr(_kernels, "interpreter_on", lambda: False)
    return choose
from attend.backends import math_attention
from attend._params import SDPAParams

# Absolute error floor per dtype, for outputs where both errors are ~0.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dtype=torch.float64):
    """attend's MATH formula evaluated in ``dtype`` (float64 = the oracle)."""
    cast = lambda t: t.detach().to(dtype).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    m = attn_mask
    if isinstance(m, torch.Tensor) and m.is_floating_point():
        m = cast(m)
    p = SDPAParams(cast(q), cast(k), cast(v), m, 0.0, is_causal, enable_gqa)
    return math_attention(p, scale), p


def same_precision(q, k, v, **kw):
    """The error yardstick: PyTorch's own math SDPA in the inputs' dtype."""
    mask = kw.get("attn_mask")
    if isinstance(mask, attend.bias.CausalBias):
        kw = dict(kw, attn_mask=mask.materialize(q.device))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def assert_scaled_close(out, ref64, ref_same, k=4.0, what="output"):
    """err(out) <= k * err(same-precision reference) + floor, both against float64."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_same.double() - ref64).abs().max().item() if ref_same.numel() else 0.0
    tol = k * base + FLOOR[out.dtype]
    assert err <= tol, f"{what}: max error {err:.3e} > {k} * {base:.3e} + {FLOOR[out.dtype]:.0e}"


def assert_matches_float64(out, q, k, v, what: str = "", k_grad: float = 6.0, **kw) -> None:
    """``out = SDPA(q, k, v, **kw)`` and its input gradients against the float64 reference, with
    tolerances scaled by PyTorch's same-precision math SDPA."""
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref, p = reference(q, k, v, **kw)
    refs = torch.autograd.grad((ref * g.double()).sum(), (p.query, p.key, p.value))
    same = same_precision(q, k, v, **kw)
    sames = torch.autograd.grad((same * g).sum(), (q, k, v))
    assert_scaled_close(out, ref, same, what=f"{what} out")
    for name, a, r, s in zip("qkv", grads, refs, sames):
        assert_scaled_close(a, r, s, k=k_grad, what=f"{what} d{name}")


def rand(*shape, dtype=torch.float32, requires_grad=False, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)

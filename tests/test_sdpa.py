"""Numerics of every backend and kernel reachable here against a float64 oracle.

On the CPU: MATH, the blocked torch-ops kernel and the Triton core under the interpreter. On a
GPU (the same file, on a CUDA machine): MATH and the Triton core, in bf16 too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attend
from attend import SDPBackend as B
from attend.bias import causal_lower_right, causal_upper_left
from conftest import (DEVICE, KERNEL_DTYPES, KERNELS, assert_matches_float64, assert_scaled_close, rand, reference,
                      same_precision)

# (id, L, S, Hq, Hkv, D, mask kind)
CASES = [
    ("plain", 37, 37, 4, 4, 24, None),
    ("causal", 70, 70, 2, 2, 32, "causal"),
    ("causal_L<S", 20, 100, 2, 2, 16, "causal"),
    ("gqa4", 33, 65, 8, 2, 16, None),
    ("gqa_causal", 64, 64, 4, 1, 16, "causal"),
    ("bool_mask", 40, 50, 4, 4, 16, "bool"),
    ("float_mask", 40, 50, 4, 4, 16, "float"),
    ("padding", 31, 90, 2, 2, 16, "padding"),
    ("key_bias", 31, 90, 4, 2, 16, "key_bias"),  # (B, 1, 1, S) float with grad: one key vector per tile
    ("lower_right_L<S", 17, 45, 2, 2, 16, "lower_right"),
    ("lower_right_L>S", 45, 17, 2, 2, 16, "lower_right"),
    ("upper_left_L>S", 45, 17, 2, 2, 16, "upper_left"),
    ("head_dim_80", 24, 40, 2, 2, 80, "causal"),
    ("head_dim_192", 20, 29, 2, 1, 192, None),
    ("head_dim_256", 18, 18, 2, 2, 256, "causal"),
    # L and S multiples of configs.EVEN_TILE: the kernels' unmasked (EVEN) paths
    ("even_gqa_causal", 128, 128, 4, 2, 32, "causal"),
    ("even_L<S", 128, 256, 2, 2, 16, None),
]
FLASH_KINDS = {None, "causal", "lower_right", "upper_left"}
_INTERPRETER_FP32_CASES = {"plain", "causal_L<S", "head_dim_256"}
# The dtypes each backend accepts from the Triton core (FLASH: half types only).
TRITON_BACKEND_DTYPES = {B.FLASH_ATTENTION: {torch.float16, torch.bfloat16},
                         B.EFFICIENT_ATTENTION: {torch.float16, torch.bfloat16, torch.float32}}


def _make(case, dtype, grad=False):
    _, L, S, hq, hkv, D, kind = case
    q = rand(2, hq, L, D, dtype=dtype, requires_grad=grad)
    k = rand(2, hkv, S, D, dtype=dtype, requires_grad=grad)
    v = rand(2, hkv, S, D, dtype=dtype, requires_grad=grad)
    kw = dict(enable_gqa=hq != hkv)
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool":
        kw["attn_mask"] = torch.rand(2, 1, L, S, device=DEVICE) > 0.3
    elif kind == "float":
        kw["attn_mask"] = rand(2, hq, L, S, dtype=dtype, requires_grad=grad)
    elif kind == "padding":
        m = torch.ones(2, 1, 1, S, dtype=torch.bool, device=DEVICE)
        m[0, ..., S // 3:] = False
        kw["attn_mask"] = m
    elif kind == "key_bias":
        kw["attn_mask"] = rand(2, 1, 1, S, dtype=dtype, requires_grad=grad)
    elif kind == "lower_right":
        kw["attn_mask"] = causal_lower_right(L, S)
    elif kind == "upper_left":
        kw["attn_mask"] = causal_upper_left(L, S)
    return q, k, v, kw


def _params():
    for case in CASES:
        for dtype in KERNEL_DTYPES["blocked"]:
            yield pytest.param(B.MATH, None, case, dtype, id=f"MATH-{case[0]}-{str(dtype)[6:]}")
    for kernel in KERNELS:
        for backend in (B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION):
            for case in CASES:
                if backend is B.FLASH_ATTENTION and case[6] not in FLASH_KINDS:
                    continue
                for dtype in KERNEL_DTYPES[kernel]:
                    if kernel == "triton" and dtype not in TRITON_BACKEND_DTYPES[backend]:
                        continue
                    # under the interpreter, a maskless half call of EFFICIENT runs FLASH's kernel and
                    # case; its fp32 calls run the same kernel code as FLASH's fp16 ones, so three
                    # shapes keep fp32 there (one tile, ragged L < S, head dim 256); the GPU runs
                    # every pair
                    if (DEVICE == "cpu" and kernel == "triton" and backend is B.EFFICIENT_ATTENTION
                            and case[6] in FLASH_KINDS
                            and (dtype == torch.float16 or case[0] not in _INTERPRETER_FP32_CASES)):
                        continue
                    yield pytest.param(backend, kernel, case, dtype,
                                       id=f"{backend.name}-{kernel}-{case[0]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,kernel,case,dtype", list(_params()))
def test_forward_backward_match_float64(backend, kernel, case, dtype, use_kernel):
    use_kernel(kernel)
    torch.manual_seed(sum(map(ord, case[0])))
    q, k, v, kw = _make(case, dtype, grad=True)
    mask_grad = case[6] in ("float", "key_bias")
    with attend.sdpa_kernel(backend):
        d = attend.explain(q, k, v, **kw)
        assert d.backend is backend, str(d)
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
    ref64, p64 = reference(q, k, v, **kw)
    detached = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_same = same_precision(*detached, **kw)
    assert out.dtype == dtype
    assert_scaled_close(out, ref64, ref_same)
    g = torch.randn_like(out)
    inputs = [q, k, v] + ([kw["attn_mask"]] if mask_grad else [])
    grads = torch.autograd.grad(out, inputs, g)
    inputs64 = [p64.query, p64.key, p64.value] + ([p64.attn_mask] if mask_grad else [])
    grads64 = torch.autograd.grad(ref64, inputs64, g.double())
    # Yardstick: PyTorch's math backend in the same dtype. Kernels accumulate in fp32 but round
    # P and dS to the input dtype for the tensor-core products, hence the factor 8.
    ref_inputs = detached + ([kw["attn_mask"].detach().requires_grad_()] if mask_grad else [])
    kw_same = dict(kw, attn_mask=ref_inputs[3]) if mask_grad else kw
    grads_same = torch.autograd.grad(same_precision(*ref_inputs[:3], **kw_same), ref_inputs, g)
    for name, a, r64, rs in zip("qkvm", grads, grads64, grads_same):
        assert_scaled_close(a, r64, rs, k=8.0, what=f"d{name}")


def _directional_grad_check(f, inputs, eps=1e-2, rtol=2e-2):
    """Compare autograd with central differences along a random direction (fp32 kernels)."""
    out = f(*inputs)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    for i, (t, gr) in enumerate(zip(inputs, grads)):
        direction = torch.randn_like(t)

        def shifted(s, i=i, direction=direction):
            return (f(*[x.detach() + s * eps * direction if j == i else x.detach()
                        for j, x in enumerate(inputs)]) * g).sum()

        numeric = ((shifted(1) - shifted(-1)) / (2 * eps)).item()
        analytic = (gr * direction).sum().item()
        assert abs(numeric - analytic) <= rtol * max(1.0, abs(numeric)), (i, numeric, analytic)


def _dropout_params():
    yield pytest.param(B.MATH, None, id="MATH")
    for kernel in KERNELS:
        for backend in (B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION):
            yield pytest.param(backend, kernel, id=f"{backend.name}-{kernel}")


@pytest.mark.parametrize("backend,kernel", list(_dropout_params()))
def test_dropout_reproducible_and_consistent_backward(backend, kernel, use_kernel):
    use_kernel(kernel)
    triton_kernel = kernel == "triton"
    dtype = torch.float16 if triton_kernel and backend is B.FLASH_ATTENTION else (
        torch.float32 if triton_kernel else torch.float64)
    torch.manual_seed(0)
    q, k, v = (rand(1, 2, 19, 16, dtype=dtype, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(1234)
        with attend.sdpa_kernel(backend):
            return attend.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True)

    a, b = f(q, k, v), f(q, k, v)
    assert torch.equal(a, b)
    torch.manual_seed(99)
    with attend.sdpa_kernel(backend):
        c = attend.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True)
    assert not torch.equal(a, c)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)  # random projections: the full Jacobian took a minute
    elif dtype == torch.float32:
        _directional_grad_check(f, (q, k, v))
    else:  # fp16: the backward must regenerate the forward's mask; compare with its fp32 twin
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
            torch.manual_seed(1234)
            ref = attend.scaled_dot_product_attention(q32, k32, v32, dropout_p=0.4, is_causal=True)
        assert (a.float() - ref).abs().max() < 2e-2
        g = torch.randn_like(ref)
        ga = torch.autograd.grad(a, (q, k, v), g.half())
        gr = torch.autograd.grad(ref, (q32, k32, v32), g)
        for x, y in zip(ga, gr):
            assert (x.float() - y).abs().max() < 5e-2 * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropout_is_unbiased(kernel, use_kernel):
    use_kernel(kernel)
    torch.manual_seed(0)
    dtype = torch.float32
    q, k, v = (rand(1, 1, 16, 8, dtype=dtype) for _ in range(3))
    n = 200
    with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
        mean = sum(attend.scaled_dot_product_attention(q, k, v, dropout_p=0.3) for _ in range(n)) / n
    ref, _ = reference(q, k, v)
    assert (mean.double() - ref).abs().max() < 0.2 * ref.abs().max()


def _fused_params():
    yield pytest.param(B.MATH, None, id="MATH")
    for kernel in KERNELS:
        yield pytest.param(B.EFFICIENT_ATTENTION, kernel, id=f"EFFICIENT-{kernel}")


@pytest.mark.parametrize("backend,kernel", list(_fused_params()))
def test_fully_masked_rows_give_zero_and_finite_grads(backend, kernel, use_kernel):
    use_kernel(kernel)
    q, k, v = (rand(2, 2, 6, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 2, 6, 10, device=DEVICE) > 0.5
    mask[:, :, 2] = False
    k2, v2 = (rand(2, 2, 10, 8, requires_grad=True) for _ in range(2))
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    for t in (q, k2, v2):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


def _key_padding_mask(shape: str, S: int) -> torch.Tensor:
    """Bool key-padding masks with leading, trailing and inner padding, per (b, h) where the
    shape allows: ``bhs`` (3, 2, 1, S), ``b1s`` (3, 1, 1, S), ``11s`` (1, 1, 1, S)."""
    rows = [torch.zeros(S, dtype=torch.bool) for _ in range(6)]
    rows[0][: S // 3] = True  # trailing padding
    rows[1][S // 2:] = True  # leading padding
    rows[2][10: S - 20] = True  # both ends, and a hole
    rows[2][40:60] = False
    rows[3][:] = True
    rows[4][S - 1] = True  # one key, the last
    rows[5][S // 4: 3 * S // 4] = True
    m = torch.stack(rows).reshape(3, 2, 1, S)
    m = {"bhs": m, "b1s": m[:, :1], "11s": m[2:, 1:]}[shape]
    return m.to(DEVICE)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("S", [90, 128])
@pytest.mark.parametrize("shape", ["bhs", "b1s", "11s"])
def test_key_padding_masks_match_float64(kernel, S, shape, use_kernel):
    """The core skips key blocks outside each (b, h)'s kept span (KEY_RANGE) and masks the rest;
    S=128 also takes the backward's EVEN path."""
    use_kernel(kernel)
    torch.manual_seed(S)
    dt = torch.float16 if kernel == "triton" else torch.float32
    q = rand(3, 2, 40, 32, dtype=dt, requires_grad=True)
    k, v = (rand(3, 2, S, 32, dtype=dt, requires_grad=True) for _ in range(2))
    mask = _key_padding_mask(shape, S)
    with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_matches_float64(out, q, k, v, what=f"{shape} S={S}", attn_mask=mask)


@pytest.mark.parametrize("kernel", KERNELS)
def test_key_padding_runs_per_query_head_with_grouped_kv(kernel, use_kernel):
    """Grouped KV heads whose query heads keep different runs of keys (and one a run with a hole):
    each dK/dV program takes the maskless loop per query head of its group only where that head
    keeps every key of the block (core.attn_bwd's ``kept``)."""
    use_kernel(kernel)
    torch.manual_seed(7)
    S = 100
    dt = torch.float16 if kernel == "triton" else torch.float32
    q = rand(2, 4, 24, 16, dtype=dt, requires_grad=True)
    k, v = (rand(2, 2, S, 16, dtype=dt, requires_grad=True) for _ in range(2))
    mask = torch.zeros(2, 4, 1, S, dtype=torch.bool)
    mask[0, 0, 0, :70] = True  # trailing padding
    mask[0, 1, 0, 33:] = True  # leading padding, not on a tile edge
    mask[0, 2, 0, :] = True
    mask[0, 3, 0, 5:95] = True
    mask[1, 0, 0, 17:81] = True
    mask[1, 1, 0, :] = True
    mask[1, 2, 0, 40:60] = True
    mask[1, 3, 0, :] = True
    mask[1, 3, 0, 50] = False  # a hole: not a run
    mask = mask.to(DEVICE)
    with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_matches_float64(out, q, k, v, what="gqa key runs", attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_key_padding_mask_that_keeps_nothing_gives_zero(kernel, use_kernel):
    use_kernel(kernel)
    dt = torch.float16 if kernel == "triton" else torch.float32
    q, k, v = (rand(2, 2, 48, 16, dtype=dt, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 48, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
        assert t.grad[0].abs().sum() > 0


def _all_backend_params():
    yield pytest.param(B.MATH, None, id="MATH")
    for kernel in KERNELS:
        for backend in (B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION):
            yield pytest.param(backend, kernel, id=f"{backend.name}-{kernel}")


def _dtype_for(backend, kernel):
    return torch.float16 if kernel == "triton" and backend is B.FLASH_ATTENTION else torch.float32


@pytest.mark.parametrize("backend,kernel", list(_all_backend_params()))
def test_lower_right_with_no_visible_keys_is_zero(backend, kernel, use_kernel):
    use_kernel(kernel)
    dt = _dtype_for(backend, kernel)
    q, k, v = rand(1, 1, 8, 16, dtype=dt), rand(1, 1, 3, 16, dtype=dt), rand(1, 1, 3, 16, dtype=dt)
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 3))
    assert torch.equal(out[..., :5, :], torch.zeros_like(out[..., :5, :]))
    ref, _ = reference(q, k, v, attn_mask=causal_lower_right(8, 3))
    assert torch.allclose(out.double(), ref, atol=2e-3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_negative_scale_matches_float64(kernel, mask, use_kernel):
    """A negative scale flips every score's sign; the forward's online softmax takes each row's
    max of the unscaled scores, so the launcher hands it -q and |scale| (it gave NaN before)."""
    use_kernel(kernel)
    torch.manual_seed(11)
    dt = torch.float16 if kernel == "triton" else torch.float32
    q, k, v = (rand(2, 2, 40, 16, dtype=dt, requires_grad=True) for _ in range(3))
    kw = dict(scale=-0.6, is_causal=mask is None)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(2, 1, 40, 40, device=DEVICE) > 0.3
    elif mask == "float":
        kw["attn_mask"] = rand(2, 2, 40, 40, dtype=dt)
    backend = B.FLASH_ATTENTION if mask is None else B.EFFICIENT_ATTENTION
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.isfinite(out).all()
    assert_matches_float64(out, q, k, v, what=f"scale<0 {mask}", **kw)


@pytest.mark.parametrize("backend,kernel", list(_all_backend_params()))
def test_shapes_3d_5d_strided_and_scale(backend, kernel, use_kernel):
    use_kernel(kernel)
    dt = _dtype_for(backend, kernel)
    atol = 2e-3 if dt == torch.float16 else 1e-5
    with attend.sdpa_kernel(backend):
        if backend is not B.FLASH_ATTENTION:  # Ev != E: not a FLASH shape
            q3, k3, v3 = rand(3, 10, 8, dtype=dt), rand(3, 12, 8, dtype=dt), rand(3, 12, 5, dtype=dt)
            if kernel != "triton":
                out = attend.scaled_dot_product_attention(q3, k3, v3, scale=0.3)
                ref, _ = reference(q3, k3, v3, scale=0.3)
                assert out.shape == (3, 10, 5) and torch.allclose(out.double(), ref, atol=atol)
        q3, k3 = rand(3, 10, 16, dtype=dt), rand(3, 12, 16, dtype=dt)
        out = attend.scaled_dot_product_attention(q3, k3, k3, scale=0.3)
        ref, _ = reference(q3, k3, k3, scale=0.3)
        assert out.shape == (3, 10, 16) and torch.allclose(out.double(), ref, atol=atol)
        # (B, S, H, D) transposed views, never copied by the caller
        qt, kt, vt = (rand(2, 11, 4, 16, dtype=dt).transpose(1, 2) for _ in range(3))
        out = attend.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        ref, _ = reference(qt, kt, vt, is_causal=True)
        assert torch.allclose(out.double(), ref, atol=atol)
        q5, k5 = rand(2, 3, 4, 9, 16, dtype=dt), rand(2, 3, 4, 7, 16, dtype=dt)
        out = attend.scaled_dot_product_attention(q5, k5, k5, is_causal=True)
        ref, _ = reference(q5, k5, k5, is_causal=True)
        assert out.shape == (2, 3, 4, 9, 16) and torch.allclose(out.double(), ref, atol=atol)


def test_5d_float_mask_grad_by_default_dispatch():
    q, k = rand(2, 3, 2, 9, 8), rand(2, 3, 2, 7, 8)
    mask = rand(3, 1, 9, 7, requires_grad=True)
    out = attend.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    ref, p = reference(q, k, k, attn_mask=mask)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    g = torch.randn_like(out)
    (gm,) = torch.autograd.grad(out, mask, g)
    (gm64,) = torch.autograd.grad(ref, p.attn_mask, g.double())
    assert gm.shape == mask.shape and torch.allclose(gm.double(), gm64, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(5, 7), (1, 7), (3, 1, 7), (2, 1, 1, 7), (1, 3, 5, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_broadcast_mask_gradient_has_mask_shape(shape, kernel, use_kernel):
    """The mask gradient is reduced to the mask's own shape (blocked: per tile; Triton: atomic
    adds through stride-0 dims), never through a full (B, H, L, S) temporary."""
    use_kernel(kernel)
    torch.manual_seed(0)
    dtype = torch.float64 if kernel == "blocked" else torch.float32
    q, k = rand(2, 3, 5, 16, dtype=dtype), rand(2, 3, 7, 16, dtype=dtype)
    mask = rand(*shape, dtype=dtype, requires_grad=True)

    def f(m):
        with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
            return attend.scaled_dot_product_attention(q, k, k, attn_mask=m)

    if dtype == torch.float64:
        assert torch.autograd.gradcheck(f, (mask,))
    else:
        (g,) = torch.autograd.grad(f(mask), mask, torch.ones(2, 3, 5, 16, device=DEVICE))
        ref64, p = reference(q, k, k, attn_mask=mask)
        (g64,) = torch.autograd.grad(ref64, p.attn_mask, torch.ones_like(ref64))
        assert g.shape == mask.shape and torch.allclose(g.double(), g64, atol=1e-4)


@pytest.mark.parametrize("backend,kernel", list(_all_backend_params()))
def test_nan_in_one_head_does_not_leak(backend, kernel, use_kernel):
    use_kernel(kernel)
    dt = _dtype_for(backend, kernel)
    q, k, v = rand(2, 3, 16, 16, dtype=dt), rand(2, 3, 16, 16, dtype=dt), rand(2, 3, 16, 16, dtype=dt)
    k[1, 2, 5, 0] = float("nan")
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[1, 2] = True
    assert torch.isfinite(out[~bad]).all()
    assert torch.isnan(out[1, 2, 5:]).all()


@pytest.mark.parametrize("backend,kernel", list(_all_backend_params()))
def test_empty_sequences(backend, kernel, use_kernel):
    use_kernel(kernel)
    dt = _dtype_for(backend, kernel)
    with attend.sdpa_kernel(backend):
        q, k = rand(2, 2, 0, 16, dtype=dt, requires_grad=True), rand(2, 2, 5, 16, dtype=dt, requires_grad=True)
        out = attend.scaled_dot_product_attention(q, k, k)
        assert out.shape == (2, 2, 0, 16)
        q, k = rand(2, 2, 4, 16, dtype=dt, requires_grad=True), rand(2, 2, 0, 16, dtype=dt, requires_grad=True)
        out = attend.scaled_dot_product_attention(q, k, k)
        assert out.shape == (2, 2, 4, 16) and torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_bias_through_torch_functional(kernel, use_kernel):
    use_kernel(kernel)
    q, k, v = rand(2, 2, 9, 16, dtype=torch.float16), rand(2, 2, 13, 16, dtype=torch.float16), \
        rand(2, 2, 13, 16, dtype=torch.float16)
    for bias in (causal_lower_right(9, 13), causal_upper_left(9, 13)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ref, _ = reference(q, k, v, attn_mask=bias)
        assert torch.allclose(out.double(), ref, atol=2e-3)
        with attend.sdpa_kernel(B.FLASH_ATTENTION):  # the fused path, with no L x S mask
            assert attend.explain(q, k, v, attn_mask=bias).backend is B.FLASH_ATTENTION


def test_causal_bias_matches_torch_bias_module():
    from torch.nn.attention import bias as tb

    q, k, v = rand(1, 2, 7, 8), rand(1, 2, 11, 8), rand(1, 2, 11, 8)
    for ours, theirs in ((causal_lower_right, tb.causal_lower_right), (causal_upper_left, tb.causal_upper_left)):
        a = attend.scaled_dot_product_attention(q, k, v, attn_mask=ours(7, 11))
        b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=theirs(7, 11))
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_compile_fullgraph_matches_eager(kernel, use_kernel):
    use_kernel(kernel)
    dt = torch.float16 if kernel == "triton" else torch.float32
    q, k, v = (rand(1, 2, 32, 16, dtype=dt, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return attend.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    eager = fn(q, k, v)
    assert torch.equal(out, eager)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(eager.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cpu", reason="measures host RSS of the CPU path")
def test_blocked_forward_memory_is_linear():
    """1x1x16384x64 fp32 causal forward: the FLASH path must stay well under 400 MiB of peak RSS."""
    code = (
        "import torch, attend; from attend._memory import peak_rss_increase_mib as peak;"
        "q=torch.randn(1,1,16384,64);"
        "f=lambda: attend.scaled_dot_product_attention(q,q,q,is_causal=True);"
        "\nwith attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION): print(peak(f))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    mib = float(res.stdout.split()[-1])
    assert mib < 200, f"blocked forward raised peak RSS by {mib:.0f} MiB"


@pytest.mark.parametrize("kernel", KERNELS)
def test_gqa_dropout_backward_regenerates_the_forward_mask(kernel, use_kernel):
    """GQA + causal + dropout: dK/dV sum over the query heads of a group, each with its own mask."""
    use_kernel(kernel)
    torch.manual_seed(0)
    q = rand(2, 4, 21, 16, requires_grad=True)
    k, v = (rand(2, 2, 27, 16, requires_grad=True) for _ in range(2))

    def f(q, k, v):
        torch.manual_seed(7)
        with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
            return attend.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True, enable_gqa=True)

    _directional_grad_check(f, (q, k, v))


@pytest.mark.parametrize("backend,kernel", list(_all_backend_params()))
def test_decode_shape(backend, kernel, use_kernel):
    """L=1 against a long cache, GQA, bottom-right causal (the last query sees every key)."""
    use_kernel(kernel)
    dt = _dtype_for(backend, kernel)
    q, k, v = rand(3, 8, 1, 32, dtype=dt), rand(3, 2, 300, 32, dtype=dt), rand(3, 2, 300, 32, dtype=dt)
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(1, 300), enable_gqa=True)
    ref64, _ = reference(q, k, v, enable_gqa=True)
    assert_scaled_close(out, ref64, same_precision(q, k, v, enable_gqa=True))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask_kind", ["float", "bool", "key_bias"])
def test_efficient_fp32_relative_error_within_5e_4(kernel, mask_kind, use_kernel):
    """EFFICIENT's contract for fp32: relative error <= 5e-4 against float64, forward and
    backward (no tf32 unless torch.backends.cuda.matmul.allow_tf32 is set)."""
    use_kernel(kernel)
    torch.manual_seed(7)
    L, S = 70, 90
    q, k, v = (rand(2, 4, n, 64, requires_grad=True) for n in (L, S, S))
    if mask_kind == "float":
        mask = rand(2, 4, L, S, requires_grad=True)
    elif mask_kind == "key_bias":
        mask = rand(2, 1, 1, S, requires_grad=True)
    else:
        mask = torch.rand(2, 1, L, S, device=DEVICE) > 0.2
    inputs = [q, k, v] + ([mask] if mask.is_floating_point() else [])
    with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref, p = reference(q, k, v, attn_mask=mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    refs = torch.autograd.grad(ref, [p.query, p.key, p.value] + ([p.attn_mask] if mask.is_floating_point() else []),
                               g.double())
    for name, a, r in zip(["out", "dq", "dk", "dv", "dmask"], [out, *grads], [ref, *refs]):
        rel = ((a.double() - r).norm() / r.norm()).item()
        assert rel <= 5e-4, f"{mask_kind} {name}: relative error {rel:.2e} > 5e-4"

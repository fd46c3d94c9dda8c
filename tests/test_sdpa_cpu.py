"""Numerics of the CPU backends (MATH, blocked FLASH/EFFICIENT) against a float64 oracle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attend
from attend import SDPBackend as B
from attend.bias import causal_lower_right, causal_upper_left
from conftest import assert_scaled_close, rand, reference, same_precision

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (id, L, S, Hq, Hkv, mask kind); masks: None, "causal", "bool", "float", "padding", "lower_right", "upper_left"
CASES = [
    ("plain", 37, 37, 4, 4, None),
    ("causal", 70, 70, 2, 2, "causal"),
    ("causal_L<S", 20, 300, 2, 2, "causal"),
    ("gqa4", 33, 65, 8, 2, None),
    ("gqa_causal", 64, 64, 4, 1, "causal"),
    ("bool_mask", 40, 50, 4, 4, "bool"),
    ("float_mask", 40, 50, 4, 4, "float"),
    ("padding", 31, 600, 2, 2, "padding"),
    ("lower_right_L<S", 17, 45, 2, 2, "lower_right"),
    ("lower_right_L>S", 45, 17, 2, 2, "lower_right"),
    ("upper_left_L>S", 45, 17, 2, 2, "upper_left"),
]
BACKENDS = {B.MATH: None, B.FLASH_ATTENTION: {None, "causal", "lower_right", "upper_left"}, B.EFFICIENT_ATTENTION: "all"}


def _make(case, dtype, grad=False):
    _, L, S, hq, hkv, kind = case
    q = rand(2, hq, L, 24, dtype=dtype, requires_grad=grad)
    k = rand(2, hkv, S, 24, dtype=dtype, requires_grad=grad)
    v = rand(2, hkv, S, 24, dtype=dtype, requires_grad=grad)
    kw = dict(enable_gqa=hq != hkv)
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool":
        kw["attn_mask"] = torch.rand(2, 1, L, S) > 0.3
    elif kind == "float":
        kw["attn_mask"] = rand(2, hq, L, S, dtype=dtype, requires_grad=grad)
    elif kind == "padding":
        m = torch.ones(2, 1, 1, S, dtype=torch.bool)
        m[0, ..., S // 3:] = False
        kw["attn_mask"] = m
    elif kind == "lower_right":
        kw["attn_mask"] = causal_lower_right(L, S)
    elif kind == "upper_left":
        kw["attn_mask"] = causal_upper_left(L, S)
    return q, k, v, kw


def _params():
    for backend, kinds in BACKENDS.items():
        for case in CASES:
            if kinds is None or kinds == "all" or case[5] in kinds:
                for dtype in DTYPES:
                    yield pytest.param(backend, case, dtype, id=f"{backend.name}-{case[0]}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,case,dtype", list(_params()))
def test_forward_backward_match_float64(backend, case, dtype):
    torch.manual_seed(hash(case[0]) % 1000)
    q, k, v, kw = _make(case, dtype, grad=True)
    with attend.sdpa_kernel(backend):
        assert attend.explain(q, k, v, **kw).backend is backend
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
    ref64, p64 = reference(q, k, v, **kw)
    ref_same = same_precision(q.detach().requires_grad_(), k.detach().requires_grad_(),
                              v.detach().requires_grad_(), **kw)
    assert out.dtype == dtype
    assert_scaled_close(out, ref64, ref_same)
    g = torch.randn_like(out)
    inputs = [q, k, v] + ([kw["attn_mask"]] if case[5] == "float" else [])
    grads = torch.autograd.grad(out, inputs, g)
    inputs64 = [p64.query, p64.key, p64.value] + ([p64.attn_mask] if case[5] == "float" else [])
    grads64 = torch.autograd.grad(ref64, inputs64, g.double())
    # The same-precision yardstick for gradients: the float64 formula's grads rounded to dtype,
    # plus torch's math backend error; kernels accumulate in fp32 so 8x leaves room for fp16 inputs.
    ref_inputs = [t.detach().requires_grad_() for t in inputs]
    kw_same = dict(kw, attn_mask=ref_inputs[3]) if case[5] == "float" else kw
    grads_same = torch.autograd.grad(same_precision(*ref_inputs[:3], **kw_same), ref_inputs, g)
    for name, a, r64, rs in zip("qkvm", grads, grads64, grads_same):
        assert_scaled_close(a, r64, rs, k=8.0, what=f"d{name}")


@pytest.mark.parametrize("backend", [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
def test_dropout_reproducible_and_gradcheck(backend):
    torch.manual_seed(0)
    q, k, v = (rand(1, 2, 9, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))

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
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", [B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
def test_dropout_is_unbiased(backend):
    torch.manual_seed(0)
    q, k, v = (rand(1, 1, 16, 8, dtype=torch.float64) for _ in range(3))
    with attend.sdpa_kernel(backend):
        mean = sum(attend.scaled_dot_product_attention(q, k, v, dropout_p=0.3) for _ in range(400)) / 400
    ref, _ = reference(q, k, v)
    assert (mean - ref).abs().max() < 0.15 * ref.abs().max()


@pytest.mark.parametrize("backend", [B.MATH, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
def test_fully_masked_rows_give_zero_and_finite_grads(backend):
    q, k, v = (rand(2, 2, 6, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 2, 6, 10) > 0.5
    mask[:, :, 2] = False
    k2, v2 = (rand(2, 2, 10, 8, requires_grad=True) for _ in range(2))
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    for t in (q, k2, v2):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


@pytest.mark.parametrize("backend", [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
def test_lower_right_with_no_visible_keys_is_zero(backend):
    q, k, v = rand(1, 1, 8, 4), rand(1, 1, 3, 4), rand(1, 1, 3, 4)
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 3))
    assert torch.equal(out[..., :5, :], torch.zeros_like(out[..., :5, :]))
    ref, _ = reference(q, k, v, attn_mask=causal_lower_right(8, 3))
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("backend", [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
def test_shapes_3d_5d_strided_and_scale(backend):
    q3, k3, v3 = rand(3, 10, 8), rand(3, 12, 8), rand(3, 12, 5)
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q3, k3, v3, scale=0.3) if backend is not B.FLASH_ATTENTION else None
        if out is not None:
            ref, _ = reference(q3, k3, v3, scale=0.3)
            assert out.shape == (3, 10, 5) and torch.allclose(out.double(), ref, atol=1e-5)
        # (B, S, H, D) transposed views, never copied by the caller
        qt, kt, vt = (rand(2, 11, 4, 8).transpose(1, 2) for _ in range(3))
        out = attend.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        ref, _ = reference(qt, kt, vt, is_causal=True)
        assert torch.allclose(out.double(), ref, atol=1e-5)
        q5, k5 = rand(2, 3, 4, 9, 8), rand(2, 3, 4, 7, 8)
        out = attend.scaled_dot_product_attention(q5, k5, k5, is_causal=True)
        ref, _ = reference(q5, k5, k5, is_causal=True)
        assert out.shape == (2, 3, 4, 9, 8) and torch.allclose(out.double(), ref, atol=1e-5)


def test_efficient_5d_float_mask_grad():
    q, k = rand(2, 3, 2, 9, 8), rand(2, 3, 2, 7, 8)
    mask = rand(3, 1, 9, 7, requires_grad=True)
    out = attend.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    ref, p = reference(q, k, k, attn_mask=mask)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    g = torch.randn_like(out)
    (gm,) = torch.autograd.grad(out, mask, g)
    (gm64,) = torch.autograd.grad(ref, p.attn_mask, g.double())
    assert gm.shape == mask.shape and torch.allclose(gm.double(), gm64, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3), (1, 7), (3, 1, 7), (2, 1, 1, 7), (1, 3, 5, 1)], ids=str)
def test_broadcast_mask_gradient_has_mask_shape(shape):
    torch.manual_seed(0)
    q, k = rand(2, 3, 5, 4, dtype=torch.float64), rand(2, 3, 7, 4, dtype=torch.float64)
    full = (2, 3, 5, 7)
    mask = rand(*[s for s in shape], dtype=torch.float64, requires_grad=True)
    if len(shape) == 2 and shape[0] != 1:
        mask = rand(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.broadcast_shapes(mask.shape, full) == full

    def f(m):
        with attend.sdpa_kernel(B.EFFICIENT_ATTENTION):
            return attend.scaled_dot_product_attention(q, k, k, attn_mask=m)

    assert torch.autograd.gradcheck(f, (mask,))


def test_nan_in_one_head_does_not_leak():
    for backend in (B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION):
        q, k, v = rand(2, 3, 16, 8), rand(2, 3, 16, 8), rand(2, 3, 16, 8)
        k[1, 2, 5, 0] = float("nan")
        with attend.sdpa_kernel(backend):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
        bad = torch.zeros(2, 3, dtype=torch.bool)
        bad[1, 2] = True
        assert torch.isfinite(out[~bad]).all(), backend
        assert torch.isnan(out[1, 2, 5:]).all(), backend


@pytest.mark.parametrize("backend", [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
def test_empty_sequences(backend):
    with attend.sdpa_kernel(backend):
        q, k = rand(2, 2, 0, 8, requires_grad=True), rand(2, 2, 5, 8, requires_grad=True)
        out = attend.scaled_dot_product_attention(q, k, k)
        assert out.shape == (2, 2, 0, 8)
        q, k = rand(2, 2, 4, 8, requires_grad=True), rand(2, 2, 0, 8, requires_grad=True)
        out = attend.scaled_dot_product_attention(q, k, k)
        assert out.shape == (2, 2, 4, 8) and torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))


def test_causal_bias_through_torch_functional():
    q, k, v = rand(2, 2, 9, 8), rand(2, 2, 13, 8), rand(2, 2, 13, 8)
    for bias in (causal_lower_right(9, 13), causal_upper_left(9, 13)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.materialize())
        assert torch.allclose(out, expected, atol=1e-6)
        with attend.sdpa_kernel(B.FLASH_ATTENTION):  # the fused path, with no L x S mask
            assert attend.explain(q, k, v, attn_mask=bias).backend is B.FLASH_ATTENTION


def test_causal_bias_matches_torch_bias_module():
    from torch.nn.attention import bias as tb

    q, k, v = rand(1, 2, 7, 8), rand(1, 2, 11, 8), rand(1, 2, 11, 8)
    for ours, theirs in ((causal_lower_right, tb.causal_lower_right), (causal_upper_left, tb.causal_upper_left)):
        a = attend.scaled_dot_product_attention(q, k, v, attn_mask=ours(7, 11))
        b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=theirs(7, 11))
        assert torch.allclose(a, b, atol=1e-6)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = (rand(1, 2, 32, 16, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return attend.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    eager = fn(q, k, v)
    assert torch.allclose(out, eager, atol=1e-6)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(eager.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)


def test_blocked_forward_memory_is_linear():
    """1x1x16384x64 fp32 causal forward: the FLASH path must stay well under 400 MiB of peak RSS."""
    code = (
        "import torch, attend; from attend._memory import peak_rss_increase_mib as peak;"
        "q=torch.randn(1,1,16384,64);"
        "f=lambda: attend.scaled_dot_product_attention(q,q,q,is_causal=True);"
        "\nwith attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION): print(peak(f))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    mib = float(res.stdout.split()[-1])
    assert mib < 200, f"blocked forward raised peak RSS by {mib:.0f} MiB"

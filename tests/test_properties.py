"""Property test: over random shapes, alignments and masks, the blocked kernel agrees with the
float64 reference, forward and backward. float64 CPU tensors always take the blocked kernel
(the Triton core has no fp64), also under the interpreter."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attend
from attend import SDPBackend as B
from attend.bias import causal_lower_right
from conftest import reference


@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(0, 40), S=st.integers(0, 40), hkv=st.integers(1, 3), group=st.integers(1, 3),
    D=st.sampled_from([1, 7, 16, 33]), kind=st.sampled_from(["none", "causal", "lower_right", "bool", "float"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_blocked_kernel_matches_float64(L, S, hkv, group, D, kind, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q = torch.randn(2, hq, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(enable_gqa=group > 1)
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "lower_right":
        kw["attn_mask"] = causal_lower_right(L, S)
    elif kind == "bool":
        kw["attn_mask"] = torch.rand(2, 1, L, S, generator=g) > 0.4
    elif kind == "float":
        kw["attn_mask"] = torch.randn(1, hq, L, S, generator=g, dtype=torch.float64)
    backend = B.EFFICIENT_ATTENTION if kind in ("bool", "float") else B.FLASH_ATTENTION
    with attend.sdpa_kernel(backend):
        assert attend.explain(q, k, v, **kw).backend is backend
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
    ref, p = reference(q, k, v, **kw)
    assert torch.allclose(out, ref, atol=1e-10)
    if out.numel():
        go = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), go, allow_unused=True)
        want = torch.autograd.grad(ref, (p.query, p.key, p.value), go, allow_unused=True)
        for a, b in zip(got, want):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            assert torch.allclose(a, b, atol=1e-9)

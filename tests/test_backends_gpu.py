"""Every CUDA backend and flash implementation agrees with the float64 reference (PyTorch's own
SDPA under its MATH backend, conftest.torch_sdpa; never attend's MATH) in bf16, forward and
backward (GPU only). FA4 runs where flash-attn-4 is importable (the README's contributor section
says how to install it on the GPU machine)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import attend
from attend import SDPBackend as B
from conftest import assert_matches_float64, growing_layouts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends need a GPU")

CASES = [(256, 256, 64, False), (256, 256, 128, True), (200, 330, 128, False)]  # (L, S, D, causal)


def _check(L, S, D, causal, gqa=False):
    torch.manual_seed(0)
    hkv = 2 if gqa else 4
    q = torch.randn(2, 4, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert_matches_float64(out, q, k, v, is_causal=causal, enable_gqa=gqa)


@pytest.mark.parametrize("backend", [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_matches_float64_in_bf16(backend, case):
    L, S, D, causal = case
    q = torch.randn(2, 4, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 4, S, D, device="cuda", dtype=torch.bfloat16)
    with attend.sdpa_kernel([backend]):
        decision = attend.explain(q, k, k, is_causal=causal)
        if decision.backend is not backend:
            pytest.skip(f"{backend.name} refuses this case here: {decision}")
        _check(L, S, D, causal)


@pytest.mark.parametrize("impl", ["FA2", "FA4"])
@pytest.mark.parametrize("case", [(256, 256, 128, False), (256, 256, 128, True), (300, 300, 64, True)], ids=str)
def test_flash_impl_matches_float64_in_bf16(impl, case):
    if impl == "FA4" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn-4 is not installed here")
    L, S, D, causal = case
    attend.activate_flash_attention_impl(impl)
    try:
        assert attend.current_flash_attention_impl() == impl
        with attend.sdpa_kernel([B.FLASH_ATTENTION]):
            _check(L, S, D, causal, gqa=impl == "FA4")
    finally:
        attend.restore_flash_attention_impl()
    assert attend.current_flash_attention_impl() is None


def test_explain_names_every_cuda_backend():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    text = str(attend.explain(q, q, q))
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        assert name in text, text



def _cudnn_inputs(case: str):
    """(q, k, v, kwargs) of a call CUDNN takes, in bf16 (fp16 for "rows")."""
    if case.startswith("decode"):  # a KV-cache step: one query row, a view of the model's projection
        q = torch.randn(2, 1, 32 * 128, device="cuda", dtype=torch.bfloat16).view(2, 1, 32, 128).transpose(1, 2)
        k, v = (torch.randn(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kw = dict(enable_gqa=True)
        if case == "decode-padding":
            kw["attn_mask"] = torch.rand(2, 1, 1, 256, device="cuda") > 0.2
        return q, k, v, kw
    if case == "rows":  # (B, H, L, D) views of (B, L, H, D) tensors
        q, k, v = (torch.randn(2, 200, 8, 64, device="cuda", dtype=torch.float16).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        return q, k, v, {}
    q = torch.randn(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    kw = dict(is_causal=True, enable_gqa=True)
    if case == "dropout":
        kw["dropout_p"] = 0.125
    return q, k, v, kw


@pytest.mark.parametrize("case", ["decode", "decode-padding", "causal-gqa", "dropout", "rows"])
def test_cudnn_runs_sdpa_as_under_sdpa_kernel(case):
    """CUDNN runs PyTorch's SDPA with its flags set as sdpa_kernel(CUDNN_ATTENTION) sets them
    (backends/_base.torch_sdpa_only): the output, its layout, the gradients and the dropout stream
    are those of SDPA inside the context manager, bit for bit."""
    from torch.nn.attention import SDPBackend as TorchBackend
    from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel

    from attend._params import default_scale, prepare
    from attend.backends import BACKENDS

    q, k, v, kw = _cudnn_inputs(case)
    if attend.explain(q, k, v, **kw).backend is not B.CUDNN_ATTENTION:
        pytest.skip(f"CUDNN does not take this call here: {attend.explain(q, k, v, **kw)}")
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda", dtype=q.dtype)
    results = []
    for run in ("attend", "torch"):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(7)
        if run == "attend":
            out = BACKENDS[B.CUDNN_ATTENTION].run(prepare(q, k, v, **kw).params, None)
        else:
            with torch_sdpa_kernel(TorchBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=default_scale(q.shape[-1], None), **kw)
        if q.requires_grad:
            out.backward(dout)
        results.append((out, [t.grad for t in (q, k, v)]))
    (out, grads), (ref, ref_grads) = results
    assert out.stride() == ref.stride() and torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):  # cuDNN's backward may add in another order run to run
        assert (g is None and r is None) or torch.allclose(g, r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


@pytest.mark.parametrize("order", ["default", "cuDNN first", "FA2 first"])
def test_a_key_length_class_answers_as_pytorchs_checks(order):
    """Over every key length up to 600 in each layout a decode loop's K / V take, the dispatcher's
    cached choice (keyed by the length's class, attend._dispatch, Note [key length class]) is a fresh
    ``decide``'s: the installed PyTorch's cuDNN and flash checks read no more of S than the class."""
    import contextlib

    from attend import _dispatch
    from attend._params import prepare

    first = [B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]
    if order == "FA2 first":
        attend.activate_flash_attention_impl("FA2")
        first = [B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]
    context = contextlib.nullcontext() if order == "default" else attend.sdpa_kernel(first, set_priority=True)
    torch.manual_seed(0)
    layouts = growing_layouts(1, 2, 601, 128, device="cuda", dtype=torch.bfloat16)  # 601: prime
    try:
        with context:
            for L, causal, dropout in [(1, False, 0.0), (4, True, 0.0), (64, True, 0.25), (64, False, 0.0)]:
                q = torch.randn(1, L, 8 * 128, device="cuda", dtype=torch.bfloat16).view(1, L, 8, 128).transpose(1, 2)
                for name, make in layouts.items():
                    _dispatch._decisions.clear()
                    for S in range(1, 601):
                        p = prepare(q, *make(S), None, dropout, causal, None, True).params
                        got = _dispatch.choose(p)
                        assert got is _dispatch.decide(p).backend, (name, L, causal, dropout, S)
                    assert len(_dispatch._decisions) < 20, (name, L)  # classes, not lengths
    finally:
        if order == "FA2 first":
            attend.restore_flash_attention_impl()
        _dispatch._decisions.clear()

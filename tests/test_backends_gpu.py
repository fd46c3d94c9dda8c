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
from conftest import assert_matches_float64

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

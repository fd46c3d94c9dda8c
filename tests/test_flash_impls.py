"""The built-in flash implementations: registered on import, never activated by it; clear
errors when their package or GPU is missing; FA4's argument mapping checked with a fake."""

from __future__ import annotations

import pytest
import torch

import attend
from attend import SDPBackend as B
from attend._params import SDPAParams
from attend.backends.flash_impls import FA4, TorchFlash
from attend.bias import causal_lower_right, causal_upper_left
from conftest import reference

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")


def test_registered_on_import_and_inactive():
    assert {"FA2", "FA4"} <= set(attend.list_flash_attention_impls())
    assert attend.current_flash_attention_impl() is None


@needs_no_gpu
def test_fa2_activation_without_gpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match=r"FA2 needs a CUDA GPU; torch.cuda.is_available\(\) is False"):
        attend.activate_flash_attention_impl("FA2")
    assert attend.current_flash_attention_impl() is None


def test_fa4_activation_without_package_says_what_is_missing():
    try:
        import flash_attn.cute.interface  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn-4 is installed here")
    with pytest.raises(RuntimeError, match=r"FA4 needs the flash-attn-4 package \(module flash_attn.cute.interface\)"):
        attend.activate_flash_attention_impl("FA4")
    assert attend.current_flash_attention_impl() is None


def _params(q, k, v, **kw):
    return SDPAParams(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                      kw.get("enable_gqa", False))


def test_checks_state_their_limits():
    q = torch.randn(1, 4, 8, 64, dtype=torch.float16)
    fa2, fa4 = TorchFlash(), FA4(lambda *a, **k: None)
    assert "FA2 runs on cuda tensors only; got cpu" in fa2.check(_params(q, q, q))
    r = fa4.check(_params(q, q, q, dropout_p=0.1, attn_mask=torch.ones(8, 8, dtype=torch.bool)))
    assert "FA4 has no dropout; got dropout_p=0.1" in r and "FA4 takes no attn_mask tensor" in r
    q48 = torch.randn(1, 4, 8, 48, dtype=torch.float16)
    assert any("head dims (64, 96, 128)" in x for x in fa4.check(_params(q48, q48, q48)))
    k = torch.randn(1, 4, 12, 64, dtype=torch.float16)
    assert any("top-left with L=8 != S=12" in x for x in fa4.check(_params(q, k, k, is_causal=True)))
    assert any("bottom-right with L=8 != S=12" in x
               for x in fa2.check(_params(q, k, k, attn_mask=causal_lower_right(8, 12))))


def _fake_fa4(calls):
    """A stand-in for flash_attn.cute.interface.flash_attn_func: (B, S, H, D) layout, bottom-right
    causal, GQA by head groups; returns (out, lse) like the package."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **_):
        calls.append(dict(shape=tuple(q.shape), scale=softmax_scale, causal=causal))
        qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
        mask = causal_lower_right(qt.shape[-2], kt.shape[-2]) if causal else None
        out, _ = reference(qt, kt, vt, attn_mask=mask, scale=softmax_scale, enable_gqa=qt.shape[1] != kt.shape[1])
        return out.transpose(1, 2).to(q.dtype), None

    return flash_attn_func


@pytest.mark.parametrize("case", ["plain", "gqa_bottom_right", "causal_square"])
def test_fa4_maps_layout_causal_gqa_and_scale(case):
    calls = []
    fa4 = FA4(_fake_fa4(calls))
    torch.manual_seed(0)
    L, S, hkv = (8, 8, 4) if case != "gqa_bottom_right" else (5, 13, 2)
    q = torch.randn(2, 4, L, 64, dtype=torch.float32)
    k, v = torch.randn(2, hkv, S, 64), torch.randn(2, hkv, S, 64)
    kw = {"plain": {}, "gqa_bottom_right": dict(attn_mask=causal_lower_right(L, S), enable_gqa=True),
          "causal_square": dict(is_causal=True)}[case]
    out = fa4.forward(_params(q, k, v, **kw), 0.3)
    assert out.shape == (2, 4, L, 64)
    assert calls[0]["shape"] == (2, L, 4, 64) and calls[0]["scale"] == 0.3
    assert calls[0]["causal"] == (case != "plain")
    ref, _ = reference(q, k, v, scale=0.3, **kw)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_active_impl_check_moves_dispatch_on():
    """With an impl whose check refuses the call, FLASH reports its reason and the next backend runs."""
    fa4 = FA4(_fake_fa4([]))
    handle = attend._registry.install_flash_kernel(fa4)
    try:
        q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
        d = attend.explain(q, q, q, dropout_p=0.2)
        assert d.backend is not B.FLASH_ATTENTION
        assert any("FA4" in r for r in d.reasons[B.FLASH_ATTENTION])
        q_up = torch.randn(1, 2, 8, 64, dtype=torch.float16)
        k_up = torch.randn(1, 2, 10, 64, dtype=torch.float16)
        assert attend.explain(q_up, k_up, k_up, attn_mask=causal_upper_left(8, 10)).backend is not B.FLASH_ATTENTION
    finally:
        handle.remove()

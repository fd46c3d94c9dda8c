"""sdpa_kernel state, priority, the flash registry, explain/can_use/warnings/errors, OVERRIDEABLE."""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest
import torch

import attend
from attend import SDPBackend as B
from conftest import rand as _rand


def rand(*shape, **kw):
    # Dispatch tests run on CPU tensors everywhere (also in the GPU run of the suite).
    return _rand(*shape, device="cpu", **kw)

ALL = [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION, B.OVERRIDEABLE]


@pytest.fixture(autouse=True)
def _blocked_kernel(use_kernel):
    # Dispatch tests use fp32 CPU tensors, which FLASH takes through the blocked kernel.
    use_kernel("blocked")


def test_enum_values_match_torch():
    from torch.nn.attention import SDPBackend as T

    for b in attend.SDPBackend:
        assert int(b) == int(getattr(T, b.name))


def test_sdpa_kernel_restricts_restores_and_nests():
    assert attend.enabled_backends() == ALL
    with attend.sdpa_kernel([B.MATH, B.FLASH_ATTENTION]):
        assert attend.enabled_backends() == [B.MATH, B.FLASH_ATTENTION]
        with attend.sdpa_kernel(B.MATH):
            assert attend.enabled_backends() == [B.MATH]
        assert attend.enabled_backends() == [B.MATH, B.FLASH_ATTENTION]
    assert attend.enabled_backends() == ALL


def test_sdpa_kernel_restores_on_exception():
    with pytest.raises(KeyError):
        with attend.sdpa_kernel(B.MATH):
            raise KeyError("boom")
    assert attend.enabled_backends() == ALL


def test_set_priority_orders_selection():
    q = rand(1, 2, 16, 8)
    with attend.sdpa_kernel([B.MATH, B.EFFICIENT_ATTENTION], set_priority=True):
        assert attend.enabled_backends(with_priority=True, device_type="cpu") == [B.MATH, B.EFFICIENT_ATTENTION]
        assert attend.explain(q, q, q).backend is B.MATH
    with attend.sdpa_kernel([B.EFFICIENT_ATTENTION, B.MATH], set_priority=True):
        assert attend.explain(q, q, q).backend is B.EFFICIENT_ATTENTION
    assert attend.explain(q, q, q).backend is B.FLASH_ATTENTION


@pytest.mark.parametrize("bad", ["MATH", 0, [B.MATH, "flash"], None])
def test_sdpa_kernel_type_errors_name_the_value(bad):
    with pytest.raises(TypeError, match="SDPBackend"):
        with attend.sdpa_kernel(bad):
            pass


def test_state_is_per_thread_and_per_task():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with attend.sdpa_kernel(B.MATH):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    entered.wait(5)
    seen["main"] = attend.enabled_backends()
    release.set()
    t.join()
    assert seen["main"] == ALL

    async def task(backend, out):
        with attend.sdpa_kernel(backend):
            await asyncio.sleep(0.01)
            out.append(attend.enabled_backends())

    async def both():
        a, b = [], []
        await asyncio.gather(task(B.MATH, a), task(B.EFFICIENT_ATTENTION, b))
        return a, b

    a, b = asyncio.run(both())
    assert a == [[B.MATH]] and b == [[B.EFFICIENT_ATTENTION]]


class _Kernel:
    def __init__(self):
        self.calls = 0

    def check(self, p):
        return [] if p.dropout == 0 else ["fake kernel takes no dropout"]

    def forward(self, p, scale):
        self.calls += 1
        return torch.zeros_like(p.query) + 7


def test_flash_registry_activate_restore_and_handles():
    kernel, removed = _Kernel(), []

    def register():
        handle = attend._registry.install_flash_kernel(kernel)

        class H:
            def remove(self):
                removed.append(True)
                handle.remove()
        return H()

    attend.register_flash_attention_impl("fake", register_fn=register)
    try:
        assert "fake" in attend.list_flash_attention_impls()
        assert attend.current_flash_attention_impl() is None  # registering never activates
        attend.activate_flash_attention_impl("fake")
        assert attend.current_flash_attention_impl() == "fake"
        q = rand(1, 2, 8, 4)
        assert (attend.scaled_dot_product_attention(q, q, q) == 7).all() and kernel.calls == 1
        # The impl's own check drives dispatch: dropout goes to the next backend.
        d = attend.explain(q, q, q, dropout_p=0.5)
        assert d.backend is B.EFFICIENT_ATTENTION
        assert d.reasons[B.FLASH_ATTENTION] == ["fake kernel takes no dropout"]
        attend.activate_flash_attention_impl("fake")  # re-activation restores first
        assert removed == [True]
        attend.restore_flash_attention_impl()
        assert removed == [True, True] and attend.current_flash_attention_impl() is None
        assert not (attend.scaled_dot_product_attention(q, q, q) == 7).all()
    finally:
        attend.restore_flash_attention_impl()
        attend._registry._impls.pop("fake", None)


def test_flash_registry_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown flash attention implementation 'nope'; registered: \["):
        attend.activate_flash_attention_impl("nope")
    assert attend.current_flash_attention_impl() is None


def test_failing_register_fn_leaves_default_active():
    def register():
        raise RuntimeError("flash-attn-4 is not installed")

    attend.register_flash_attention_impl("broken", register_fn=register)
    try:
        with pytest.raises(RuntimeError, match="not installed"):
            attend.activate_flash_attention_impl("broken")
        assert attend.current_flash_attention_impl() is None
    finally:
        attend._registry._impls.pop("broken", None)


def test_explain_names_choice_and_every_reason():
    q, mask = rand(2, 4, 32, 16), torch.rand(2, 1, 32, 32) > 0.5
    with attend.sdpa_kernel([B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]):
        d = attend.explain(q, q, q, attn_mask=mask)
    assert d.backend is B.EFFICIENT_ATTENTION
    text = str(d)
    assert "EFFICIENT_ATTENTION  SELECTED" in text
    assert "FLASH takes no attn_mask" in text
    assert d.reasons[B.CUDNN_ATTENTION] == ["disabled by sdpa_kernel"]
    assert "usable, but lower priority" in text  # MATH


def test_explain_on_meta_tensors():
    q = torch.empty(2, 8, 4096, 64, device="meta")
    d = attend.explain(q, q, q)
    assert d.backend is B.MATH  # nothing fused runs on meta; MATH runs anywhere
    assert "no kernel for device type 'meta'" in str(d)


def test_can_use_debug_warns_each_reason():
    q = rand(1, 2, 8, 4)
    p = attend.SDPAParams(q, q, q, torch.ones(8, 8, dtype=torch.bool), 0.0, False, False)
    assert attend.can_use_efficient_attention(p)
    with pytest.warns(UserWarning, match="FLASH_ATTENTION cannot be used: FLASH takes no attn_mask"):
        assert not attend.can_use_flash_attention(p, debug=True)
    with pytest.warns(UserWarning, match="CUDNN runs on cuda tensors only"):
        assert not attend.can_use_cudnn_attention(p, debug=True)
    with pytest.raises(TypeError, match="SDPAParams"):
        attend.can_use_flash_attention((q, q, q))


def test_warn_for_unfused_kernels_once_per_reason(monkeypatch):
    monkeypatch.setattr(attend, "WARN_FOR_UNFUSED_KERNELS", True)
    monkeypatch.setattr(attend._dispatch, "_warned", set())
    q = rand(1, 2, 8, 4)
    with attend.sdpa_kernel([B.MATH, B.FLASH_ATTENTION]):
        with pytest.warns(UserWarning, match="fell back to the unfused MATH backend because FLASH_ATTENTION: FLASH takes no attn_mask"):
            attend.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(8, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            attend.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(8, 8))  # same reason: silent
    with attend.sdpa_kernel(B.MATH):
        with pytest.warns(UserWarning, match="disabled by sdpa_kernel"):
            attend.scaled_dot_product_attention(q, q, q)


def test_no_backend_error_lists_reasons():
    q = rand(1, 2, 8, 4)
    with attend.sdpa_kernel([B.FLASH_ATTENTION, B.CUDNN_ATTENTION]):
        with pytest.raises(RuntimeError) as e:
            attend.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(8, 8))
    msg = str(e.value)
    assert "FLASH_ATTENTION: FLASH takes no attn_mask" in msg
    assert "CUDNN_ATTENTION: CUDNN runs on cuda tensors only" in msg
    assert "disabled by sdpa_kernel: EFFICIENT_ATTENTION, MATH, OVERRIDEABLE" in msg


def test_overrideable_registration_for_meta_device():
    calls = []

    def impl(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((query.shape, is_causal, scale))
        return torch.empty(*query.shape[:-1], value.shape[-1], device=query.device)

    def check(p):
        return [] if p.query.shape[-1] <= 128 else [f"head_dim {p.query.shape[-1]} > 128"]

    handle = attend.register_overrideable("meta", impl, check=check)
    try:
        q = torch.empty(2, 4, 16, 64, device="meta")
        assert attend.explain(q, q, q).backend is B.OVERRIDEABLE
        out = attend.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5)
        assert out.shape == (2, 4, 16, 64) and calls == [((2, 4, 16, 64), True, 0.5)]
        big = torch.empty(2, 4, 16, 256, device="meta")
        d = attend.explain(big, big, big)
        assert d.backend is B.MATH and d.reasons[B.OVERRIDEABLE] == ["head_dim 256 > 128"]
        with attend.sdpa_kernel([B.MATH]):
            assert attend.explain(q, q, q).backend is B.MATH
    finally:
        handle.remove()
    assert "no OVERRIDEABLE implementation" in str(attend.explain(q, q, q))


def test_public_names_importable():
    from attend.bias import CausalBias, CausalVariant, causal_lower_right, causal_upper_left  # noqa: F401
    from attend.flex_attention import (  # noqa: F401
        BlockMask, and_masks, create_block_mask, create_mask, flex_attention, noop_mask, or_masks,
    )
    from attend.varlen import AuxRequest, varlen_attn  # noqa: F401

    for name in attend.__all__:
        assert hasattr(attend, name), name


def test_pytorchs_backend_members_work_in_sdpa_kernel():
    from torch.nn.attention import SDPBackend as T

    with attend.sdpa_kernel(T.MATH):
        assert attend.enabled_backends() == [B.MATH]
    with attend.sdpa_kernel([T.EFFICIENT_ATTENTION, B.MATH], set_priority=True):
        assert attend.enabled_backends(with_priority=True, device_type="cpu") == [B.EFFICIENT_ATTENTION, B.MATH]
    with attend.sdpa_kernel([T.MATH], set_priority=1):  # PyTorch takes 0 / 1 here too
        assert attend.enabled_backends() == [B.MATH]
    with pytest.raises(ValueError, match="ERROR"):
        with attend.sdpa_kernel(T.ERROR):
            pass
    with pytest.raises(TypeError, match="set_priority must be a bool, got str"):
        with attend.sdpa_kernel(T.MATH, set_priority="False"):
            pass


def test_pytorchs_causal_bias_and_params_work_in_explain_and_can_use():
    from torch.nn.attention import bias as tb

    q, k = rand(1, 2, 8, 16), rand(1, 2, 12, 16)
    bias = tb.causal_lower_right(8, 12)
    with attend.sdpa_kernel([B.FLASH_ATTENTION, B.MATH]):
        d = attend.explain(q, k, k, attn_mask=bias)
    assert d.backend is B.FLASH_ATTENTION, str(d)  # the fused path, not a dense L x S mask
    assert "CausalBias(LOWER_RIGHT, seq_len_q=8, seq_len_kv=12)" in d.call
    for params in (attend.SDPAParams(q, k, k, bias, 0.0, False, False),
                   torch.backends.cuda.SDPAParams(q, k, k, bias, 0.0, False, False)):
        assert attend.can_use_flash_attention(params)
        assert not attend.can_use_cudnn_attention(params)
    bad = attend.SDPAParams(q, k, k, tb.causal_lower_right(8, 13), 0.0, False, False)
    with pytest.warns(UserWarning, match=r"CausalBias for \(8, 13\)"):
        assert not attend.can_use_flash_attention(bad, debug=True)


def test_explain_says_why_fused_backends_skip_calls_only_math_takes():
    q = rand(2, 4, 8, 16)
    d = attend.explain(q, rand(2, 2, 8, 16), rand(2, 1, 8, 16), enable_gqa=True)
    assert d.backend is B.MATH
    for b in (B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION):
        assert any("one head count for key and value; got 2 and 1" in r for r in d.reasons[b]), str(d)
    d = attend.explain(q, q, q, dropout_p=1.0)
    assert d.backend is B.MATH and any("dropout_p=1.0" in r for r in d.reasons[B.EFFICIENT_ATTENTION])
    d = attend.explain(rand(0, 4, 8, 16), rand(0, 4, 8, 16), rand(0, 4, 8, 16))
    assert d.backend is B.MATH and any("zero-size" in r for r in d.reasons[B.FLASH_ATTENTION])
    # Broadcast and 2-D inputs are normalized first: the fused path takes them
    assert attend.explain(rand(6, 16), rand(9, 16), rand(9, 16)).backend is B.FLASH_ATTENTION
    assert attend.explain(q, rand(4, 8, 16), rand(4, 8, 16), scale=torch.tensor(0.3)).backend is B.FLASH_ATTENTION

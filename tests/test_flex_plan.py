"""Decode plans (attend/_flex/plan.py): a decode loop's flex calls after the first of their class
launch the kept plan, with each call's own keys, captures and scalars, against float64; a call
of another class gets a plan of its own, and the calls a plan must not serve take the full path
(its checks, its gradients)."""

from __future__ import annotations

import pytest
import torch

import attend.flex_attention as flex
from attend._flex import dispatch, plan
from attend._flex.trace import data_cells
from attend.kernels.options import kernel_options
from conftest import DEVICE, assert_scaled_close

B, HQ, HKV, E = 2, 4, 2, 16


@pytest.fixture(autouse=True)
def no_plans():
    """Each test starts with no plan kept (the counts it asserts are its own calls')."""
    plan._PLANS.clear()
    yield
    plan._PLANS.clear()


def _tf32(t):
    """fp32 ``t`` cut to TF32's 10-bit mantissa, as a tensor-core product reads an fp32 operand
    that Triton hands it unconverted (the low 13 bits ignored)."""
    return (t.contiguous().view(torch.int32) & -0x2000).view(torch.float32)


def _reference(q, k, v, score_mod, dtype, tf32=False):
    """The definition in ``dtype``: every key kept, the score_mod on the scaled scores. ``tf32``:
    both products' operands cut to TF32 first, as the kernel's dots take fp32 under
    ``allow_tf32`` (cuBLAS would not: a decode call's one query row is a GEMV, in IEEE fp32)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if tf32:
        q, k, v = _tf32(q), _tf32(k), _tf32(v)
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / E ** 0.5
    b, h, i, j = torch.meshgrid(*(torch.arange(n, device=q.device) for n in s.shape), indexing="ij")
    s = score_mod(s, b, h, i, j)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    return (_tf32(p) if tf32 else p) @ v, lse


def _softcap(cap):
    """A fresh closure per call, as a model builds it: the cap is declared data (a runtime scalar)."""
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return data_cells(softcap_mod, "cap")


def _alibi(slopes):
    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (kv_idx - q_idx).abs()
    return alibi


def _check(out, lse, q, k, v, mod, what, tf32=False):
    o64, l64 = _reference(q, k, v, mod, torch.float64)
    o32, l32 = _reference(q, k, v, mod, torch.float32, tf32)
    assert_scaled_close(out, o64, o32, what=f"{what} out")
    assert_scaled_close(lse, l64, l32, what=f"{what} lse")


def _cache(g, n):
    return torch.randn(B, HKV, n, E, generator=g).to(DEVICE)


def test_decode_loop_launches_the_plan_with_each_steps_keys_and_data():
    """Growing keys (new strides each step, as a concatenated cache; then views of one buffer), a
    new cap each step (a scalar slot) and a new captured tensor each step: one plan per class, and
    each step right against float64."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, HQ * E, generator=g).to(DEVICE).view(B, 1, HQ, E).transpose(1, 2)  # a model's view
    k, v = _cache(g, 37), _cache(g, 37)
    made, planned = plan.STATS["made"], plan.STATS["planned"]
    fused = dispatch.PATHS["band_hooks"]
    steps = 6
    for i in range(steps):
        k, v = torch.cat([k, _cache(g, 1)], 2), torch.cat([v, _cache(g, 1)], 2)
        mod = _softcap(2.0 + 0.5 * i)
        out, aux = flex.flex_attention(q, k, v, score_mod=mod, enable_gqa=True,
                                       return_aux=flex.AuxRequest(lse=True))
        _check(out, aux.lse, q, k, v, mod, f"softcap step {i} (S={k.shape[2]})")
    assert plan.STATS["made"] == made + 1 and plan.STATS["planned"] == planned + steps - 1
    assert dispatch.PATHS["band_hooks"] == fused + steps  # every step on the core's hooks, planned or not

    buf_k, buf_v = _cache(g, 80), _cache(g, 80)
    made, planned = plan.STATS["made"], plan.STATS["planned"]
    for i, n in enumerate((50, 51, 64, 65)):
        slopes = torch.rand(HQ, generator=g).to(DEVICE)  # a new tensor per call: captured, not traced again
        mod = _alibi(slopes)
        out = flex.flex_attention(q, buf_k[:, :, :n], buf_v[:, :, :n], score_mod=mod, enable_gqa=True)
        o64, _ = _reference(q, buf_k[:, :, :n], buf_v[:, :, :n], mod, torch.float64)
        o32, _ = _reference(q, buf_k[:, :, :n], buf_v[:, :, :n], mod, torch.float32)
        assert_scaled_close(out, o64, o32, what=f"alibi S={n}")
    assert plan.STATS["made"] == made + 1 and plan.STATS["planned"] == planned + 3


def test_another_class_gets_its_own_plan(monkeypatch):
    """fp16, max_scores asked, a kernel_options block, another scale, TF32 on for fp32: each a class
    of its own, made by its first call and launched by its second, each call right against float64
    (a plan of one class never launches another's constexprs)."""
    from attend.kernels import launch

    precisions, run = [], launch.flex_forward_run
    monkeypatch.setattr(launch, "flex_forward_run",
                        lambda p, *a: precisions.append(p.flags["DOT_PRECISION"]) or run(p, *a))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, HQ, 1, E, generator=g).to(DEVICE)
    k, v = _cache(g, 45), _cache(g, 45)
    mod = _softcap(3.0)
    row_max = lambda a, b: mod(a @ b.repeat_interleave(2, 1).transpose(-1, -2) / E ** 0.5, 0, 0, 0, 0).amax(-1)
    half = [t.half() for t in (q, k, v)]

    def plain():
        return flex.flex_attention(q, k, v, score_mod=mod, enable_gqa=True, return_aux=flex.AuxRequest(lse=True))

    def fp16():
        return flex.flex_attention(*half, score_mod=mod, enable_gqa=True, return_aux=flex.AuxRequest(lse=True))

    def with_max():
        return flex.flex_attention(q, k, v, score_mod=mod, enable_gqa=True,
                                   return_aux=flex.AuxRequest(lse=True, max_scores=True))

    def options_block():
        with kernel_options(flex_fast_tanh=False):
            return plain()

    def scaled():
        return flex.flex_attention(q, k, v, score_mod=mod, scale=0.3, enable_gqa=True,
                                   return_aux=flex.AuxRequest(lse=True))

    allow = torch.backends.cuda.matmul.allow_tf32

    def tf32():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return plain()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow

    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, call in (("plain", plain), ("fp16", fp16), ("max_scores", with_max), ("options", options_block),
                           ("scale", scaled), ("tf32", tf32), ("plain again", plain)):
            made, planned = plan.STATS["made"], plan.STATS["planned"]
            for i in range(2):
                out, aux = call()
                inputs = half if name == "fp16" else (q * 0.3 * E ** 0.5, k, v) if name == "scale" else (q, k, v)
                _check(out, aux.lse, *inputs, mod, f"{name} call {i}", tf32=name == "tf32" and out.is_cuda)
                if name == "max_scores":
                    assert_scaled_close(aux.max_scores, row_max(q.double(), k.double()), row_max(q, k),
                                        what=f"max_scores call {i}")
            again = name == "plain again"
            assert plan.STATS["made"] == made + (not again), name
            assert plan.STATS["planned"] == planned + 1 + again, name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    # every launch's dots (the full path's first call of a class, then the plan's): fp32 in IEEE but with
    # TF32 on, planned calls included; fp16 takes "tf32" (tensor cores) always
    want = ["ieee"] * 2 + ["tf32"] * 2 + ["ieee"] * 6 + ["tf32"] * 2 + ["ieee"] * 2
    assert precisions == want, precisions


def test_calls_a_plan_must_not_serve_take_the_full_path():
    """Inputs or captures that need a gradient (the backward must see the call), plans turned off, a
    block_mask, and invalid arguments of a planned class's shapes (they raise the full path's
    errors)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, HQ, 1, E, generator=g).to(DEVICE)
    k, v = _cache(g, 40), _cache(g, 40)
    mod = _softcap(2.5)
    for _ in range(2):
        flex.flex_attention(q, k, v, score_mod=mod, enable_gqa=True)
    planned = plan.STATS["planned"]
    qg = q.clone().requires_grad_()
    out = flex.flex_attention(qg, k, v, score_mod=mod, enable_gqa=True)
    (dq,) = torch.autograd.grad(out.sum(), qg)
    q64 = q.double().requires_grad_()
    (dq64,) = torch.autograd.grad(_reference(q64, k, v, mod, torch.float64)[0].sum(), q64)
    q32 = q.clone().requires_grad_()
    (dq32,) = torch.autograd.grad(_reference(q32, k, v, mod, torch.float32)[0].sum(), q32)
    assert_scaled_close(dq, dq64, dq32, k=6.0, what="dq")
    slopes = torch.rand(HQ, generator=g).to(DEVICE).requires_grad_()  # a capture that needs a gradient
    out = flex.flex_attention(q, k, v, score_mod=_alibi(slopes), enable_gqa=True)
    flex.flex_attention(q, k, v, score_mod=_alibi(slopes), enable_gqa=True)  # its class has no plan
    (ds,) = torch.autograd.grad(out.sum(), slopes)
    refs = []
    for dt in (torch.float64, torch.float32):
        s_ = slopes.detach().to(dt).requires_grad_()
        refs.append(torch.autograd.grad(_reference(q, k, v, _alibi(s_), dt)[0].sum(), s_)[0])
    assert_scaled_close(ds, *refs, k=6.0, what="the captured slopes' gradient")
    with kernel_options(flex_plans=False):
        for i in range(2):
            out, lse = flex.flex_attention(q, k, v, score_mod=mod, enable_gqa=True, return_lse=True)
            _check(out, lse, q, k, v, mod, f"flex_plans off, call {i}")
    bm = flex.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, None, None, 1, 40, device=DEVICE,
                                BLOCK_SIZE=16)
    flex.flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True)
    assert plan.STATS["planned"] == planned
    with pytest.raises(ValueError, match="must share a dtype"):
        flex.flex_attention(q, k.half(), v, score_mod=mod, enable_gqa=True)
    with pytest.raises(ValueError, match="must agree in batch, heads and length"):
        flex.flex_attention(q, k, v[:, :, :-1], score_mod=mod, enable_gqa=True)
    with pytest.raises(ValueError, match="return_lse or return_aux"):
        flex.flex_attention(q, k, v, score_mod=mod, enable_gqa=True, return_lse=True,
                            return_aux=flex.AuxRequest(lse=True))
    with pytest.raises(ValueError, match="finite"):
        flex.flex_attention(q, k, v, score_mod=mod, scale=float("inf"), enable_gqa=True)
    assert plan.STATS["planned"] == planned


def test_explain_says_where_a_plan_serves():
    """explain notes a decode plan for the calls a plan serves, and for none else (a block_mask,
    plans turned off)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, HQ, 1, E, generator=g).to(DEVICE)
    k, v = _cache(g, 30), _cache(g, 30)
    mod = _softcap(2.0)
    route = flex.explain(q, k, v, score_mod=mod, enable_gqa=True)
    assert route.forward == "band_hooks" and any("decode plan" in n for n in route.notes), str(route)
    bm = flex.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, None, None, 1, 30, device=DEVICE,
                                BLOCK_SIZE=16)
    assert not any("decode plan" in n for n in flex.explain(q, k, v, score_mod=mod, block_mask=bm,
                                                            enable_gqa=True).notes)
    with kernel_options(flex_plans=False):
        assert not any("decode plan" in n for n in flex.explain(q, k, v, score_mod=mod, enable_gqa=True).notes)

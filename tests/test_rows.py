"""A model's row views: (B, H, L, D) views of (B, L, H, D) projections, as every transformers model
hands them to SDPA. The Triton launchers return out / lse and the gradients in the model's layout,
and run such calls as B packed sequences of one length where the Gluon kernels serve them
(``KernelOptions.rows_packed``: forced on here, the core's packed mode runs them under the
interpreter; on an sm_90 GPU the default takes the Gluon kernels)."""

from __future__ import annotations

import pytest
import torch

import attend
from attend import SDPBackend, sdpa_kernel
from attend._layout import Band, is_rows, rows_call
from attend.kernels import launch
from attend.kernels.options import kernel_options
from attend.ops import attention as fused_ops
from attend.ops import fused_attention

from conftest import DEVICE, assert_matches_float64, assert_scaled_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rows(B, L, H, D, dtype=torch.float32):
    """A (B, H, L, D) view of a fresh (B, L, H, D) tensor that requires grad (a model's projection)."""
    base = torch.randn(B, L, H, D, dtype=dtype, device=DEVICE, requires_grad=True)
    return base.transpose(1, 2)


@pytest.fixture
def spy(monkeypatch):
    """The ``packed`` argument of every launch._forward / _backward call, in order."""
    seen = []
    for name in ("_forward", "_backward"):
        real = getattr(launch, name)

        def wrapped(*args, _real=real, _name=name, **kw):
            seen.append((_name, args[17] if _name == "_forward" else args[22]))
            return _real(*args, **kw)
        monkeypatch.setattr(launch, name, wrapped)
    return seen


CASES = {  # name: (B, L, S, H, Hkv, SDPA keyword arguments)
    "full": (2, 24, 24, 4, 4, {}),
    "causal": (2, 40, 40, 4, 4, {"is_causal": True}),
    "gqa-causal": (3, 33, 33, 4, 2, {"is_causal": True, "enable_gqa": True}),
    "cross": (2, 17, 29, 2, 2, {}),
    # q a row view, K / V contiguous (B, Hkv, S, D), as a transformers DynamicCache hands them over
    "kv-cache": (2, 19, 19, 4, 2, {"is_causal": True, "enable_gqa": True}),
}


def _kv(B, S, Hkv, D, case):
    t = torch.randn(B, Hkv, S, D, device=DEVICE, requires_grad=True) if case == "kv-cache" else rows(B, S, Hkv, D)
    return t


@pytest.mark.parametrize("packed", [True, False, None], ids=["packed", "dense", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_row_views_match_float64_in_the_models_layout(case, packed, spy):
    B, L, S, H, Hkv, kw = CASES[case]
    D = 16
    q, k, v = rows(B, L, H, D), _kv(B, S, Hkv, D, case), _kv(B, S, Hkv, D, case)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), kernel_options(rows_packed=packed):
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
        assert is_rows(out), f"out strides {out.stride()}: not the model's (B, L, H, D) layout"
        grads = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
        for name, t, g in zip("qkv", (q, k, v), grads):
            assert g.stride() == t.stride(), f"d{name} strides {g.stride()} != {name}'s {t.stride()}"
        assert_matches_float64(out, q, k, v, what=case, **kw)
    with kernel_options(rows_packed=packed):  # auto: packed where the Gluon kernels serve it
        band = Band.causal() if kw.get("is_causal") else Band()
        want = {"_forward": launch.rows_forward_route(q, k, v, band) == "packed",
                "_backward": launch._rows_packed(launch.resolve(None), q, k, v, q) is not None}
    assert spy and all((p is not None) == want[name] for name, p in spy), (packed, want, spy)
    if packed is not None:  # forced: packed exactly where K / V are rows too
        assert all(want.values()) == (packed and case != "kv-cache")


def test_bottom_right_causal_rows_match_float64():
    """A chunked prefill's band (L < S, the last query and key aligned) through CausalBias."""
    B, L, S, H, D = 2, 12, 37, 4, 16
    q, k, v = rows(B, L, H, D), rows(B, S, H, D), rows(B, S, H, D)
    bias = attend.bias.causal_lower_right(L, S)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), kernel_options(rows_packed=True):
        out = attend.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        assert is_rows(out)
        assert_matches_float64(out, q, k, v, attn_mask=bias)


def _reference_with_lse(q, k, v, causal: bool):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse, (q, k, v)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_launcher_lse_and_its_gradient_in_the_rows_layout(packed):
    """launch.forward / backward on row views: the LSE comes back as (B, H, L) over (H, B, L)
    storage (the packed launchers' (H, T) rows), and a gradient into it (a sink's, a merge's)
    flows through the backward whatever the gradient's own layout."""
    B, L, H, D = 2, 21, 3, 16
    q, k, v = (rows(B, L, H, D).detach() for _ in range(3))
    with kernel_options(rows_packed=packed):
        out, lse = launch.forward(q, k, v, None, 0.0, attend._layout.Band.causal(), D ** -0.5, 0)
        assert is_rows(out) and lse.permute(1, 0, 2).is_contiguous()
        dout = torch.randn_like(out)
        dlse = torch.randn(B, H, L, device=DEVICE)  # contiguous, unlike the lse
        dq, dk, dv, _ = launch.backward(dout, q, k, v, out, lse, None, 0.0, attend._layout.Band.causal(), D ** -0.5,
                                        0, False, dlse=dlse)
    ref, ref_lse, leaves = _reference_with_lse(q, k, v, causal=True)
    refs = torch.autograd.grad((ref * dout.double()).sum() + (ref_lse * dlse.double()).sum(), leaves)
    same, same_lse, same_leaves = _reference_with_lse(q.float(), k.float(), v.float(), causal=True)
    assert_scaled_close(out, ref, same.detach().to(out.dtype), what="out")
    assert_scaled_close(lse, ref_lse, same_lse.detach().float(), what="lse")
    for name, g, r in zip("qkv", (dq, dk, dv), refs):
        assert g.stride() == q.stride(), f"d{name} not in the rows layout: {g.stride()}"
        assert_scaled_close(g, r, r.float(), k=1.0, what=f"d{name}")


def test_only_model_layouts_without_mask_or_dropout_are_row_calls():
    B, L, H, D = 2, 8, 4, 16
    q = rows(B, L, H, D)
    assert rows_call(q, q, q, None, 0.0)
    assert not rows_call(q, q, q, torch.zeros(L, L, device=DEVICE), 0.0)
    assert not rows_call(q, q, q, None, 0.1)
    contiguous = torch.randn(B, H, L, D, device=DEVICE)
    assert not rows_call(contiguous, contiguous, contiguous, None, 0.0)
    one_head = rows(B, L, 1, D)  # both layouts at once: stays a plain dense call
    assert not rows_call(one_head, one_head, one_head, None, 0.0)
    sliced = rows(B, 2 * L, H, D)[:, :, :L]  # not one tensor's rows
    assert not rows_call(sliced, sliced, sliced, None, 0.0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_fused_ops_on_row_views_pass_opcheck(packed):
    """The ops' fake implementations promise the layouts the launchers return (torch.compile
    plans the model's reshapes after attention on them)."""
    B, L, H, D = 2, 9, 2, 16
    q, k, v = (rows(B, L, H, D).detach().requires_grad_() for _ in range(3))
    causal = attend._layout.Band.causal().to_op()
    with kernel_options(rows_packed=packed):
        torch.library.opcheck(fused_ops.fused_fwd, (q, k, v, None, 0.0, causal, 0.25, None, "triton"))
        out, lse = fused_ops.fused_fwd(q, k, v, None, 0.0, causal, 0.25, None, "triton")
        dout = torch.randn(B, L, H, D, device=DEVICE).transpose(1, 2)
        torch.library.opcheck(fused_ops.fused_bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                    lse.detach(), None, 0.0, causal, 0.25, None, "triton", False))


def test_compiled_model_attention_on_row_views_matches_eager():
    """A model's attention block (projections viewed as rows, SDPA, the transpose back and the
    output projection) under torch.compile(fullgraph=True) equals eager, gradients included."""
    B, L, H, D = 2, 16, 2, 16
    x = torch.randn(B, L, H * D, device=DEVICE)
    w_qkv = torch.randn(H * D, 3 * H * D, device=DEVICE, requires_grad=True)
    w_o = torch.randn(H * D, H * D, device=DEVICE, requires_grad=True)

    def block(x, w_qkv, w_o):
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (x @ w_qkv).split(H * D, dim=-1))
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(B, L, H * D) @ w_o

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), kernel_options(rows_packed=True):
        eager = block(x, w_qkv, w_o)
        g_eager = torch.autograd.grad(eager.square().sum(), (w_qkv, w_o))
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, w_qkv, w_o)
        g_compiled = torch.autograd.grad(compiled.square().sum(), (w_qkv, w_o))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="the Gluon kernels run on an sm_90 GPU")
@pytest.mark.parametrize("kw,S", [({}, 700), ({"is_causal": True}, 700), ({"is_causal": True, "enable_gqa": True}, 700),
                                  ({}, 512), ({"enable_gqa": True}, 384)],
                         ids=["full", "causal", "gqa-causal", "whole-key-blocks", "cross-gqa"])
@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-programs", "fused-dq"])
def test_gluon_kernels_serve_row_views(kw, S, fused_dq, spy):
    """On an sm_90 GPU the default options run a model's bf16 D=128 row views through the Gluon
    forward and dK / dV kernels as packed sequences of one length (VARLEN = UNIFORM; the dK / dV
    kernel from any length here, and the causal forward too: under 2048 queries it otherwise stays
    strided, which test_short_causal_forward_of_row_views_stays_strided checks). Keys in whole
    blocks (S = 512) run the forward without its edge masks; cross attention has L != S. ``fused_dq``:
    KernelOptions.bwd_ws_fused_dq (dQ added by the dK / dV kernel into rows laid out as q's)."""
    B, L, H, D = 2, 700, 4, 128
    Hkv = 2 if kw.get("enable_gqa") else H
    q, k, v = rows(B, L, H, D, torch.bfloat16), rows(B, S, Hkv, D, torch.bfloat16), rows(B, S, Hkv, D, torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), kernel_options(bwd_ws_min_seq_bucket=0, rows_packed_causal_fwd_min_l=0,
                                                                 bwd_ws_fused_dq=fused_dq):
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
        assert is_rows(out)
        assert_matches_float64(out, q, k, v, what="gluon rows", **kw)
        plan = launch.explain_backward(q, k, v, band=Band.causal() if kw.get("is_causal") else Band())
    if launch._gluon_device(q):
        assert spy and all(p is not None for _, p in spy), spy
        assert plan.gluon and (plan.dq == "fused") == fused_dq, str(plan)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_row_call_captured_in_a_cuda_graph():
    """Offsets first made while a CUDA graph is captured exist only in its replays: they are not
    cached for later eager calls, and the replay computes what an eager call does."""
    B, L, H, D = 2, 256, 4, 128
    q, k, v = (rows(B, L, H, D, torch.bfloat16).detach() for _ in range(3))

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), kernel_options(rows_packed=True):
            return attend.scaled_dot_product_attention(q, k, v, is_causal=True)

    eager = call()  # compiles the kernels outside the capture
    launch._uniform.cache_clear()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        captured = call()
    torch.cuda.current_stream().wait_stream(side)
    assert launch._uniform.cache_info().currsize == 0, "offsets made during the capture were cached"
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    torch.testing.assert_close(call(), eager, rtol=0, atol=0)


def _view(B, L, H, D, dtype=torch.float32):
    """A (B, H, L, D) view of a fresh (B, L, H, D) tensor, not requiring grad."""
    return torch.randn(B, L, H, D, dtype=dtype, device=DEVICE).transpose(1, 2)


def _reference_lse(q, k, v, scale: float, dtype=torch.float64):
    """Causal out and lse in ``dtype`` (float64: the oracle; the inputs' own: the yardstick), with
    the leaves they were computed from."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1), (q, k, v)


def test_packed_backward_reads_a_batch_slice_of_the_lse():
    """launch.backward promises any lse layout works (odd ones are copied). The first half of a
    call's batch, backpropagated from slices of its q / k / v / out / lse (micro-batching, a
    pipeline stage): the lse slice's (H, T) view has row stride 2T, read as T when packed."""
    B2, L, H, D = 4, 8, 3, 16
    scale = D ** -0.5
    q, k, v = (_view(B2, L, H, D) for _ in range(3))
    B = B2 // 2
    with kernel_options(rows_packed=True):
        out, lse = launch.forward(q, k, v, None, 0.0, Band.causal(), scale, 0)
        dout = torch.randn_like(out)
        dq, dk, dv, _ = launch.backward(dout[:B], q[:B], k[:B], v[:B], out[:B], lse[:B], None, 0.0, Band.causal(),
                                        scale, 0, False)
    ref, _, leaves = _reference_lse(q[:B], k[:B], v[:B], scale)
    refs = torch.autograd.grad(ref, leaves, dout[:B].double())
    same, _, same_leaves = _reference_lse(q[:B], k[:B], v[:B], scale, torch.float32)
    sames = torch.autograd.grad(same, same_leaves, dout[:B])
    for name, g, r, s in zip("qkv", (dq, dk, dv), refs, sames):
        assert_scaled_close(g, r, s, k=6.0, what=f"d{name}")


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_in_place_op_on_the_output_of_row_views(packed):
    """attend's output takes in-place ops as PyTorch's SDPA output does (and attend's own for
    contiguous inputs): a model scaling or masking it in place outside torch.no_grad."""
    B, L, H, D = 2, 9, 2, 16
    q, k, v = (_view(B, L, H, D).requires_grad_() for _ in range(3))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), kernel_options(rows_packed=packed):
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = 2.0 * out.detach().clone()
    out.mul_(2.0)  # a view returned by the op would refuse this
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)


def test_offsets_cached_under_inference_mode_serve_later_calls():
    B, L, H, D = 2, 11, 2, 16  # a shape no other test caches
    launch._uniform.cache_clear()
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), kernel_options(rows_packed=True, varlen_worklist=True):
        with torch.inference_mode():
            attend.scaled_dot_product_attention(*(_view(B, L, H, D) for _ in range(3)), is_causal=True)
        q, k, v = (_view(B, L, H, D).requires_grad_() for _ in range(3))
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_matches_float64(out, q, k, v, what="after an inference-mode call", is_causal=True)


def test_rows_auto_expectation_on_an_sm90_device(monkeypatch, spy):
    """What test_row_views_match_float64_in_the_models_layout does on an sm_90 GPU,
    simulated: _gluon_device says yes, the eligibility checks run as they would there."""
    monkeypatch.setattr(launch, "_gluon_device", lambda t: True)
    test_row_views_match_float64_in_the_models_layout("full", None, spy)


@pytest.mark.parametrize("layout", ["rows", "contiguous"])
def test_gradient_through_the_lse_of_the_fused_op(layout):
    B, L, H, D = 2, 8, 3, 16
    scale = D ** -0.5
    make = rows if layout == "rows" else (lambda B, L, H, D: torch.randn(B, H, L, D, device=DEVICE))
    q, k, v = (make(B, L, H, D).requires_grad_() for _ in range(3))
    out, lse = fused_attention(q, k, v, None, 0.0, Band.causal(), scale, "triton")
    assert lse.requires_grad
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad(lse, (q, k), dlse)
    _, ref_lse, leaves = _reference_lse(q, k, v, scale)
    refs = torch.autograd.grad(ref_lse, leaves[:2], dlse.double())
    _, same_lse, same_leaves = _reference_lse(q, k, v, scale, torch.float32)
    sames = torch.autograd.grad(same_lse, same_leaves[:2], dlse)
    for name, g, r, s in zip("qk", grads, refs, sames):
        assert_scaled_close(g, r, s, k=6.0, what=f"d{name} from the lse")


def test_explain_names_the_row_layout_of_a_five_dim_call(monkeypatch):
    """A (N, B, H, L, D) view of (N, B, L, H, D) projections runs as a row call (to_4d merges N
    and B into one batch dim); explain says so as it does for the 4-D call."""
    q = torch.randn(1, 2, 8, 3, 16, device=DEVICE).transpose(2, 3)
    seen = []
    real = launch.forward

    def spy(q, k, v, mask, dropout_p, *args, **kw):
        seen.append(attend._layout.rows_call(q, k, v, mask, dropout_p))
        return real(q, k, v, mask, dropout_p, *args, **kw)
    monkeypatch.setattr(launch, "forward", spy)
    from attend.ops import registry
    monkeypatch.setitem(registry.KERNELS, registry.Kernel.TRITON,
                        registry.Launchers(spy, launch.backward, launch.varlen_forward, launch.varlen_backward))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        attend.scaled_dot_product_attention(q, q, q)
        decision = attend.explain(q, q, q)
    assert seen == [True], seen  # the launchers did get a row call
    assert any(line.startswith("layout:") for line in str(decision).splitlines()), str(decision)


def test_launchers_refuse_a_value_head_dim_of_its_own_and_take_empty_heads():
    """Direct callers of the launchers (SDPA refuses these earlier): a clear error, not a crash in
    the kernel; no heads give empty outputs."""
    q = _view(2, 8, 2, 16)
    v = _view(2, 8, 2, 8)
    with pytest.raises(ValueError, match="one head dim.*16, 16 and 8"):
        launch.forward(q, q, v, None, 0.0, Band(), 0.25, 0)
    with pytest.raises(ValueError, match="one head dim"):
        launch.backward(q, q, q, v, q, torch.zeros(2, 2, 8, device=DEVICE), None, 0.0, Band(), 0.25, 0, False)
    none = torch.randn(2, 0, 8, 16, device=DEVICE)
    out, lse = launch.forward(none, none, none, None, 0.0, Band(), 0.25, 0)
    assert out.shape == (2, 0, 8, 16) and lse.shape == (2, 0, 8)


QROWS_CASES = {  # name: (B, L, S, Hkv, dtype, SDPA keyword arguments, kernel options)
    "causal": (2, 700, 700, 4, torch.bfloat16, {"is_causal": True}, {}),
    "gqa": (2, 700, 700, 2, torch.bfloat16, {"is_causal": True, "enable_gqa": True}, {}),
    "full-640": (2, 640, 640, 4, torch.bfloat16, {}, {}),  # a multiple of 64, not of 128
    "cross": (2, 300, 700, 4, torch.bfloat16, {}, {}),
    "one-sequence-fp16": (1, 513, 513, 4, torch.float16, {"is_causal": True}, {}),
    "store-from-registers": (2, 700, 700, 4, torch.bfloat16, {"is_causal": True}, {"o_tma": False}),
}


@pytest.mark.skipif(DEVICE != "cuda", reason="the Gluon kernels run on an sm_90 GPU")
@pytest.mark.parametrize("case", sorted(QROWS_CASES))
def test_gluon_kernels_read_row_queries_beside_a_kv_cache(case, monkeypatch):
    """KernelOptions.rows_q_gluon: a row-view q with contiguous K / V (a KV cache's) through the
    Gluon forward and dK / dV kernels' Q_ROWS mode, against float64."""
    from attend.kernels import versions

    ran = []
    real = versions.run_experimental

    def spy(name, *args, **kw_):
        ok = real(name, *args, **kw_)
        ran.append((name, ok))
        return ok
    monkeypatch.setattr(versions, "run_experimental", spy)
    B, L, S, Hkv, dtype, kw, opts = QROWS_CASES[case]
    H, D = 4, 128
    q = rows(B, L, H, D, dtype)
    k, v = (torch.randn(B, Hkv, S, D, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), kernel_options(rows_q_gluon=True, bwd_ws_min_seq_bucket=0, **opts):
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
        assert is_rows(out)
        assert_matches_float64(out, q, k, v, what=f"q rows beside a KV cache, {case}", **kw)
        plan = launch.explain_backward(q, k, v, band=Band.causal() if kw.get("is_causal") else Band())
    if launch._gluon_device(q):
        assert ("gluon_forward", True) in ran, ran
        assert ("gluon_dkdv", True) in ran or not plan.gluon, (ran, str(plan))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_one_sequence_with_its_own_batch_stride_is_a_row_call(packed):
    """B = 1 views whose size-1 batch dim carries another stride (a reshape of one sequence's view
    gives one) are row calls; dq comes back laid out exactly as q, as the op's fake promises."""
    L, H, D = 12, 3, 16
    base = torch.randn(L, H, D, device=DEVICE)
    q = torch.as_strided(base, (1, H, L, D), (H * D, D, H * D, 1)).requires_grad_()
    k, v = (_view(1, L, H, D).requires_grad_() for _ in range(2))
    assert rows_call(q, k, v, None, 0.0)
    causal = Band.causal().to_op()
    with kernel_options(rows_packed=packed):
        torch.library.opcheck(fused_ops.fused_bwd, (_view(1, L, H, D), q.detach(), k.detach(), v.detach(),
                                                    *fused_ops.fused_fwd(q.detach(), k.detach(), v.detach(), None, 0.0,
                                                                         causal, 0.25, None, "triton"),
                                                    None, 0.0, causal, 0.25, None, "triton", False))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
            (dq,) = torch.autograd.grad(out.sum(), (q,), retain_graph=True)
            assert dq.stride() == q.stride()
            assert_matches_float64(out, q, k, v, what="B = 1", is_causal=True)


def test_short_causal_forward_of_row_views_stays_strided(monkeypatch):
    """Where the Gluon kernels serve row views (forced here, as on an sm_90 device), a causal
    forward of fewer than ROWS_PACKED_CAUSAL_FWD_MIN_L queries runs as the core's strided call and
    every other row call, its backward included, as packed sequences."""
    from attend.kernels import configs, ws, ws_bwd

    monkeypatch.setattr(launch, "_gluon_device", lambda t: True)
    monkeypatch.setattr(launch.versions, "usable", lambda name: True)
    monkeypatch.setattr(ws, "eligible", lambda *a, **kw: a[7] is not None)  # packed calls (K / V here are rows)
    monkeypatch.setattr(ws_bwd, "eligible", lambda *a, **kw: True)
    short, long = configs.ROWS_PACKED_CAUSAL_FWD_MIN_L - 1, configs.ROWS_PACKED_CAUSAL_FWD_MIN_L
    for L in (short, long):
        q, k, v = (rows(1, L, 2, 128) for _ in range(3))
        causal = launch.rows_forward_route(q, k, v, Band.causal())
        assert causal == ("core" if L == short else "packed"), (L, causal)
        assert launch.rows_forward_route(q, k, v, Band()) == "packed", L
        assert launch.rows_forward_route(q, k, v, Band(8, 0)) == "packed", L  # a window keeps packing
        with kernel_options(bwd_ws_min_seq_bucket=0):
            assert launch._rows_packed(launch.resolve(None), q, k, v, q) is not None, L

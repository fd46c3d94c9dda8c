"""KernelOptions.rows_q_gluon's host side on the CPU: what the launchers would hand the Gluon
forward and dK / dV kernels (Q_ROWS) for a row-view q beside contiguous K / V (a KV cache's),
seen through a recorder in place of the kernels' launchers (the kernels themselves run on an
sm_90 GPU only: tests/test_rows.py's GPU case)."""

from __future__ import annotations

import pytest
import torch

import attend
from attend._layout import Band, Packed, is_rows, rows_call
from attend.kernels import launch, versions, ws, ws_bwd, ws_common
from attend.kernels.options import kernel_options

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the host side on CPU tensors, under Triton's "
                                 "interpreter; on a GPU tests/test_rows.py runs the kernels themselves")]

D = 128  # the Gluon kernels' one head dim


@pytest.fixture
def gluon(monkeypatch):
    """Launches the Gluon kernels would make, as (kernel, grid, args, constexprs): the device taken
    for an sm_90 GPU with Gluon usable, the launches recorded (the forward's out zeroed and lse set
    to 0 so later steps read finite values) instead of run."""
    seen = []

    def recorder(name):
        def launch_(grid, args, constexprs, num_warps, num_stages):
            seen.append((name, grid, args, constexprs))
            if name == "fwd":
                args["out_ptr"].zero_()
                args["lse_ptr"].zero_()
        return launch_
    monkeypatch.setattr(launch, "_gluon_device", lambda t: True)
    monkeypatch.setattr(versions, "usable", lambda name: True)
    monkeypatch.setattr(launch, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(ws_common, "sm_count", lambda index: 132)
    monkeypatch.setattr(ws, "_LAUNCH", recorder("fwd"))
    monkeypatch.setattr(ws_bwd, "_LAUNCH", recorder("bwd"))
    return seen


def _rows(B, L, H):
    return torch.randn(B, L, H, D, dtype=torch.float16).transpose(1, 2)


def test_q_rows_launches_address_the_models_rows_and_a_dense_kv_cache(gluon):
    """Q / O / dO as (B * L, H * D) rows, LSE over (H, B, L) storage (stride_lseh = B * L), K / V /
    dK / dV dense (B * Hkv * S, D), GQA group G = H / Hkv, Q_ROWS on in both kernels."""
    B, L, S, H, Hkv = 2, 100, 300, 4, 2
    q = _rows(B, L, H)
    k, v = (torch.randn(B, Hkv, S, D, dtype=torch.float16) for _ in range(2))
    with kernel_options(rows_q_gluon=True, bwd_ws_min_seq_bucket=0):
        out, lse = launch.forward(q, k, v, None, 0.0, Band.causal(), 0.1, 0)
        launch.backward(torch.randn_like(out), q, k, v, out, lse, None, 0.0, Band.causal(), 0.1, 0, False)
    assert [name for name, *_ in gluon] == ["fwd", "bwd"], gluon
    (_, _, fa, fc), (_, _, ba, bc) = gluon
    assert fc["Q_ROWS"] and not fc["VARLEN"] and bc["Q_ROWS"] and not bc["VARLEN"]
    for desc in (fa["q_desc"], fa["o_desc"], ba["q_desc"], ba["do_desc"]):
        assert list(desc.shape) == [B * L, H * D] and list(desc.strides) == [H * D, 1]
    assert fa["out_ptr"].data_ptr() == out.data_ptr() and fa["stride_o"] == H * D
    assert fa["lse_ptr"].data_ptr() == lse.data_ptr() and fa["stride_lseh"] == B * L and lse.stride() == (L, B * L, 1)
    assert list(fa["k_desc"].shape) == list(ba["k_desc"].shape) == [B * Hkv * S, D]
    assert tuple(ba["dk_ptr"].shape) == (B * Hkv * S, D) and ba["stride_dk"] == ba["stride_dv"] == D
    assert fa["G"] == ba["G"] == H // Hkv and fa["L_max"] == ba["L_max"] == L and fa["S_max"] == ba["S_max"] == S


def test_row_views_launch_as_uniform_sequences_and_varlen_as_packed(gluon):
    """A model's q / k / v row views reach both Gluon kernels as packed sequences of one length
    (VARLEN == UNIFORM: offsets b * L_max and b * S_max, none loaded); varlen_attn's packed
    sequences (launch.varlen_forward) as PACKED (offsets read from cu_q / cu_k)."""
    B, L, H, Hkv = 2, 128, 4, 2
    for S, edges in ((256, False), (300, True)):  # whole key blocks: the forward needs no edge masks
        q = _rows(B, L, H)
        k, v = (torch.randn(B, S, Hkv, D, dtype=torch.float16).transpose(1, 2) for _ in range(2))
        with kernel_options(rows_packed=True, bwd_ws_min_seq_bucket=0):
            out, lse = launch.forward(q, k, v, None, 0.0, Band(), 0.1, 0)
            launch.backward(torch.randn_like(out), q, k, v, out, lse, None, 0.0, Band(), 0.1, 0, False)
        assert [name for name, *_ in gluon] == ["fwd", "bwd"], [name for name, *_ in gluon]
        for _, _, args, flags in gluon:
            assert flags["VARLEN"] == ws_common.UNIFORM.value
            assert (args["L_max"], args["S_max"], args["G"]) == (L, S, H // Hkv)
        assert gluon[0][3]["EDGES"] == edges
        gluon.clear()
    cu = torch.tensor([0, 128, 256], dtype=torch.int32)  # one length: the Gluon forward takes it (ws.eligible)
    qp, kp, vp = (torch.randn(256, H, D, dtype=torch.float16) for _ in range(3))
    launch.varlen_forward(qp, kp, vp, Packed(cu, cu), 128, 128, 0.1, Band())
    assert [flags["VARLEN"] for *_, flags in gluon] == [ws_common.PACKED.value]
    assert ws_common.varlen_mode(None) == 0


@pytest.mark.parametrize("B,L,H", [(1, 1, 4), (2, 1, 4), (1, 7, 1), (2, 7, 1), (2, 7, 4), (1, 7, 4)])
def test_the_forwards_q_rows_mode_only_for_row_calls(B, L, H):
    """ws.eligible(q_rows=True) beside ws.forward's own Q_ROWS test: Q_ROWS (model_rows on out and
    lse at h * B * L) only where launch.forward allocated them so (``rows_call``); a row-view q
    that is also contiguous (one head or one row) runs the dense mode on contiguous out / lse."""
    q = _rows(B, L, H)
    k = torch.randn(B, H, 9, D, dtype=torch.float16)
    eligible = ws.eligible(q, k, k, None, (0, 0, 0, 0), False, 0.0, None, L, q_rows=True)
    q_rows_mode = is_rows(q) and not q.is_contiguous()
    assert eligible
    assert q_rows_mode == rows_call(q, k, k, None, 0.0)


def test_a_single_sequence_backward_takes_the_gluon_dkdv_kernel(gluon):
    B, L, H, Hkv = 1, 64, 2, 1
    x = torch.randn(B, L, H * D, dtype=torch.float16, requires_grad=True)
    q = x.view(B, L, H, D).transpose(1, 2)  # a model's projection
    k, v = (torch.randn(B, Hkv, L, D, dtype=torch.float16, requires_grad=True) for _ in range(2))
    with kernel_options(rows_q_gluon=True, bwd_ws_min_seq_bucket=0):
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y = out.transpose(1, 2).reshape(B, L, H * D)
        (y * torch.randn_like(y)).sum().backward()  # a dense gradient (a sum's, expanded, is copied first)
    assert [name for name, *_ in gluon] == ["fwd", "bwd"], [name for name, *_ in gluon]


@pytest.mark.parametrize("layout", ["q_rows", "rows", "dense"])
def test_fused_dq_adds_into_q_rows_and_runs_no_dq_programs(gluon, layout):
    """KernelOptions.bwd_ws_fused_dq: the dK / dV kernel's launch gets FUSED_DQ, a single-buffered K / V
    tile and a descriptor of [64, 64] fp32 boxes over a zeroed dQ whose rows are laid out as Q's (a
    model's (B * L, H * D) rows, or dense (B * H * L, D)); no dQ programs run (the recorded launch
    added nothing: dQ comes back 0). explain names the one kernel. Deterministic mode keeps them."""
    B, L, S, H, Hkv = 2, 100, 300, 4, 2
    q = _rows(B, L, H) if layout != "dense" else torch.randn(B, H, L, D, dtype=torch.float16)
    kv = lambda: (torch.randn(B, S, Hkv, D, dtype=torch.float16).transpose(1, 2) if layout == "rows"
                  else torch.randn(B, Hkv, S, D, dtype=torch.float16))
    k, v = kv(), kv()
    with kernel_options(rows_q_gluon=True, rows_packed=layout == "rows" or None, bwd_ws_min_seq_bucket=0,
                        bwd_ws_fused_dq=True):
        out, lse = launch.forward(q, k, v, None, 0.0, Band.causal(), 0.1, 0)
        dq, dk, dv, _ = launch.backward(torch.randn_like(out), q, k, v, out, lse, None, 0.0, Band.causal(), 0.1,
                                        0, False)
        plan = launch.explain_backward(q, k, v, band=Band.causal())
        torch.use_deterministic_algorithms(True)
        try:
            deterministic = launch.explain_backward(q, k, v, band=Band.causal())
        finally:
            torch.use_deterministic_algorithms(False)
    (_, _, args, flags), = [g for g in gluon if g[0] == "bwd"]
    assert flags["FUSED_DQ"] and flags["KBUFS"] == ws_bwd.FUSED_KBUFS == 1
    rows = [B * L, H * D] if layout != "dense" else [B * H * L, D]
    desc = args["dq_desc"]
    assert list(desc.shape) == rows and desc.base.dtype == torch.float32 and list(desc.block_shape) == [64, D // 2]
    assert torch.equal(dq, torch.zeros_like(dq)) and dq.dtype == q.dtype, "a dQ program ran"
    assert plan.dq == "fused" and plan.kernels()[-1] == "ws_bwd.attn_bwd_dkdv_ws (dK, dV and dQ)", plan
    assert deterministic.dq == "programs" and deterministic.gluon, deterministic


def test_explain_names_the_kernels_a_kv_cache_call_runs(gluon):
    q = _rows(2, 300, 4)
    k = torch.randn(2, 2, 300, D, dtype=torch.float16)
    with kernel_options(rows_q_gluon=True, bwd_ws_min_seq_bucket=0):
        text = str(attend.explain(q, k, k, is_causal=True, enable_gqa=True))
    assert "ws_bwd.attn_bwd_dkdv_ws" in text  # the backward plan does name the Gluon kernel
    assert "strided dense calls of the core" not in text, text


def _cache(B, Hkv, S, d):
    """K or V as a transformers DynamicCache hands them over: the past and the new keys concatenated."""
    return torch.cat([torch.randn(B, Hkv, S - 3, d), torch.randn(B, Hkv, 3, d)], -2).requires_grad_()


KV_CACHE_CASES = {  # name: (B, L, S, H, Hkv, kv-cache K, SDPA keyword arguments (a callable for the bias))
    "cross": (2, 7, 23, 4, 4, True, {}),
    "chunked-prefill": (2, 6, 21, 4, 2, True, {"enable_gqa": True, "attn_mask": "bottom_right"}),
    "one-sequence": (1, 13, 13, 4, 4, True, {"is_causal": True}),
    "mqa": (2, 11, 11, 4, 1, True, {"is_causal": True, "enable_gqa": True}),
    "k-rows-v-cache": (2, 11, 11, 4, 4, False, {"is_causal": True}),
}


@pytest.mark.parametrize("case", sorted(KV_CACHE_CASES))
def test_row_queries_beside_kv_caches_match_float64(case):
    """The generalized rows_call (q a row view; k / v a KV cache's contiguous tensors, or one of
    them a row view) on the launchers' route here, in the model's layout, against float64."""
    from conftest import DEVICE, assert_matches_float64

    if DEVICE != "cpu":
        pytest.skip("the CPU's core route; tests/test_rows.py's GPU case runs the Gluon kernels")
    B, L, S, H, Hkv, cache_k, kw = KV_CACHE_CASES[case]
    d = 16
    kw = dict(kw)
    if kw.get("attn_mask") == "bottom_right":
        kw["attn_mask"] = attend.bias.causal_lower_right(L, S)
    q = torch.randn(B, L, H, d, requires_grad=True).transpose(1, 2)
    k = _cache(B, Hkv, S, d) if cache_k else torch.randn(B, S, Hkv, d, requires_grad=True).transpose(1, 2)
    v = _cache(B, Hkv, S, d)
    assert rows_call(q, k, v, None, 0.0)
    with attend.sdpa_kernel(attend.SDPBackend.EFFICIENT_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
        grads = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
        assert B == 1 or is_rows(out), out.stride()
        for name, t, g in zip("qkv", (q, k, v), grads):
            assert g.stride() == t.stride(), f"d{name} strides {g.stride()} != {name}'s {t.stride()}"
        assert_matches_float64(out, q, k, v, what=case, **kw)


@pytest.mark.parametrize("packed", [None, True], ids=["auto", "forced"])
def test_fused_ops_beside_a_kv_cache_pass_opcheck(packed):
    """The ops' fakes promise the row layouts the launchers now return for a row-view q beside a
    KV cache's contiguous K / V (the packed route refused even when forced)."""
    from attend.ops import attention as fused_ops
    from conftest import DEVICE

    B, L, S, H, Hkv, d = 2, 9, 13, 4, 2, 16
    q = torch.randn(B, L, H, d, device=DEVICE).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, Hkv, S, d, device=DEVICE, requires_grad=True) for _ in range(2))
    causal = Band.causal().to_op()
    with kernel_options(rows_packed=packed):
        torch.library.opcheck(fused_ops.fused_fwd, (q, k, v, None, 0.0, causal, 0.25, None, "triton"))
        out, lse = fused_ops.fused_fwd(q, k, v, None, 0.0, causal, 0.25, None, "triton")
        assert is_rows(out) and lse.stride() == (L, B * L, 1)
        dout = torch.randn(B, L, H, d, device=DEVICE).transpose(1, 2)
        torch.library.opcheck(fused_ops.fused_bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                    lse.detach(), None, 0.0, causal, 0.25, None, "triton", False))

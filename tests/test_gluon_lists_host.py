"""KernelOptions.flex_gluon_lists' host side on the CPU: what flex's dispatch hands the Gluon forward
and dK / dV kernels (their LISTS mode) for a BlockMask's lists, seen through recorders in place of
the kernels' launchers (the kernels run on an sm_90 GPU only: tests/test_flex_band.py's
``test_block_mask_lists_on_the_gluon_kernels``)."""

from __future__ import annotations

import pytest
import torch

import attend.flex_attention as flex
from attend._flex import dispatch
from attend.kernels import launch, versions, ws, ws_bwd, ws_common
from attend.kernels.options import kernel_options

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the host side on CPU tensors, under Triton's "
                                 "interpreter; on a GPU tests/test_flex_band.py runs the kernels themselves")]

L, H, D = 256, 2, 128


@pytest.fixture
def recorded(monkeypatch):
    """Launches of the two Gluon kernels as (kernel, args, constexprs), the device taken for an
    sm_90 GPU with Gluon usable; the forward's out and lse set to 0 so the backward reads finite
    values."""
    if launch.ws is None:
        pytest.skip(f"Gluon is unusable on this Triton: {versions.GLUON_ERROR}")
    seen = []

    def recorder(name):
        def launch_(grid, args, constexprs, num_warps, num_stages):
            seen.append((name, args, constexprs))
            if name == "fwd":
                args["out_ptr"].zero_()
                args["lse_ptr"].zero_()
        return launch_

    monkeypatch.setattr(launch, "_gluon_device", lambda t: True)
    monkeypatch.setattr(versions, "_failed", {})
    monkeypatch.setattr(launch, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(ws_common, "sm_count", lambda index: 4)
    monkeypatch.setattr(ws, "_LAUNCH", recorder("fwd"))
    monkeypatch.setattr(ws_bwd, "_LAUNCH", recorder("bwd"))
    return seen


@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-programs", "fused-dq"])
def test_lists_reach_both_gluon_kernels_with_their_lists_and_mask_mod(recorded, fused_dq):
    """A document mask (ids captured) with a softcap: the forward gets LISTS with the key-side lists
    and the mask_mod's hook and capture, the dK / dV kernel the query-side lists (one row per key
    block) and the same hook, FUSED_DQ as asked; explain names both routes; with the fused dQ no dQ
    program runs (the recorded launch added nothing: dQ comes back 0)."""
    doc = torch.arange(L) // 100
    bm = flex.create_block_mask(lambda b, h, q, kv: doc[q] == doc[kv], None, None, L, L, device="cpu")
    softcap = lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)  # noqa: E731
    q, k, v = (torch.randn(1, H, L, D, dtype=torch.float16, requires_grad=True) for _ in range(3))
    before = dispatch.PATHS["lists_gluon"]
    with kernel_options(flex_gluon_lists=True, flex_gluon_lists_bwd=True, bwd_ws_fused_dq=fused_dq,
                        bwd_ws_min_seq_bucket=0):
        route = flex.explain(q, k, v, softcap, bm)
        out = flex.flex_attention(q, k, v, softcap, bm)
    assert (route.forward, route.backward) == ("gluon_lists", "gluon_fused" if fused_dq else "gluon_dkdv"), str(route)
    assert dispatch.PATHS["lists_gluon"] == before + 1
    dq, = torch.autograd.grad(out.float().sum(), (q,))
    (fname, fargs, fflags), (bname, bargs, bflags) = recorded
    assert (fname, bname) == ("fwd", "bwd")
    assert fflags["LISTS"] and fflags["HAS_MASK_MOD"] and fflags["HAS_SCORE"] and not fflags["CAUSAL"]
    assert bflags["LISTS"] and bflags["HAS_MASK_MOD"] and bflags["HAS_SCORE"] and bflags["FUSED_DQ"] == fused_dq
    assert bflags["SPARSE_BQ"] == ws_bwd.LIST_BLOCK == 128
    n_blocks = L // 128
    kv_num, kv_idx, full_num, full_idx, strides = fargs["list_ptrs"]
    assert tuple(kv_num.shape)[-1] == n_blocks and kv_idx.shape[-2:] == (n_blocks, n_blocks)
    q_num, q_idx, qfull_num, qfull_idx, qstrides = bargs["list_ptrs"]
    assert tuple(q_num.shape)[-1] == n_blocks and q_idx.shape[-2:] == (n_blocks, n_blocks)
    assert strides.dtype == qstrides.dtype == torch.int32 and strides.numel() == qstrides.numel() == 14
    # block 0 holds documents 0 and 1 (partial against block 1), block 1 documents 1 and 2
    assert int(kv_num.flatten()[0]) + int(full_num.flatten()[0]) == 2
    for args in (fargs, bargs):
        assert any(torch.equal(t, doc) for t in args["mask_ptrs"]), "the mask_mod's captured ids"
    if fused_dq:
        assert bargs["dq_desc"].base.dtype == torch.float32
        assert torch.equal(dq, torch.zeros_like(dq)), "a dQ program ran"
    else:
        assert torch.isfinite(dq).all() and dq.abs().sum() > 0  # the core's dQ programs ran


def test_a_band_with_a_score_mod_takes_the_fused_dq_without_lists(recorded):
    """A softcap over a causal band: the Gluon forward and dK / dV kernel with the score hooks walk
    the band (no LISTS, no lists passed, no mask_mod hook), and bwd_ws_fused_dq fuses the dQ."""
    bm = flex.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, L, device="cpu")
    softcap = lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)  # noqa: E731
    q, k, v = (torch.randn(1, H, L, D, dtype=torch.float16, requires_grad=True) for _ in range(3))
    with kernel_options(flex_gluon_lists=True, flex_gluon_lists_bwd=True, bwd_ws_fused_dq=True,
                        bwd_ws_min_seq_bucket=0):
        route = flex.explain(q, k, v, softcap, bm)
        out = flex.flex_attention(q, k, v, softcap, bm)
    assert (route.forward, route.backward) == ("gluon_hooks", "gluon_fused"), str(route)
    dq, = torch.autograd.grad(out.float().sum(), (q,))
    (_, fargs, fflags), (_, bargs, bflags) = recorded
    assert fflags["CAUSAL"] and not fflags["LISTS"] and not fflags["HAS_MASK_MOD"] and fargs["list_ptrs"] == ()
    assert bflags["CAUSAL"] and not bflags["LISTS"] and bflags["FUSED_DQ"] and bargs["list_ptrs"] == ()
    assert torch.equal(dq, torch.zeros_like(dq)), "a dQ program ran"

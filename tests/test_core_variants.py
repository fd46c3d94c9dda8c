"""The Triton core's backward strategies agree: dQ by separate programs (deterministic) and dQ by
atomics from the dK/dV programs (a tuning choice), and deterministic mode never takes atomics."""

from __future__ import annotations

import pytest
import torch

import attend
from attend.kernels import configs, launch
from attend.varlen import varlen_attn
from conftest import DEVICE, KERNEL_DTYPES, assert_matches_float64, assert_scaled_close, rand, reference, same_precision

DTYPES = [d for d in KERNEL_DTYPES["triton"] if d != torch.float32] or [torch.float16]


@pytest.fixture
def dq_atomic(monkeypatch):
    def choose(flag: bool) -> None:
        monkeypatch.setattr(launch, "FORCE_DQ_ATOMIC", flag)
    return choose


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_dq_strategies_match_float64(atomic, causal, dq_atomic):
    dq_atomic(atomic)
    for dtype in DTYPES:
        q = rand(2, 4, 45, 32, dtype=dtype, requires_grad=True)
        k = rand(2, 2, 70, 32, dtype=dtype, requires_grad=True)
        v = rand(2, 2, 70, 32, dtype=dtype, requires_grad=True)
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert_matches_float64(out, q, k, v, what=f"{dtype} atomic={atomic}", is_causal=causal, enable_gqa=True)


def test_varlen_window_with_atomic_dq(dq_atomic):
    dq_atomic(True)
    lens = [33, 7, 50]
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    dtype = DTYPES[0]
    q, k, v = (rand(90, 2, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = varlen_attn(q, k, v, cu, cu, 50, 50, window_size=(9, 0))
    got = torch.autograd.grad(out.sum(), (q, k, v))
    dq_atomic(False)
    out2 = varlen_attn(q, k, v, cu, cu, 50, 50, window_size=(9, 0))
    want = torch.autograd.grad(out2.sum(), (q, k, v))
    assert torch.equal(out, out2)
    for name, a, b in zip("qkv", got, want):
        assert (a.float() - b.float()).abs().max().item() < 2e-2, f"d{name}"


def test_deterministic_mode_never_uses_atomics(dq_atomic):
    dq_atomic(True)
    q, k, v = (rand(1, 2, 40, 16, dtype=DTYPES[0], requires_grad=True) for _ in range(3))
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
                out = attend.scaled_dot_product_attention(q, k, v)
            grads.append(torch.autograd.grad(out.sum(), (q,))[0])
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])
    kept = configs.pruner("bwd")(configs.BWD_CONFIGS, {}, BLOCK_D=64, DETERMINISTIC=True)
    assert kept and not any(c.kwargs["DQ_ATOMIC"] for c in kept)
    assert any(c.kwargs["DQ_ATOMIC"] for c in configs.pruner("bwd")(configs.BWD_CONFIGS, {}, BLOCK_D=64))


@pytest.mark.parametrize("S", [1, 700, 2500])
def test_key_range_kernel_spans_the_kept_keys(S):
    """The per-(b, h) span [first True, last True + 1) behind KEY_RANGE, (0, 0) when none is
    kept; computed over the mask's own extent and broadcast by strides."""
    torch.manual_seed(S)
    mask = torch.rand(3, 2, 1, S, device=DEVICE) > 0.97
    mask[0, 0] = False
    mask[1, 1] = True
    m4 = mask[:, :1].expand(3, 4, 5, S)  # broadcast over heads (stride 0) and queries
    ext, strides, on = launch._key_range(m4, tuple(m4.stride()), True, m4)
    assert on and ext.shape == (3, 4, 2) and strides[1] == 0
    for b in range(3):
        kept = mask[b, 0, 0].nonzero().flatten().tolist()
        want = [kept[0], kept[-1] + 1] if kept else [0, 0]
        for h in range(4):
            assert ext[b, h].tolist() == want, (b, h)


@pytest.fixture
def tma(monkeypatch):
    def choose(flag: bool) -> None:
        monkeypatch.setattr(launch, "FORCE_TMA", flag)
    return choose


@pytest.mark.parametrize("case", [(45, 70, 32, False), (64, 64, 32, True), (33, 50, 80, True)],
                         ids=["ragged", "causal", "head_dim_80_causal"])
def test_backward_through_tensor_descriptors_matches_float64(case, tma):
    """The backward's TMA path (Q/dO and K/V tiles through per-head descriptors; rows past L or S
    and columns past the head dim are zero-filled by the copy engine, not masked)."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    tma(True)
    L, S, D, causal = case
    for dtype in DTYPES:
        q = rand(2, 4, L, D, dtype=dtype, requires_grad=True)
        k, v = (rand(2, 2, S, D, dtype=dtype, requires_grad=True) for _ in range(2))
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert_matches_float64(out, q, k, v, what=f"{dtype} {case}", is_causal=causal, enable_gqa=True)


def test_varlen_backward_through_tensor_descriptors(tma):
    """Per-sequence descriptors: a tile past a sequence's end reads zeros, not the next sequence."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    tma(True)
    lens = [33, 7, 50]
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    dtype = DTYPES[0]
    q, k, v = (rand(sum(lens), 2, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    out = varlen_attn(q, k, v, cu, cu, max(lens), max(lens), window_size=(-1, 0))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for i, n in enumerate(lens):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        qs, ks, vs = (t.detach()[sl].transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        gs = g[sl].transpose(0, 1)[None]
        ref64, p64 = reference(qs, ks, vs, is_causal=True)
        refs64 = torch.autograd.grad(ref64, (p64.query, p64.key, p64.value), gs.double())
        refs_same = torch.autograd.grad(same_precision(qs, ks, vs, is_causal=True), (qs, ks, vs), gs)
        for name, a, r64, rs in zip("qkv", grads, refs64, refs_same):
            unpack = lambda t: t[0].transpose(0, 1)
            assert_scaled_close(a[sl], unpack(r64), unpack(rs), k=8.0, what=f"sequence {i} d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_head_major_program_order_gives_identical_gradients(causal, monkeypatch):
    """HEAD_MAJOR only renumbers the backward's programs: without atomics every program computes
    the same tile either way, so the gradients must be bitwise equal (and match float64)."""
    monkeypatch.setattr(launch, "FORCE_DQ_ATOMIC", False)
    dtype = DTYPES[0]
    q = rand(2, 4, 45, 32, dtype=dtype, requires_grad=True)
    k, v = (rand(2, 2, 70, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    grads = {}
    for order in (False, True):
        monkeypatch.setattr(launch, "FORCE_HEAD_MAJOR", order)
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        grads[order] = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=order)
        if order:
            assert_matches_float64(out, q, k, v, what=f"head-major causal={causal}", is_causal=causal,
                                   enable_gqa=True)
    for name, a, b in zip("qkv", grads[False], grads[True]):
        assert torch.equal(a, b), f"d{name} differs between program orders"


def test_head_major_program_order_varlen(monkeypatch):
    """Packed sequences of different lengths: programs past a sequence's end exit in either order."""
    monkeypatch.setattr(launch, "FORCE_DQ_ATOMIC", False)
    lens = [33, 7, 50]
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    q, k, v = (rand(sum(lens), 2, 16, dtype=DTYPES[0], requires_grad=True) for _ in range(3))
    grads = {}
    for order in (False, True):
        monkeypatch.setattr(launch, "FORCE_HEAD_MAJOR", order)
        out = varlen_attn(q, k, v, cu, cu, max(lens), max(lens), window_size=(-1, 0))
        grads[order] = torch.autograd.grad(out.sum(), (q, k, v))
    for name, a, b in zip("qkv", grads[False], grads[True]):
        assert torch.equal(a, b), f"d{name} differs between program orders"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dq_from_stored_ds_matches(dropout, monkeypatch):
    """launch.DQ_FROM_DS: a full-size float mask's backward skips the dQ programs and computes
    dQ = scale * dS @ K from the stored mask gradient. Against float64 without dropout; with
    dropout (same seed) against the dQ programs' own result."""
    monkeypatch.setattr(launch, "FORCE_DQ_ATOMIC", False)
    dtype = DTYPES[0]
    torch.manual_seed(3)
    q = rand(2, 4, 37, 32, dtype=dtype, requires_grad=True)
    k, v = (rand(2, 2, 53, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = rand(2, 4, 37, 53, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 4, 37, 32, dtype=dtype, device=DEVICE)
    grads, gemm_calls = {}, []
    real = launch._dq_from_ds
    monkeypatch.setattr(launch, "_dq_from_ds", lambda *a: gemm_calls.append(1) or real(*a))
    for on in (False, True):
        monkeypatch.setattr(launch, "DQ_FROM_DS", on)
        torch.manual_seed(11)  # the same dropout mask both times
        with attend.sdpa_kernel(attend.SDPBackend.EFFICIENT_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=True)
        grads[on] = torch.autograd.grad(out, (q, k, v, mask), g)
        # (on the GPU both dQs can be bitwise equal: one key tile, the same tensor-core sums)
        assert len(gemm_calls) == int(on), "the GEMM path ran when it should not, or did not run"
    for name, a, b in zip("qkvm", grads[False], grads[True]):
        if name != "q":  # only dQ is computed differently
            assert torch.equal(a, b), f"d{name}"
    if dropout:
        scale = (grads[False][0].float().abs().max().item() or 1.0)
        assert (grads[True][0].float() - grads[False][0].float()).abs().max().item() <= 2e-2 * scale
        return
    ref64, p64 = reference(q, k, v, attn_mask=mask, enable_gqa=True)
    dq64 = torch.autograd.grad(ref64, p64.query, g.double())[0]
    qs, ks, vs, ms = (t.detach().requires_grad_() for t in (q, k, v, mask))
    dq_same = torch.autograd.grad(same_precision(qs, ks, vs, attn_mask=ms, enable_gqa=True), qs, g)[0]
    assert_scaled_close(grads[True][0], dq64, dq_same, k=8.0, what="dq from dS")

"""The Triton core's backward strategies agree: dQ by separate programs (deterministic) and dQ by
atomics from the dK/dV programs (a tuning choice), and deterministic mode never takes atomics."""

from __future__ import annotations

import pytest
import torch

import attend
from attend._layout import Band
from attend.kernels import configs, launch, options, worklist
from attend.varlen import varlen_attn
from conftest import DEVICE, KERNEL_DTYPES, assert_matches_float64, assert_scaled_close, rand, reference, same_precision

DTYPES = [d for d in KERNEL_DTYPES["triton"] if d != torch.float32] or [torch.float16]


@pytest.fixture
def kopts():
    """``kopts(**changes)``: kernel options (KernelOptions' fields) changed for the rest of the test."""
    import contextlib

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(options.kernel_options(**changes))


@pytest.fixture
def dq_atomic(kopts):
    def choose(flag: bool) -> None:
        kopts(dq_atomic=flag)
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


@pytest.mark.skipif(DEVICE != "cuda", reason="only a GPU runs programs concurrently: the interpreter runs them one at "
                    "a time, so its atomic adds are always in the same order and this could not fail there")
def test_deterministic_mode_gives_identical_gradients(dq_atomic):
    """With dQ by atomics asked for (kernel option dq_atomic), torch.use_deterministic_algorithms(True)
    still gives bit-identical gradients across calls: deterministic mode never takes atomics."""
    dq_atomic(True)
    q, k, v = (rand(2, 4, 300, 64, dtype=DTYPES[0], requires_grad=True) for _ in range(3))
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
                out = attend.scaled_dot_product_attention(q, k, v)
            grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    finally:
        torch.use_deterministic_algorithms(False)
    for later in grads[1:]:
        for a, b in zip(grads[0], later):
            assert torch.equal(a, b)


def test_deterministic_configs_never_use_atomics():
    """The backward's config pruner drops every dQ-by-atomics config in deterministic mode (host side)."""
    kept = configs.pruner("bwd")(configs.BWD_CONFIGS, {}, BLOCK_D=64, DETERMINISTIC=True)
    assert kept and not any(c.kwargs["DQ_ATOMIC"] for c in kept)
    assert any(c.kwargs["DQ_ATOMIC"] for c in configs.pruner("bwd")(configs.BWD_CONFIGS, {}, BLOCK_D=64))


@pytest.mark.parametrize("S", [1, 700, 2500])
def test_key_range_kernel_spans_the_kept_keys(S):
    """The per-(b, h) span [first True, last True + 1) behind KEY_RANGE, (0, 0) when none is
    kept, and whether the mask keeps every key in between (a run: the loops then skip its reads
    inside the span); computed over the mask's own extent and broadcast by strides."""
    torch.manual_seed(S)
    mask = torch.rand(4, 2, 1, S, device=DEVICE) > 0.97
    mask[0, 0] = False
    mask[1, 0] = True
    mask[2, 0] = False
    mask[2, 0, 0, S // 3: S // 2 + 1] = True  # a run inside
    mask[3, 0] = mask[2, 0]
    mask[3, 0, 0, (S // 3 + S // 2) // 2] = S < 3  # the same with a hole (S=1: still a run of one)
    m4 = mask[:, :1].expand(4, 4, 5, S)  # broadcast over heads (stride 0) and queries
    ext, strides, on = launch._key_range(m4, tuple(m4.stride()), True, m4)
    assert on and ext.shape == (4, 4, 4) and strides[1] == 0
    runs = []
    for b in range(4):
        kept = mask[b, 0, 0].nonzero().flatten().tolist()
        span = [kept[0], kept[-1] + 1] if kept else [0, 0]
        run = bool(kept) and len(kept) == span[1] - span[0]
        runs.append(run)
        for h in range(4):
            assert ext[b, h, :3].tolist() == span + [int(run)], (b, h)
    assert runs[:3] == [False, True, True] and runs[3] == (S < 3)


@pytest.fixture
def tma(kopts):
    def choose(flag: bool) -> None:
        kopts(tma=flag)
    return choose


@pytest.mark.parametrize("atomic", [False, True], ids=["dq_programs", "dq_bulk_reduce"])
@pytest.mark.parametrize("case", [(45, 70, 32, False), (64, 64, 32, True), (33, 50, 80, True)],
                         ids=["ragged", "causal", "head_dim_80_causal"])
def test_backward_through_tensor_descriptors_matches_float64(case, atomic, tma, dq_atomic):
    """The backward's TMA path (Q/dO and K/V tiles through per-head descriptors; rows past L or S
    and columns past the head dim are zero-filled by the copy engine, not masked). With dQ by
    atomics, the copy engine adds each dQ tile (a bulk reduce; rows past L are dropped), which
    Triton's interpreter does not implement: that case runs on the GPU only."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    if atomic and DEVICE != "cuda":
        pytest.skip("the interpreter has no descriptor reduce (cp.reduce.async.bulk)")
    tma(True)
    dq_atomic(atomic)
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
def test_head_major_program_order_gives_identical_gradients(causal, monkeypatch, kopts):
    """HEAD_MAJOR only renumbers the backward's programs: without atomics every program computes
    the same tile either way, so the gradients must be bitwise equal (and match float64)."""
    kopts(dq_atomic=False)
    dtype = DTYPES[0]
    q = rand(2, 4, 45, 32, dtype=dtype, requires_grad=True)
    k, v = (rand(2, 2, 70, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    grads = {}
    for order in (False, True):
        kopts(head_major=order)
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        grads[order] = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=order)
        if order:
            assert_matches_float64(out, q, k, v, what=f"head-major causal={causal}", is_causal=causal,
                                   enable_gqa=True)
    for name, a, b in zip("qkv", grads[False], grads[True]):
        assert torch.equal(a, b), f"d{name} differs between program orders"


def test_head_major_program_order_varlen(monkeypatch, kopts):
    """Packed sequences of different lengths: programs past a sequence's end exit in either order."""
    kopts(dq_atomic=False)
    lens = [33, 7, 50]
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    q, k, v = (rand(sum(lens), 2, 16, dtype=DTYPES[0], requires_grad=True) for _ in range(3))
    grads = {}
    for order in (False, True):
        kopts(head_major=order)
        out = varlen_attn(q, k, v, cu, cu, max(lens), max(lens), window_size=(-1, 0))
        grads[order] = torch.autograd.grad(out.sum(), (q, k, v))
    for name, a, b in zip("qkv", grads[False], grads[True]):
        assert torch.equal(a, b), f"d{name} differs between program orders"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dq_from_stored_ds_matches(dropout, monkeypatch, kopts):
    """KernelOptions.dq_from_ds: a full-size float mask's backward skips the dQ programs and computes
    dQ = scale * dS @ K from the stored mask gradient. Against float64 without dropout; with
    dropout (same seed) against the dQ programs' own result."""
    kopts(dq_atomic=False)
    dtype = DTYPES[0]
    torch.manual_seed(3)
    B = 1 if dropout else 2  # the interpreter's dropout draws are slow: one batch entry covers the case
    q = rand(B, 4, 37, 32, dtype=dtype, requires_grad=True)
    k, v = (rand(B, 2, 53, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = rand(B, 4, 37, 53, dtype=dtype, requires_grad=True)
    g = torch.randn(B, 4, 37, 32, dtype=dtype, device=DEVICE)
    grads, gemm_calls = {}, []
    real = launch._dq_from_ds
    monkeypatch.setattr(launch, "_dq_from_ds", lambda *a: gemm_calls.append(1) or real(*a))
    for on in (False, True):
        kopts(dq_from_ds=on)
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


def test_work_list_holds_every_block_once_heaviest_first():
    """worklist.work_tensor: every block of every sequence exactly once (none for an empty
    sequence), sorted by the span its program visits, heaviest first; dK/dV items after the list
    of query blocks when both are asked for."""
    from attend._layout import Band

    lens_q, lens_k = (5, 40, 0, 17), (9, 40, 3, 17)
    band = Band(-1, 0, bottom_right=True)  # causal, bottom-right per sequence
    work, counts = worklist.work_tensor(lens_q, lens_k, band, (("q", 16), ("k", 8)), torch.device("cpu"))
    items = work.tolist()
    q_items, k_items = items[:counts[0]], items[counts[0]:]
    assert sorted((i >> 16, i & 0xFFFF) for i in q_items) == [(0, 0), (1, 0), (1, 1), (1, 2), (3, 0), (3, 1)]
    assert sorted((i >> 16, i & 0xFFFF) for i in k_items) == (
        [(0, 0), (0, 1)] + [(1, j) for j in range(5)] + [(2, 0)] + [(3, 0), (3, 1), (3, 2)])

    def q_work(i):
        b, m = i >> 16, i & 0xFFFF
        return worklist.key_span(16 * m, min(lens_q[b], 16 * m + 16), lens_q[b], lens_k[b], band)

    spans = [q_work(i) for i in q_items]
    assert spans == sorted(spans, reverse=True) and spans[0] == 40  # sequence 1's last block sees all 40 keys
    # keys of sequence 2 (no queries) are visited by no query, but their program still writes zeros
    assert worklist.query_span(0, 3, 0, 3, band) == 0


@pytest.mark.parametrize("window,order", [((-1, 0), False), ((-1, -1), False), ((5, 0), False), ((5, 0), True)],
                         ids=["causal-key-order", "full-key-order", "window-key-order", "window-head-major"])
def test_work_list_gives_identical_results(window, order, monkeypatch, kopts):
    """KernelOptions.varlen_worklist only changes which program computes which tile: forward, LSE and every
    gradient must be bitwise equal with and without it, with sequences packed shortest first,
    an empty sequence, different key lengths (non-causal) and grouped heads."""
    from attend.varlen import AuxRequest, varlen_attn

    kopts(dq_atomic=False)
    kopts(head_major=order)
    lq = [3, 0, 21, 50]
    lk = lq if window != (-1, -1) else [7, 4, 21, 33]
    cq, ck = (torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE) for x in (lq, lk))
    dtype = DTYPES[0]
    q = rand(sum(lq), 4, 16, dtype=dtype, requires_grad=True)
    k, v = (rand(sum(lk), 2, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(sum(lq), 4, 16, dtype=dtype, device=DEVICE)
    results, launched = {}, []
    real = launch._work_list
    monkeypatch.setattr(launch, "_work_list", lambda *a: launched.append(r := real(*a)) or r)
    for on in (False, True):
        kopts(varlen_worklist=on)
        out, lse = varlen_attn(q, k, v, cq, ck, max(lq), max(lk), window_size=window, enable_gqa=True,
                               return_aux=AuxRequest(lse=True))
        results[on] = (out, lse, *torch.autograd.grad(out, (q, k, v), g))
    assert [w is not None for w in launched] == [False, False, True, True], "the work list was not used"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results[False], results[True]):
        assert torch.equal(a, b), f"{name} differs with the work list"


def test_work_list_falls_back_to_the_slot_grid(monkeypatch, kopts):
    """No list when the flag is off, for dense calls, under the autotuner (no fixed tiles), for
    paged / seqused_k calls (the forward reads those lengths on the device only), or when a block
    index would not fit its 16 bits."""
    from attend._layout import Band, Packed

    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    band, config, spec = Band(-1, 0, True), launch.Tiles({"BLOCK_M": 16}, 4, 1), (("q", "BLOCK_M"),)
    cpu = torch.device("cpu")
    off, on = options.KernelOptions(varlen_worklist=False), options.KernelOptions(varlen_worklist=True)
    assert launch._work_list(Packed(cu, cu), band, config, spec, cpu, off) is None
    assert launch._work_list(Packed(cu, cu), band, config, spec, cpu, on) is not None
    assert launch._work_list(None, band, config, spec, cpu, on) is None
    assert launch._work_list(Packed(cu, cu), band, None, spec, cpu, on) is None
    used = torch.tensor([3, 7], dtype=torch.int32)
    assert launch._work_list(Packed(cu, cu, seqused_k=used), band, config, spec, cpu, on) is None
    n = (16 << 16) + 1  # 2^16 + 1 blocks of 16: the last index needs 17 bits
    assert worklist.work_tensor((n,), (n,), band, (("q", 16),), torch.device("cpu")) is None


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_backward_row_statistics_layout(packed):
    """attn_bwd_preprocess writes NLSE2 = -lse * log2(e) (-inf where lse is -inf) and Delta =
    rowsum(O * dO) - dLSE at each sequence's aligned first row (core._stat_row0), pads every
    sequence to whole STAT_PAD-row blocks with -inf / 0, and no two sequences share a row."""
    from attend._layout import Packed
    from attend.kernels import core

    pad = core.STAT_PAD.value
    torch.manual_seed(3)
    H, D = 3, 24
    lens = [45, 0, 130, 7, 256] if packed else [45, 45]
    T = sum(lens)
    o, do = (rand(T, H, D) for _ in range(2))
    lse = torch.randn(H, T, device=DEVICE)
    lse[1, 3] = float("-inf")  # a row that saw no key
    dlse = torch.randn(1, T, device=DEVICE).expand(H, T)  # stride 0, as from lse.sum(0)-style losses
    if packed:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        meta = Packed(cu, cu)
        nlse2, delta, strides = launch._row_stats(launch.packed4(o), launch.packed4(do), lse, dlse, (0, T), len(lens),
                                                 max(lens), meta)
        starts = [(int(cu[b]) // pad + b) * pad for b in range(len(lens))]
        firsts = cu[:-1].tolist()
    else:  # (B, H, L, D) with B = 2: the packed rows read as two batch entries
        L = lens[0]
        o4, do4 = (t.reshape(2, L, H, D).transpose(1, 2) for t in (o, do))
        lse_d = lse.reshape(H, 2, L).transpose(0, 1).contiguous()
        dlse_d = dlse.reshape(H, 2, L).transpose(0, 1)
        nlse2, delta, strides = launch._row_stats(o4, do4, lse_d, dlse_d, (H * L, L), 2, L, None)
        starts, firsts = [0, 0], [0, L]
    assert strides[-1] % 16 == 0, "rows per head must keep 16-element alignment"
    owned = []
    for b, (n, row0, first) in enumerate(zip(lens, starts, firsts)):
        bt = b if not packed else 0
        span = -(-n // pad) * pad
        owned.append((row0, row0 + span))
        assert row0 % pad == 0 and row0 + span <= nlse2.shape[-1]
        rows = slice(first, first + n)
        want_nlse2 = torch.where(lse[:, rows] == float("-inf"), float("-inf"), -lse[:, rows] * core.RCP_LN2.value)
        want_delta = (o[rows].double() * do[rows].double()).sum(-1).T - dlse[:, rows].double()
        got_nlse2, got_delta = nlse2[bt, :, row0:row0 + n], delta[bt, :, row0:row0 + n]
        assert torch.allclose(got_nlse2, want_nlse2, rtol=1e-6, atol=1e-6), f"NLSE2 of sequence {b}"
        assert torch.allclose(got_delta.double(), want_delta, rtol=1e-4, atol=1e-4), f"Delta of sequence {b}"
        assert torch.all(nlse2[bt, :, row0 + n:row0 + span] == float("-inf")), f"NLSE2 padding of sequence {b}"
        assert torch.all(delta[bt, :, row0 + n:row0 + span] == 0), f"Delta padding of sequence {b}"
    if packed:
        owned = sorted(owned)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(owned, owned[1:])), f"sequences overlap: {owned}"


@pytest.mark.parametrize("B", [4200, 3])
def test_grids_fit_cuda_limits(B, monkeypatch):
    """CUDA caps a grid's y and z at 65535; B * H passes that (decode at batch 4200 with 16 heads,
    or 4200 one-token packed sequences). The forward and the preprocess launch (blocks, B * H)
    where it fits (faster, core._grid_cell) and put every program on x where it does not; the
    backward always uses one axis. The launchers are stubbed here (nothing runs, any device): the
    host side only; the GPU test below runs such a shape."""
    from attend._layout import Band, Packed

    grids = []
    for name in ("_FWD_LAUNCH", "_BWD_LAUNCH", "_PRE_LAUNCH"):
        monkeypatch.setattr(launch, name, lambda grid, *a, name=name: grids.append((name, grid)))
    H, S, D = 16, 16, 16
    q = torch.empty(B, H, 1, D, dtype=torch.float16, device=DEVICE)
    k = v = torch.empty(B, H, S, D, dtype=torch.float16, device=DEVICE)
    out, lse = launch.forward(q, k, v, None, 0.0, Band(), D ** -0.5, 0)
    launch.backward(q, q, k, v, out, lse, None, 0.0, Band(), D ** -0.5, 0, False)
    qp = torch.empty(B, H, D, dtype=torch.float16, device=DEVICE)
    cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
    out, lse = launch.varlen_forward(qp, qp, qp, Packed(cu, cu), 1, 1, D ** -0.5, Band(-1, 0, True))
    launch.varlen_backward(qp, qp, qp, qp, out, lse, Packed(cu, cu), 1, 1, D ** -0.5, Band(-1, 0, True))
    assert {name for name, _ in grids} == {"_FWD_LAUNCH", "_BWD_LAUNCH", "_PRE_LAUNCH"}
    for name, grid in grids:
        programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
        assert B * H <= programs < 2 ** 31 and all(g <= 65535 for g in grid[1:]), (name, grid)
        two_d = name != "_BWD_LAUNCH" and B * H <= 65535
        assert len(grid) == (2 if two_d else 1) and (not two_d or grid[1] == B * H), (name, grid)


def test_forward_tma_loads_follow_the_fixed_config(monkeypatch, kopts):
    """KernelOptions.fwd_tma None: the forward reads through TMA descriptors where its fixed config asks
    (configs.fwd_config's tma: masks, packed sequences, windows) and the copy engine can read the tensors;
    True / False force it; paged pools never. The request never reaches the kernel as a
    parameter. Host side only (the launcher is stubbed; the copy engine is assumed)."""
    from attend._layout import Band, Packed

    seen = []
    monkeypatch.setattr(launch, "_FWD_LAUNCH", lambda grid, args, cx, *a: seen.append(cx))
    kopts(interpret=False)  # the H100's fixed configs, not the interpreter's tile
    monkeypatch.setattr(launch, "use_tma", lambda *t, **kw: True)
    kopts(fwd_ws=False)  # the core's launch flags (a GPU would take ws.py for two of these)
    B, H, L, D = 2, 4, 256, 128
    q, k, v = (torch.empty(B, H, L, D, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    bias = torch.empty(B, H, L, L, dtype=torch.bfloat16, device=DEVICE)
    qp = torch.empty(B * L, H, D, dtype=torch.bfloat16, device=DEVICE)
    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32, device=DEVICE)

    def flags(call, force=None):
        kopts(fwd_tma=force)
        seen.clear()
        call()
        assert "TMA" not in seen[0]
        return seen[0]["USE_TMA"], seen[0]["MASK_TMA"]

    dense = lambda: launch.forward(q, k, v, None, 0.0, Band(), D ** -0.5, 0)
    masked = lambda: launch.forward(q, k, v, bias, 0.0, Band(), D ** -0.5, 0)
    packed = lambda: launch.varlen_forward(qp, qp, qp, Packed(cu, cu), L, L, D ** -0.5, Band(-1, 0, True))
    assert flags(dense) == (False, False)
    assert flags(masked) == (True, True)
    assert flags(packed) == (True, False)
    assert flags(masked, force=False) == (False, False)
    assert flags(dense, force=True) == (True, False)


def test_batch_times_heads_past_the_grid_limit(monkeypatch):
    """Decode with B * H past the cap on a grid's y (launch._GRID_Y_MAX), forward and backward,
    against float64: every program on one axis (GRID_1D). On a GPU at CUDA's real cap (B * H =
    67200 > 65535); under the interpreter, which has no cap, the cap is lowered to 8 so a small
    call (B * H = 12) takes the same launches."""
    if DEVICE == "cuda":
        B, H, S = 4200, 16, 32
    else:
        monkeypatch.setattr(launch, "_GRID_Y_MAX", 8)
        B, H, S = 3, 4, 24
    one_axis = []
    real = launch._one_axis
    monkeypatch.setattr(launch, "_one_axis", lambda heads: one_axis.append(real(heads)) or one_axis[-1])
    dtype = DTYPES[0]
    q = rand(B, H, 1, 32, dtype=dtype, requires_grad=True)
    k, v = (rand(B, H, S, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v)
    assert_matches_float64(out, q, k, v, what=f"B*H = {B * H}")
    assert one_axis and all(one_axis), one_axis


FWD_TMA_CASES = {
    "causal_gqa_ragged_d80": dict(L=45, S=70, D=80, kw=dict(is_causal=True, enable_gqa=True)),
    "float_bias_over_heads": dict(L=45, S=72, D=32, kw=dict(mask="float")),
    "bool_mask": dict(L=33, S=48, D=32, kw=dict(mask="bool")),
    "key_padding": dict(L=40, S=64, D=32, kw=dict(mask="keys")),
    "decode": dict(L=1, S=50, D=64, kw=dict(enable_gqa=True)),
}


@pytest.mark.parametrize("case", list(FWD_TMA_CASES))
def test_forward_through_tensor_descriptors(case, monkeypatch, kopts):
    """KernelOptions.fwd_tma: K, V (and a float mask's tiles) through TMA descriptors. Under the
    interpreter the result is bitwise the pointer path's; on the GPU it matches float64. The
    launch flags say which tiles went through descriptors: a float mask with rows does, a bool
    or key-padding mask does not."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    c = FWD_TMA_CASES[case]
    L, S, D, kw = c["L"], c["S"], c["D"], dict(c["kw"])
    dtype = DTYPES[0]
    torch.manual_seed(5)
    q = rand(2, 4, L, D, dtype=dtype, requires_grad=True)
    k, v = (rand(2, 2 if kw.get("enable_gqa") else 4, S, D, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = kw.pop("mask", None)
    if mask == "float":
        kw["attn_mask"] = torch.randn(2, 1, L, S, device=DEVICE).to(dtype)
    elif mask == "bool":
        kw["attn_mask"] = torch.rand(2, 4, L, S, device=DEVICE) > 0.3
    elif mask == "keys":
        kw["attn_mask"] = torch.rand(2, 1, 1, S, device=DEVICE) > 0.3
    backend = attend.SDPBackend.EFFICIENT_ATTENTION if mask else attend.SDPBackend.FLASH_ATTENTION
    flags = []
    real = launch._FWD_LAUNCH
    monkeypatch.setattr(launch, "_FWD_LAUNCH", lambda grid, args, cx, *a: flags.append(cx) or real(grid, args, cx, *a))
    kopts(fwd_ws=False)  # the core's forward (a GPU would take ws.py for some of these)
    kopts(fwd_one_loop=False)  # the pointer path's loops: one per band edge
    outs = {}
    for on in (False, True):
        kopts(fwd_tma=on)
        kopts(tma=True if on and DEVICE != "cuda" else None)
        with attend.sdpa_kernel(backend):
            outs[on] = attend.scaled_dot_product_attention(q, k, v, **kw)
    assert [f["USE_TMA"] for f in flags] == [False, True]
    assert flags[1]["MASK_TMA"] == (mask == "float")
    if DEVICE != "cuda":
        assert torch.equal(outs[False], outs[True])
    else:  # the backward does not depend on the flag: this checks the TMA forward's out and lse
        assert_matches_float64(outs[True], q, k, v, what=case, **kw)


def test_varlen_forward_through_tensor_descriptors(monkeypatch, kopts):
    """Per-sequence descriptors in the packed forward: a tile past a sequence's end reads zeros,
    not the next sequence (causal and a sliding window; bitwise the pointer path's under the
    interpreter, and the same within rounding on the GPU)."""
    from attend.varlen import AuxRequest, varlen_attn

    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    lens = [33, 7, 50, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    torch.manual_seed(6)
    q, k, v = (rand(sum(lens), 2, 32, dtype=DTYPES[0]) for _ in range(3))
    kopts(fwd_one_loop=False)  # the pointer path's loops: one per band edge
    for window in ((-1, 0), (9, 0)):
        res = {}
        for on in (False, True):
            kopts(fwd_tma=on)
            kopts(tma=True if on and DEVICE != "cuda" else None)
            res[on] = varlen_attn(q, k, v, cu, cu, 50, 50, window_size=window, return_aux=AuxRequest(lse=True))
        for a, b in zip(res[False], res[True]):
            if DEVICE != "cuda":
                assert torch.equal(a, b), window
            else:
                assert (a.float() - b.float()).abs().max().item() < 1e-2, window


ONE_LOOP_CASES = {
    # (L, S, D), SDPA keywords; EVEN lengths: the pointer loads need no bounds masks
    "causal_even": ((128, 128, 32), dict(is_causal=True)),
    # bottom-right with L > S: the first L - S rows see no key (output 0, finite gradients)
    "lower_right_ragged": ((70, 45, 32), dict(attn_mask="lower_right")),
    "upper_left_gqa_d80": ((45, 70, 80), dict(is_causal=True, enable_gqa=True)),
}


@pytest.mark.parametrize("case", list(ONE_LOOP_CASES))
def test_band_edges_in_one_loop_match_float64(case, monkeypatch, kopts):
    """KernelOptions.fwd_one_loop / bwd_one_loop: the band's edge blocks masked under a branch inside
    the inner loops (core's ONE_LOOP) give the split loops' results: forward and gradients
    against float64, through TMA descriptors (forced under the interpreter) where the lengths
    are ragged. The launch flags show the forward asked for it."""
    from attend.bias import causal_lower_right

    (L, S, D), kw = ONE_LOOP_CASES[case]
    kw = dict(kw)
    if kw.get("attn_mask") == "lower_right":
        kw["attn_mask"] = causal_lower_right(L, S)
    ragged = L % configs.EVEN_TILE or S % configs.EVEN_TILE
    if ragged and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("ragged lengths take the one loop through tensor descriptors, which need sm_90")
    if ragged:
        kopts(fwd_tma=True)
        kopts(tma=True if DEVICE != "cuda" else None)
    seen = []
    real = launch._FWD_LAUNCH
    monkeypatch.setattr(launch, "_FWD_LAUNCH", lambda grid, args, cx, *a: seen.append(cx) or real(grid, args, cx, *a))
    kopts(fwd_ws=False)  # the core's forward (a GPU would take ws.py for some of these)
    dtype = DTYPES[0]
    torch.manual_seed(7)
    q = rand(1, 2, L, D, dtype=dtype, requires_grad=True)
    k, v = (rand(1, 1 if kw.get("enable_gqa") else 2, S, D, dtype=dtype, requires_grad=True) for _ in range(2))
    for one in (True, False):
        kopts(fwd_one_loop=one)
        kopts(bwd_one_loop=one)
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, **kw)
        assert seen[-1]["ONE_LOOP"] is one
        assert_matches_float64(out, q, k, v, what=f"{case} one_loop={one}", **kw)


@pytest.mark.parametrize("window", [(-1, 0), (9, 0), (20, 0)])
def test_packed_band_edges_in_one_loop(window, monkeypatch, kopts):
    """The packed form of the same: per-sequence bands (windows narrower and wider than a tile,
    sequences shorter than one) in one loop against the split loops, forward, lse and gradients."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    from attend.varlen import AuxRequest

    kopts(fwd_tma=True)
    kopts(tma=True if DEVICE != "cuda" else None)
    lens = [33, 7, 50, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    torch.manual_seed(8)
    q, k, v = (rand(sum(lens), 2, 32, dtype=DTYPES[0], requires_grad=True) for _ in range(3))
    res = {}
    for one in (True, False):
        kopts(fwd_one_loop=one)
        kopts(bwd_one_loop=one)
        out, lse = varlen_attn(q, k, v, cu, cu, 50, 50, window_size=window, return_aux=AuxRequest(lse=True))
        res[one] = (out, lse, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res[True], res[False]):
        assert torch.isfinite(a).all(), name
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 1e-2 * max(scale, 1.0), (name, window)


def test_one_loop_follows_the_fixed_config(monkeypatch, kopts):
    """Which fixed configs run a band's edges in the inner loop (configs' one_loop, as
    the H100 measured them): not the window forward or the one-sequence packed forward, yes the
    dense causal forward; the backward by its dK/dV tile rows (64: yes, 32: no).
    KernelOptions.fwd_one_loop / bwd_one_loop override the config. Host side only."""
    kopts(interpret=False)
    kopts(autotune=False)
    base = dict(BLOCK_D=128, HAS_MASK=False, MASK_KEYS=False, DETERMINISTIC=False)
    window = dict(base, CAUSAL=True, WINDOW=True, VARLEN=True)
    packed = dict(base, CAUSAL=True, WINDOW=False, VARLEN=True)
    dense = dict(base, CAUSAL=True, WINDOW=False, VARLEN=False)

    def one(kind, flags, seq=16384):
        opts = options.current()
        tiles = launch.pick_tiles(kind, flags, 2, opts, l_bucket=seq, seq_bucket=seq)
        return launch.override(kind, tiles, flags, opts).meta["ONE_LOOP"]

    assert not one("fwd", window) and not one("fwd", packed)
    assert one("fwd", packed, seq=4096) and one("fwd", dense) and one("fwd", dense, seq=1024)
    assert not one("bwd", window)  # 32x64
    assert one("bwd", packed) and one("bwd", dense, seq=4096)  # head-major 64x64, 64x128
    kopts(fwd_one_loop=True)
    kopts(bwd_one_loop=True)
    assert one("fwd", window) and one("bwd", window)
    kopts(fwd_one_loop=False)
    kopts(bwd_one_loop=False)
    assert not one("fwd", dense) and not one("bwd", packed)


WS_CASES = {
    # (B, H, Hkv, L, S), mask kind, dtype index, band (None, "causal" top-left, "lower_right")
    "no_mask": ((2, 4, 4, 256, 384), None, 0, None),
    "grouped_heads": ((1, 8, 2, 128, 256), None, 0, None),
    "ragged_lengths": ((2, 2, 2, 200, 333), None, 0, None),
    "causal": ((2, 4, 2, 384, 384), None, 0, "causal"),
    "causal_ragged_L>S": ((1, 2, 2, 300, 170), None, 0, "causal"),
    "causal_grouped_ragged": ((1, 8, 2, 200, 333), None, 0, "causal"),
    "lower_right_L<S": ((1, 2, 2, 130, 300), None, 0, "lower_right"),
    "lower_right_L>S": ((1, 2, 2, 300, 130), None, 0, "lower_right"),
    "float_bias_with_masked_rows": ((2, 2, 2, 256, 256), "bias", 0, None),
    "fp16_bias_ragged": ((1, 2, 2, 100, 136), "bias", -1, None),
    "fp16_causal_ragged": ((1, 2, 2, 200, 200), None, -1, "causal"),
}


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9,
                    reason="the warp-specialized Gluon forward runs on sm_90 only (no interpreter)")
@pytest.mark.parametrize("case,fused_dq", [(c, False) for c in WS_CASES]
                         + [(c, True) for c, spec in WS_CASES.items() if spec[1] is None])
def test_warp_specialized_forward_matches_float64(case, fused_dq, monkeypatch, kopts):
    """KernelOptions.fwd_ws: eligible calls (ws.eligible) take the Gluon kernel; its output and gradients
    against float64 (without a mask the Gluon dK / dV kernel, ws_bwd.py, and the core's dQ
    programs; with one the core's backward): lengths that are not whole tiles, causal bands top-left
    and bottom-right (rows with no key give 0), grouped heads, a float bias whose row 5 is -inf
    everywhere (0 and finite gradients, as in the core). A D=64 call does not take it.
    ``fused_dq`` (KernelOptions.bwd_ws_fused_dq): dQ from the Gluon kernel's reduce-adds instead."""
    from attend.bias import causal_lower_right
    from attend.kernels import ws, ws_bwd

    (B, H, Hkv, L, S), kind, di, band = WS_CASES[case]
    dtype = (torch.bfloat16, torch.float16)[di]
    kopts(bwd_ws_min_seq_bucket=0)  # these short lengths too (configs.ws_backward)
    kopts(bwd_ws_fused_dq=fused_dq)
    calls, bwd_calls = [], []
    real, real_bwd = ws.forward, ws_bwd.dkdv
    monkeypatch.setattr(ws, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ws_bwd, "dkdv",
                        lambda *a, **kw: bwd_calls.append(kw.get("dq") is not None) or real_bwd(*a, **kw))
    torch.manual_seed(11)
    q = rand(B, H, L, 128, dtype=dtype, requires_grad=True)
    k, v = (rand(B, Hkv, S, 128, dtype=dtype, requires_grad=True) for _ in range(2))
    kw = dict(enable_gqa=Hkv != H, is_causal=band == "causal")
    if kind == "bias":
        bias = torch.randn(B, H, L, S, device=DEVICE).to(dtype)
        bias[:, :, 5] = float("-inf")  # row 5 sees no key
        kw["attn_mask"] = bias
    if band == "lower_right":
        kw["attn_mask"] = causal_lower_right(L, S)
    backend = attend.SDPBackend.EFFICIENT_ATTENTION if kind else attend.SDPBackend.FLASH_ATTENTION
    with attend.sdpa_kernel(backend):
        out = attend.scaled_dot_product_attention(q, k, v, **kw)
    assert calls, "the call did not take the warp-specialized forward"
    keep = torch.ones(L, dtype=torch.bool, device=DEVICE)
    if kind == "bias":
        keep[5] = False  # that row is 0 (asserted below), checked apart from the others
    if band == "lower_right" and L > S:
        keep[: L - S] = False  # rows that see no key: 0 (asserted below)
    if not keep.all():
        assert torch.equal(out[:, :, ~keep], torch.zeros_like(out[:, :, ~keep]))
        g = torch.randn_like(out)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v), retain_graph=True)
        assert torch.equal(grads[0][:, :, ~keep], torch.zeros_like(grads[0][:, :, ~keep])), "rows with no key: dQ 0"
        # the kept rows alone are the same problem (the others add nothing to dK / dV): their own oracle
        kept = dict(kw, attn_mask=kw["attn_mask"][:, :, keep] if kind == "bias"
                    else causal_lower_right(int(keep.sum()), S))
        qk = q.detach()[:, :, keep].requires_grad_()
        ref, p = reference(qk, k, v, **kept)
        refs = torch.autograd.grad((ref * g[:, :, keep].double()).sum(), (p.query, p.key, p.value))
        same = same_precision(qk, k, v, **kept)
        sames = torch.autograd.grad((same * g[:, :, keep]).sum(), (qk, k, v))
        assert_scaled_close(out[:, :, keep], ref, same, what=case)
        for name, a, r, s_ in zip("qkv", (grads[0][:, :, keep], *grads[1:]), refs, sames):
            assert_scaled_close(a, r, s_, k=6.0, what=f"{case} d{name}")
    else:
        assert_matches_float64(out, q, k, v, what=case, **kw)
    assert bool(bwd_calls) == (kind is None), "the Gluon dK / dV kernel serves backwards without a mask"
    assert all(f == fused_dq for f in bwd_calls), bwd_calls
    calls.clear()
    q64, k64, v64 = (t.detach()[..., :64].contiguous() for t in (q, k, v))
    with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
        attend.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=Hkv != H)
    assert not calls


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("backend,kw", [("FLASH_ATTENTION", dict(is_causal=True)),
                                        ("EFFICIENT_ATTENTION", dict(is_causal=True)),
                                        ("EFFICIENT_ATTENTION", dict(attn_mask="bool"))],
                         ids=["flash-causal", "efficient-causal", "efficient-bool-mask"])
def test_a_scale_at_or_below_zero_keeps_masked_keys_out(backend, kw, scale, use_kernel):
    """The core masks and takes row maxima of unscaled scores: with a scale of 0 or below, -inf times
    the scale is NaN or +inf, so the launcher runs (-q) . k * |scale| or 0 . k * 1 instead. A zero
    scale is the mean over the visible keys, as in PyTorch (it gave NaN before)."""
    use_kernel("triton")
    dt = torch.float16 if backend == "FLASH_ATTENTION" else torch.float32
    q, k, v = (rand(1, 2, 40, 16, dtype=dt, requires_grad=True) for _ in range(3))
    if kw.get("attn_mask") == "bool":
        kw = dict(attn_mask=torch.rand(40, 40, device=DEVICE) > 0.3)
    with attend.sdpa_kernel([getattr(attend.SDPBackend, backend)]):
        out = attend.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    assert torch.isfinite(out).all()
    assert_matches_float64(out, q, k, v, what=f"{backend} scale {scale}", scale=scale, **kw)


@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dots", ["ieee", "tf32x3"])
def test_fp32_exact_dots_tiles_match_float64(D, causal, dots, monkeypatch, kopts):
    """fp32 without allow_tf32 takes configs' "fp32_ieee" tiles (forward 64x32, 32x32 at head dim 256;
    backward 32x32, 16x16 at 256), or with KernelOptions.fp32_dots="tf32x3" the "fp32_tf32x3" ones
    (the forward's 32x16 at 256): output and gradients match float64 at ragged lengths. The
    interpreter's own tile is replaced by the rule's here, as a GPU launch picks it (the interpreter
    computes every dot in fp32: on a GPU this checks TF32x3's accuracy)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kopts(fp32_dots=dots)
    picked, real = {}, launch.pick_tiles

    def pick(kind, flags, elem, opts, *a, **kw):
        if opts.interpret:
            c = configs.heuristic(kind, flags["BLOCK_D"], flags=flags, elem=elem)
            tiles = launch.Tiles(dict(c.kwargs), c.num_warps, c.num_stages)
        else:
            tiles = real(kind, flags, elem, opts, *a, **kw)
        picked[kind] = (tiles.meta, tiles.warps, flags["DOT_PRECISION"])
        return tiles

    monkeypatch.setattr(launch, "pick_tiles", pick)
    torch.manual_seed(3)
    q, k, v = (rand(1, 2, 100, D, requires_grad=True) for _ in range(3))
    with attend.sdpa_kernel(attend.SDPBackend.EFFICIENT_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_matches_float64(out, q, k, v, what=f"fp32 {dots} D={D}", is_causal=causal)
    (fwd, fwd_warps, fwd_dots), (bwd, bwd_warps, bwd_dots) = picked["fwd"], picked["bwd"]
    assert fwd_dots == bwd_dots == dots
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd_warps) == (
        (64, 32, 8 if dots == "ieee" else 4) if D <= 128 else (32, 32, 8) if dots == "ieee" else (32, 16, 4))
    want = (32, 32, 32, 32, 8) if D <= 128 else (16, 16, 16, 16, 8 if dots == "ieee" else 4)
    assert tuple(bwd[n] for n in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")) + (bwd_warps,) == want

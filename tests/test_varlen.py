"""varlen_attn against a per-sequence float64 loop, paged KV against the same keys packed,
and the validation of its arguments. Runs each kernel reachable here (CPU: the blocked loop and
the Triton core under the interpreter; GPU: the Triton core, bf16 too)."""

from __future__ import annotations

import pytest
import torch

from attend.varlen import AuxRequest, varlen_attn
from conftest import DEVICE, FLOOR, KERNEL_DTYPES, KERNELS, assert_scaled_close

# (id, query lengths, key lengths, Hq, Hkv, D)
SHAPES = [
    ("mixed", [5, 37, 0, 20], [5, 37, 0, 20], 4, 2, 16),
    ("L!=S", [9, 30, 3], [20, 11, 3], 2, 2, 24),
    ("decode", [1, 1, 1], [40, 7, 19], 4, 1, 32),
]
WINDOWS = [(-1, -1), (-1, 0), (8, 0), (3, 2), (0, 0)]


def _cu(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    return cu


def _band(L, S, window):
    left, right = window
    i = torch.arange(L, device=DEVICE)[:, None] + (S - L)
    j = torch.arange(S, device=DEVICE)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool, device=DEVICE)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def _loop(q, k, v, lq, lk, window, dtype):
    """Per-sequence attention in ``dtype``: (out (T, H, D), lse (H, T))."""
    G = q.shape[1] // k.shape[1]
    outs, lses = [], []
    cq, ck = [0] + torch.tensor(lq).cumsum(0).tolist(), [0] + torch.tensor(lk).cumsum(0).tolist()
    for b in range(len(lq)):
        qb = q[cq[b]:cq[b + 1]].to(dtype).transpose(0, 1)
        kb = k[ck[b]:ck[b + 1]].to(dtype).transpose(0, 1).repeat_interleave(G, 0)
        vb = v[ck[b]:ck[b + 1]].to(dtype).transpose(0, 1).repeat_interleave(G, 0)
        s = (qb @ kb.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~_band(lq[b], lk[b], window), float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        outs.append((p @ vb).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def _inputs(lq, lk, hq, hkv, D, dtype, grad=True):
    mk = lambda T, H: torch.randn(T, H, D, dtype=dtype, device=DEVICE).requires_grad_(grad)  # noqa: E731
    return mk(sum(lq), hq), mk(sum(lk), hkv), mk(sum(lk), hkv)


def _assert_matches_loop(out, lse, q, k, v, lq, lk, window, dtype, lse_tol):
    """varlen_attn's (out, lse) and its input gradients against the per-sequence float64 loop, with
    tolerances scaled by the loop in ``dtype``; rows with no visible key have lse -inf. Returns those
    rows' mask, (H, T)."""
    ref, ref_lse = _loop(q, k, v, lq, lk, window, torch.float64)
    same, _ = _loop(q, k, v, lq, lk, window, dtype)
    assert_scaled_close(out, ref, same, what=f"{dtype} out")
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), "rows with no visible key must have lse -inf"
    if (~empty).any():
        assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= lse_tol
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * g.double()).sum(), (q, k, v))
    sames = torch.autograd.grad((same * g.to(same.dtype)).sum(), (q, k, v))
    # dQ and dK go through dP - Delta, which cancels (exactly, for a row that sees one key): its
    # terms are of size |dO| |V|. An fp32 loop can cancel them exactly where the kernel, summing in
    # another order, leaves their rounding; in half precision the floor is far above it already.
    # dV sums P dO over the queries that see a key, terms of size |dO|: summed in another order
    # than the loop's, its rounding is that of |dO| (the loop's may be exact: one query per key).
    full = dtype in (torch.float32, torch.float64)
    scales = dict(q=(g.abs().max() * v.abs().max()).item(), k=(g.abs().max() * v.abs().max()).item(),
                  v=g.abs().max().item()) if full else {}
    for name, a, r, s in zip("qkv", grads, refs, sames):
        assert_scaled_close(a, r.double(), s, k=6.0, what=f"{dtype} d{name}", floor_scale=scales.get(name, 1.0))
    return empty


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_varlen_matches_per_sequence_loop(kernel, window, shape, use_kernel):
    use_kernel(kernel)
    _, lq, lk, hq, hkv, D = shape
    for dtype in KERNEL_DTYPES[kernel]:
        if dtype == torch.float64:
            continue
        q, k, v = _inputs(lq, lk, hq, hkv, D, dtype)
        out, lse = varlen_attn(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), window_size=window,
                               enable_gqa=hq != hkv, return_aux=AuxRequest(lse=True))
        _assert_matches_loop(out, lse, q, k, v, lq, lk, window, dtype, lse_tol=1e-3)


# D=128 packed shapes: (id, query lengths, key lengths, Hq, Hkv, whether the warp-specialized
# Gluon forward serves them on sm_90, whether the Gluon dK / dV kernel does). The forward: query
# sequences of one length, any keys (a sequence with no key too); mixed query lengths stay on the
# core (ws.eligible). dK / dV: query and key sequences of one length each (ws_bwd.eligible).
WS_SHAPES = [
    ("equal", [257, 257, 257], [257, 257, 257], 4, 2, True, True),
    ("keys_longer", [200, 200], [333, 333], 2, 2, True, True),
    ("keys_differ", [200, 200, 200], [333, 129, 0], 2, 2, True, False),
    ("mixed", [1, 130, 257, 0, 64, 700], [1, 130, 257, 0, 64, 700], 4, 2, False, False),
]


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9,
                    reason="the warp-specialized Gluon kernels run on sm_90 only (no interpreter)")
@pytest.mark.parametrize("window", WINDOWS + [(100, 0)], ids=str)
@pytest.mark.parametrize("shape", WS_SHAPES, ids=lambda s: s[0])
def test_varlen_warp_specialized_kernels(window, shape, monkeypatch):
    """Packed calls of one query length take the Gluon forward (kernels/ws.py) on sm_90, and of one
    query and one key length the Gluon dK / dV kernel (kernels/ws_bwd.py): output, LSE and
    gradients against the per-sequence float64 loop, per band; other calls take the core."""
    from attend.kernels import ws, ws_bwd
    from attend.kernels.options import kernel_options

    _, lq, lk, hq, hkv, served, served_bwd = shape
    calls, bwd_calls = [], []
    real, real_bwd = ws.forward, ws_bwd.dkdv
    monkeypatch.setattr(ws, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ws_bwd, "dkdv", lambda *a, **kw: bwd_calls.append(1) or real_bwd(*a, **kw))
    torch.manual_seed(5)
    q, k, v = _inputs(lq, lk, hq, hkv, 128, torch.bfloat16)
    # short sequences too (configs.ws_backward); the backward runs with the forward's options
    with kernel_options(bwd_ws_min_seq_bucket=0):
        out, lse = varlen_attn(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), window_size=window,
                               enable_gqa=hq != hkv, return_aux=AuxRequest(lse=True))
    assert bool(calls) == served, f"took the warp-specialized forward: {bool(calls)}"
    empty = _assert_matches_loop(out, lse, q, k, v, lq, lk, window, torch.bfloat16, lse_tol=2e-2)
    assert bool(bwd_calls) == served_bwd, f"took the Gluon dK / dV kernel: {bool(bwd_calls)}"
    assert torch.equal(out[empty.T], torch.zeros_like(out[empty.T]))


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9,
                    reason="the warp-specialized Gluon kernels run on sm_90 only (no interpreter)")
@pytest.mark.parametrize("length", [1024, 1100])
def test_gluon_backward_from_its_length(length, monkeypatch):
    """configs.ws_backward: the Gluon dK / dV kernel serves sequences longer than 1024 (its
    per-tile cost loses to the core's one launch at 1024); both paths against the float64 loop."""
    from attend.kernels import ws_bwd

    bwd_calls = []
    real_bwd = ws_bwd.dkdv
    monkeypatch.setattr(ws_bwd, "dkdv", lambda *a, **kw: bwd_calls.append(1) or real_bwd(*a, **kw))
    torch.manual_seed(6)
    lens = [length]
    q, k, v = _inputs(lens, lens, 2, 2, 128, torch.bfloat16)
    out, lse = varlen_attn(q, k, v, _cu(lens), _cu(lens), length, length, window_size=(300, 0),
                           return_aux=AuxRequest(lse=True))
    _assert_matches_loop(out, lse, q, k, v, lens, lens, (300, 0), torch.bfloat16, lse_tol=2e-2)
    assert bool(bwd_calls) == (length > 1024)


@pytest.mark.parametrize("kernel", KERNELS)
def test_varlen_lse_gradient(kernel, use_kernel):
    """Gradients flow through the returned log-sum-exp too."""
    use_kernel(kernel)
    lq = lk = [7, 19]
    q, k, v = _inputs(lq, lk, 2, 2, 16, torch.float32)
    out, lse = varlen_attn(q, k, v, _cu(lq), _cu(lk), 19, 19, window_size=(-1, 0), return_aux=AuxRequest(lse=True))
    w = torch.randn_like(lse)
    got = torch.autograd.grad((out.sum() + (lse * w).sum()), (q, k, v))
    ref, ref_lse = _loop(q, k, v, lq, lk, (-1, 0), torch.float64)
    want = torch.autograd.grad(ref.sum() + (ref_lse * w.double()).sum(), (q, k, v))
    for name, a, r in zip("qkv", got, want):
        assert (a.double() - r).abs().max().item() < 1e-4, f"d{name}"


def _paged(k, v, lk, page):
    """Scatter packed keys into a shuffled page pool; returns (k_pool, v_pool, table, seqused)."""
    n_pages = [-(-n // page) for n in lk]
    total = sum(n_pages) + 3  # a few pages no sequence uses
    perm = torch.randperm(total, device=DEVICE)
    H, D = k.shape[1], k.shape[2]
    kp = torch.randn(total, page, H, D, dtype=k.dtype, device=DEVICE)  # junk where unused
    vp = torch.randn(total, page, H, D, dtype=v.dtype, device=DEVICE)
    width = max(n_pages) + 1
    table = torch.full((len(lk), width), total - 1, dtype=torch.int32, device=DEVICE)
    start, used = 0, 0
    for b, n in enumerate(lk):
        ids = perm[used:used + n_pages[b]]
        used += n_pages[b]
        table[b, : len(ids)] = ids.int()
        for p, pid in enumerate(ids.tolist()):
            rows = slice(start + p * page, min(start + (p + 1) * page, start + n))
            cnt = rows.stop - rows.start
            kp[pid, :cnt] = k[rows]
            vp[pid, :cnt] = v[rows]
        start += n
    return kp, vp, table, torch.tensor(lk, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 0)], ids=str)
def test_paged_kv_matches_packed(kernel, page, window, use_kernel):
    use_kernel(kernel)
    lq, lk = [3, 1, 17], [45, 16, 70]
    q, k, v = _inputs(lq, lk, 4, 2, 16, torch.float16 if kernel == "triton" else torch.float32, grad=False)
    packed = varlen_attn(q, k, v, _cu(lq), _cu(lk), 17, 70, window_size=window, enable_gqa=True)
    kp, vp, table, used = _paged(k, v, lk, page)
    paged = varlen_attn(q, kp, vp, _cu(lq), None, 17, 70, window_size=window, enable_gqa=True,
                        block_table=table, seqused_k=used)
    assert (paged.double() - packed.double()).abs().max().item() <= FLOOR[q.dtype]


def test_inference_mode_tensors_are_read_every_call():
    """Under torch.inference_mode the offsets, used lengths and block table are inference tensors,
    which keep no version counter: each call reads them again (none is kept), and a table edited
    in place between calls is seen."""
    lq, lk = [3, 1, 17], [45, 16, 70]
    with torch.inference_mode():
        q, k, v = _inputs(lq, lk, 4, 2, 16, torch.float32, grad=False)
        cu_q, cu_k = _cu(lq), _cu(lk)
        packed = varlen_attn(q, k, v, cu_q, cu_k, 17, 70, enable_gqa=True)
        kp, vp, table, used = _paged(k, v, lk, 16)
        paged = varlen_attn(q, kp, vp, cu_q, None, 17, 70, enable_gqa=True, block_table=table, seqused_k=used)
        assert (paged - packed).abs().max().item() <= 1e-5
        table[0, 0] = kp.shape[0] + 5  # a page outside the pool, written in place
        with pytest.raises(ValueError, match=r"block_table\[0\] refers to page"):
            varlen_attn(q, kp, vp, cu_q, None, 17, 70, enable_gqa=True, block_table=table, seqused_k=used)
    want = varlen_attn(q.clone(), k.clone(), v.clone(), _cu(lq), _cu(lk), 17, 70, enable_gqa=True)
    assert torch.equal(packed, want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_seqused_k_uses_the_first_keys(kernel, use_kernel):
    use_kernel(kernel)
    lq, slots, used = [4, 6], [30, 25], [12, 25]
    q, k, v = _inputs(lq, slots, 2, 2, 16, torch.float32, grad=False)
    got = varlen_attn(q, k, v, _cu(lq), _cu(slots), 6, 30, seqused_k=torch.tensor(used, dtype=torch.int32,
                                                                                   device=DEVICE))
    keep = torch.cat([torch.arange(s, s + u) for s, u in zip([0, 30], used)]).to(DEVICE)
    want, _ = _loop(q, k[keep], v[keep], lq, used, (-1, -1), torch.float64)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_inference_only_arguments_refuse_backward():
    lq, lk = [4, 6], [30, 25]
    q, k, v = _inputs(lq, lk, 2, 2, 16, torch.float32)
    out = varlen_attn(q, k, v, _cu(lq), _cu(lk), 6, 30, seqused_k=torch.tensor(lk, dtype=torch.int32, device=DEVICE))
    with pytest.raises(RuntimeError, match="seqused_k"):
        out.sum().backward()


def _valid():
    lq = [4, 6]
    q, k, v = _inputs(lq, lq, 2, 2, 16, torch.float32, grad=False)
    return q, k, v, _cu(lq)


@pytest.mark.parametrize("bad, match", [
    (lambda cu: cu.long(), "cu_seq_q must have dtype torch.int32, got torch.int64"),
    (lambda cu: cu + 1, r"cu_seq_q\[0\] must be 0, got 1"),
    (lambda cu: torch.tensor([0, 7, 5], dtype=torch.int32, device=DEVICE), r"cu_seq_q\[2\] = 5 < cu_seq_q\[1\] = 7"),
    (lambda cu: torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE), r"cu_seq_q\[-1\] must equal the token count 10, got 9"),
    (lambda cu: cu.reshape(1, -1), "cu_seq_q must be 1-D"),
])
def test_cu_seq_validation_names_the_bad_entry(bad, match):
    q, k, v, cu = _valid()
    with pytest.raises(ValueError, match=match):
        varlen_attn(q, k, v, bad(cu), cu, 6, 6)


def test_argument_validation():
    q, k, v, cu = _valid()
    with pytest.raises(ValueError, match="max_q = 5 is less than sequence 1's query length 6"):
        varlen_attn(q, k, v, cu, cu, 5, 6)
    with pytest.raises(ValueError, match=r"cu_seq_k has 2 entries; expected 3"):
        varlen_attn(q, k, v, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="window_size must be two ints"):
        varlen_attn(q, k, v, cu, cu, 6, 6, window_size=(-2, 0))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        varlen_attn(q, k[:, :1], v[:, :1], cu, cu, 6, 6)
    with pytest.raises(ValueError, match="query must be"):
        varlen_attn(q[None], k, v, cu, cu, 6, 6)
    pool = torch.randn(4, 8, 2, 16, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    used = torch.tensor([4, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="page_size .* multiple of 16, got 8"):
        varlen_attn(q, pool, pool, cu, None, 6, 16, block_table=table, seqused_k=used)
    pool = torch.randn(4, 16, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_table needs seqused_k"):
        varlen_attn(q, pool, pool, cu, None, 6, 16, block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[1\] refers to page 9"):
        varlen_attn(q, pool, pool, cu, None, 6, 16, block_table=table + torch.tensor([[0, 0], [9, 9]], dtype=torch.int32,
                                                                                          device=DEVICE),
                    seqused_k=used)
    with pytest.raises(ValueError, match=r"seqused_k\[1\] = 40 is out of range"):
        varlen_attn(q, pool, pool, cu, None, 6, 40, block_table=table,
                    seqused_k=torch.tensor([4, 40], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_index_tensors_read_as_their_values(kernel, use_kernel):
    """cu_seq_* / seqused_k views with a stride of 2 and a block_table whose columns are not
    adjacent give what their contiguous copies give (the kernels read them as dense rows)."""
    use_kernel(kernel)
    q, k, v, cu = _valid()
    strided = lambda t: torch.stack([t, t], -1)[..., 0]  # the same values, last stride 2
    want = varlen_attn(q, k, v, cu, cu, 6, 6)
    torch.testing.assert_close(varlen_attn(q, k, v, strided(cu), strided(cu), 6, 6), want, rtol=0, atol=0)
    pool = torch.randn(4, 16, 2, 16, device=DEVICE)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEVICE)
    used = torch.tensor([4, 6], dtype=torch.int32, device=DEVICE)
    want = varlen_attn(q, pool, pool, cu, None, 6, 32, block_table=table, seqused_k=used)
    got = varlen_attn(q, pool, pool, strided(cu), None, 6, 32, block_table=table.t().contiguous().t(),
                      seqused_k=strided(used))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_max_lengths_take_integers_of_any_kind():
    q, k, v, cu = _valid()
    import numpy as np

    want = varlen_attn(q, k, v, cu, cu, 6, 6)
    torch.testing.assert_close(varlen_attn(q, k, v, cu, cu, np.int64(6), torch.tensor(6)), want, rtol=0, atol=0)
    for bad in (6.0, True, torch.tensor(6.0), "6"):
        with pytest.raises(TypeError, match="max_q must be a non-negative int, got"):
            varlen_attn(q, k, v, cu, cu, bad, 6)
    with pytest.raises(ValueError, match="max_k must be a non-negative int, got -1"):
        varlen_attn(q, k, v, cu, cu, 6, -1)


def test_validation_reads_index_tensors_once_per_version(monkeypatch):
    """cu_seq_* are read to the host once per tensor version (a sync each time); an in-place
    change is seen, and so is a block_table that changes after it was checked."""
    q, k, v, cu = _valid()
    reads = []
    original_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or original_tolist(t))
    varlen_attn(q, k, v, cu, cu, 6, 6)
    varlen_attn(q, k, v, cu, cu, 6, 6)
    assert len(reads) == 1, reads  # cu_seq_q and cu_seq_k are one tensor here, read once
    cu[2] = 9  # in place: the next call must see it
    with pytest.raises(ValueError, match=r"cu_seq_q\[-1\] must equal the token count 10, got 9"):
        varlen_attn(q, k, v, cu, cu, 6, 6)
    pool = torch.randn(4, 16, 2, 16, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    used = torch.tensor([4, 6], dtype=torch.int32, device=DEVICE)
    cu2 = _cu([4, 6])
    varlen_attn(q, pool, pool, cu2, None, 6, 16, block_table=table, seqused_k=used)
    table[1, 0] = 9
    with pytest.raises(ValueError, match=r"block_table\[1\] refers to page 9"):
        varlen_attn(q, pool, pool, cu2, None, 6, 16, block_table=table, seqused_k=used)


def test_torch_compile_matches_eager():
    """Under torch.compile the validation runs eagerly (it reads cu_seq_* on the host) and the
    kernel is one custom op with a fake implementation and registered autograd."""
    lq = [5, 9]
    q, k, v = _inputs(lq, lq, 2, 2, 16, torch.float32)
    cu = _cu(lq)
    compiled = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu, cu, 9, 9, window_size=(-1, 0)))
    out = compiled(q, k, v)
    ref = varlen_attn(q, k, v, cu, cu, 9, 9, window_size=(-1, 0))
    assert torch.equal(out, ref)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_pytorch_signature_return_aux_and_num_splits():
    """PyTorch's full signature: ``num_splits`` (attend never splits a row's keys, so every value
    gives the same output) and ``return_aux`` as attend's or PyTorch's AuxRequest; anything else
    for ``return_aux`` is a TypeError naming it."""
    from torch.nn.attention.varlen import AuxRequest as TorchAuxRequest

    q, k, v, cu = _valid()
    base = varlen_attn(q, k, v, cu, cu, 6, 6)
    for n in (None, 0, 1, 4):
        assert torch.equal(varlen_attn(q, k, v, cu, cu, 6, 6, num_splits=n), base)
    out, lse = varlen_attn(q, k, v, cu, cu, 6, 6, return_aux=TorchAuxRequest(lse=True))
    assert torch.equal(out, base) and lse.shape == (2, 10)
    assert torch.equal(varlen_attn(q, k, v, cu, cu, 6, 6, return_aux=TorchAuxRequest()), base)
    with pytest.raises(TypeError, match="return_aux must be an attend.varlen.AuxRequest .* got bool: True"):
        varlen_attn(q, k, v, cu, cu, 6, 6, return_aux=True)
    with pytest.raises(TypeError, match="return_aux .* got dict"):
        varlen_attn(q, k, v, cu, cu, 6, 6, return_aux={"lse": True})
    with pytest.raises(TypeError, match="num_splits must be an int or None, got str"):
        varlen_attn(q, k, v, cu, cu, 6, 6, num_splits="1")
    with pytest.raises(ValueError, match="num_splits must be >= 0 .* got -1"):
        varlen_attn(q, k, v, cu, cu, 6, 6, num_splits=-1)
    with pytest.raises(TypeError, match="enable_gqa must be a bool .* got int: 1"):
        varlen_attn(q, k, v, cu, cu, 6, 6, enable_gqa=1)
    with pytest.raises(ValueError, match="scale must be a finite float or None, got nan"):
        varlen_attn(q, k, v, cu, cu, 6, 6, scale=float("nan"))


def test_per_sequence_oracle_agrees_with_pytorch():
    """The loop above is a plain definition; per sequence it equals PyTorch's own float64 SDPA with
    the window's band as a bool mask (rows with no visible key: 0 in both)."""
    from torch.nn.attention import SDPBackend as TorchBackend
    from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel

    lq, lk = [3, 7, 0, 5], [9, 4, 2, 5]
    q, k, v = (t.detach().double() for t in _inputs(lq, lk, 4, 2, 8, torch.float64))
    for window in WINDOWS:
        out, _ = _loop(q, k, v, lq, lk, window, torch.float64)
        cq, ck = [0] + torch.tensor(lq).cumsum(0).tolist(), [0] + torch.tensor(lk).cumsum(0).tolist()
        for b in range(len(lq)):
            qb, kb, vb = (t[c[b]:c[b + 1]].transpose(0, 1) for t, c in ((q, cq), (k, ck), (v, ck)))
            with torch_sdpa_kernel(TorchBackend.MATH):
                want = torch.nn.functional.scaled_dot_product_attention(
                    qb, kb, vb, attn_mask=_band(lq[b], lk[b], window), enable_gqa=True)
            assert torch.allclose(out[cq[b]:cq[b + 1]].transpose(0, 1), want, atol=1e-12), (window, b)

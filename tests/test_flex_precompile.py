"""The flex backward's warmup: a forward that autograd will differentiate starts compiling its
backward's kernel while its own compiles (``_flex.dispatch._backward_warmup``,
``launch.flex_backward(warmup=True)``). The warmup must specialize exactly as the real launch, so
that launch compiles nothing; a failed warmup must cost nothing but time."""

from __future__ import annotations

import concurrent.futures
import threading
import traceback

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

import attend.flex_attention as flex
from attend._flex import dispatch
from attend.kernels import core, forkcompile, launch, versions
from attend.kernels.options import kernel_options
from conftest import DEVICE
from test_flex import _with_captures, assert_grads_match_dense, dense_reference

E = 16
CASES = ["score_grad_mask_gqa_ragged", "mask_rows_layout_even", "score_key_batch_1"]


def _case(name: str, seed: int = 0):
    """(q, k, v, score_mod, mask_mod, block_mask, captures that require grad, flex kwargs)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    if name == "score_grad_mask_gqa_ragged":  # a trained table, a document mask over captured ids, GQA 2:1
        B, Hq, Hkv, L, S = 2, 2, 1, 50, 75
        table = (0.5 * rand(Hq, L + S)).requires_grad_()
        doc = torch.randint(0, 3, (B, S), generator=g).sort(-1).values.to(DEVICE)
        sm = lambda s, b, h, q_idx, kv_idx: s + table[h, q_idx - kv_idx + S]
        mm = lambda b, h, q_idx, kv_idx: (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
        q, k, v = (rand(B, h, n, E).requires_grad_() for h, n in ((Hq, L), (Hkv, S), (Hkv, S)))
        return q, k, v, sm, mm, flex.create_block_mask(mm, B, None, L, S, device=DEVICE, BLOCK_SIZE=32), [table], \
            dict(enable_gqa=True)
    if name == "mask_rows_layout_even":  # a model's (B, L, H, D) projections seen as (B, H, L, D)
        B, H, L = 2, 2, 64
        q, k, v = (rand(B, L, H, E).transpose(1, 2).requires_grad_() for _ in range(3))
        mm = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) | (kv_idx < 8)  # prefix-LM: a band would run the dense kernels
        return q, k, v, None, mm, flex.create_block_mask(mm, None, None, L, L, device=DEVICE, BLOCK_SIZE=32), [], {}
    assert name == "score_key_batch_1"  # a captured bias that does not train, keys broadcast over the batch
    B, H, L, S = 2, 2, 40, 56
    slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32, device=DEVICE))
    sm = lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx).abs()
    mm = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 20
    q = rand(B, H, L, E).requires_grad_()
    k, v = (rand(1, H, S, E).requires_grad_() for _ in range(2))
    return q, k, v, sm, mm, flex.create_block_mask(mm, None, None, L, S, device=DEVICE, BLOCK_SIZE=16), [], {}


class _Record:
    """Stands for core.attn_bwd: records the warmup's and the real launch's keyword arguments
    (the launch runs nothing)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda **kw: self.calls.append(("launch", grid, kw))

    def warmup(self, *args, grid, **kw):
        assert not args, "kernels are launched by argument name"
        self.calls.append(("warmup", grid, kw))


def _spec(x):
    """What Triton compiles a kernel argument by: a tensor's pointer type and 16-byte alignment
    (Triton's own specialization), anything else (ints, constexprs, generated functions) itself."""
    if isinstance(x, torch.Tensor):
        return native_specialize_impl(BaseBackend, x, False, True, True)
    if isinstance(x, tuple):
        return tuple(_spec(e) for e in x)
    return x


def _settle_warmups() -> None:
    """Wait for every warmup recorded so far: a pending one's completion callback would write its
    key back after the test empties the table."""
    for futs in list(dispatch._WARMUPS.values()):
        concurrent.futures.wait(futs or [])


@pytest.fixture
def warmups(monkeypatch):
    """Forwards warm their backward up here too (on the CPU only a GPU run does), from none started
    (an earlier test's warmups finished first)."""
    _settle_warmups()
    monkeypatch.setattr(dispatch, "_warms_up", lambda q: True)
    monkeypatch.setattr(dispatch, "_WARMUPS", {})


@pytest.mark.parametrize("name", CASES)
def test_warmup_specializes_as_the_real_backward(name, warmups, monkeypatch):
    """The warmup's launch arguments equal the real backward's: the same grid, argument names,
    int values and constexprs (tiles, flags, generated functions), and pointers of the same dtype
    and alignment; what the backward writes (dQ, dK, dV, the row statistics) and dO are meta
    tensors there, never allocated."""
    q, k, v, sm, mm, bm, trained, kw = _case(name)
    rec, stats = _Record(), _Record()
    monkeypatch.setattr(core, "attn_bwd", rec)
    monkeypatch.setattr(core, "attn_bwd_preprocess", stats)  # the row statistics' kernel: warmed up too
    monkeypatch.setattr(launch, "_PRE_LAUNCH", lambda grid, args, flags, warps, stages: stats.calls.append(
        ("launch", grid, dict(args, **flags, num_warps=warps, num_stages=stages))))
    out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm, **kw)
    # out.sum()'s gradient is expanded (stride 0): the backward reads it from a copy in out's layout
    loss = out.sum() if name == "score_key_batch_1" else (out * torch.randn_like(out)).sum()
    torch.autograd.grad(loss, [q, k, v, *trained])
    assert [c[0] for c in rec.calls] == ["warmup", "launch"], rec.calls
    assert [c[0] for c in stats.calls] == ["warmup", "launch"], stats.calls
    (_, warm_grid, warm), (_, grid, real) = stats.calls
    warm = {a: x for a, x in warm.items() if a not in versions.COMPILE_OPTIONS}  # the Launcher adds them itself
    assert warm_grid == grid and warm.keys() == real.keys()
    for arg in real:
        w, r = _spec(warm[arg]), _spec(real[arg])
        assert w == r, f"{name}: the row statistics' {arg} warmed up as {w!r}, launched as {r!r}"
    (_, warm_grid, warm), (_, grid, real) = rec.calls
    assert warm_grid == grid
    assert warm.keys() == real.keys()
    for arg in real:
        w, r = _spec(warm[arg]), _spec(real[arg])
        assert w == r, f"{name}: {arg} warmed up as {w!r}, launched as {r!r}"
    assert (real["SCORE_GRADS"] is not None) == bool(trained)  # the capture gradient's scatter is compiled in
    written = ["DQ", "DK", "DV", "DO", "NLSE2", "Delta", *(["SCORE_GRADS"] if trained else [])]
    for arg in written:
        tensors = warm[arg] if isinstance(warm[arg], tuple) else (warm[arg],)
        assert all(t.device.type == "meta" for t in tensors), f"{name}: the warmup allocated {arg}"


def test_split_backward_warms_up_each_launch_as_it_runs_and_matches_one_launch(warmups, monkeypatch):
    """KernelOptions.flex_bwd_split: the dK / dV programs and the dQ programs as two launches, each
    warmed up on a thread of its own with the arguments it then launches with (DKDV_ONLY / DQ_ONLY,
    grids n_kv and n_q); dQ, dK and dV equal the one launch's bit for bit (each element has one
    writer); the captured table's gradient is summed by atomics, whose order a GPU does not fix, so
    it equals the one launch's within fp32 rounding there (bit for bit under the interpreter)."""
    q, k, v, sm, mm, bm, trained, kw = _case("score_grad_mask_gqa_ragged", seed=4)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=DEVICE)
    grads = {}
    for split in (False, True):
        with kernel_options(flex_bwd_split=split):
            out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm, **kw)
            grads[split] = torch.autograd.grad((out * dout).sum(), [q, k, v, *trained])
    for a, b, name in zip(grads[False], grads[True], ["dq", "dk", "dv", "dtable"]):
        if name == "dtable" and DEVICE == "cuda":
            # atomics in another order: fp32 rounding of a sum, relative to the largest entry
            err = (a - b).abs().max().item()
            assert err <= 1e-4 * a.abs().max().item(), f"dtable differs by {err} between one launch and two"
        else:
            assert torch.equal(a, b), f"{name} differs between one launch and two"
    rec = _Record()
    monkeypatch.setattr(core, "attn_bwd", rec)
    _settle_warmups()
    dispatch._WARMUPS.clear()
    with kernel_options(flex_bwd_split=True):
        out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm, **kw)
        torch.autograd.grad((out * dout).sum(), [q, k, v, *trained])
    warm = {(c[2]["DKDV_ONLY"], c[2]["DQ_ONLY"]): c for c in rec.calls if c[0] == "warmup"}
    real = {(c[2]["DKDV_ONLY"], c[2]["DQ_ONLY"]): c for c in rec.calls if c[0] == "launch"}
    assert sorted(warm) == sorted(real) == [(False, True), (True, False)], rec.calls
    assert [c[0] for c in rec.calls][-2:] == ["launch", "launch"] and rec.calls[-2][2]["DKDV_ONLY"], rec.calls
    for part in real:
        (_, wg, w), (_, rg, r) = warm[part], real[part]
        assert wg == rg and w.keys() == r.keys()
        for arg in r:
            assert _spec(w[arg]) == _spec(r[arg]), f"{part}: {arg} warmed up as {w[arg]!r}, launched as {r[arg]!r}"
    n_kv, n_q = real[(True, False)][1][0], real[(False, True)][1][0]
    one = [c for c in _launch_grids(q, k, v, sm, mm, bm, kw, monkeypatch) if c[0] == "launch"]
    assert [c[1] for c in one] == [(n_kv + n_q,)], "the two grids split the one launch's programs"


def _launch_grids(q, k, v, sm, mm, bm, kw, monkeypatch):
    rec = _Record()
    monkeypatch.setattr(core, "attn_bwd", rec)
    out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm, **kw)
    torch.autograd.grad(out.sum(), [q, k, v])
    return rec.calls


def test_a_failed_warmup_still_gives_correct_gradients(warmups, monkeypatch):
    """A warmup that raises is swallowed: the backward compiles and runs as it would without one,
    and its gradients (the trained table's included) match the float64 definition."""
    real = launch.flex_backward
    tried = []

    def failing(*args, warmup=False, **kw):
        if warmup:
            tried.append(True)
            raise RuntimeError("the warmup failed")
        return real(*args, **kw)

    monkeypatch.setattr(launch, "flex_backward", failing)
    q, k, v, sm, mm, bm, trained, kw = _case("score_grad_mask_gqa_ragged", seed=1)
    before = dict(dispatch.PATHS)
    out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), [q, k, v, *trained])
    assert tried == [True]
    assert dispatch.PATHS["fused_backward"] == before["fused_backward"] + 1
    reference = lambda ls, dt: dense_reference(*ls[:3], _with_captures(sm, trained, ls[3:]), mm, dt)[0]
    assert_grads_match_dense(out, grads, (q, k, v, *trained), reference, dout,
                             ["dq", "dk", "dv"] + ["dtable"] * len(trained))


def test_a_warmup_that_cannot_start_costs_nothing(warmups, monkeypatch):
    """Where the warmup thread takes no work (at interpreter shutdown, concurrent.futures refuses
    it for a thread that outlives the main one), the forward and backward run as with the knob off."""
    import concurrent.futures

    closed = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    monkeypatch.setattr(dispatch, "_WARMUP_THREAD", closed)
    q, k, v, sm, mm, bm, trained, kw = _case("mask_rows_layout_even", seed=2)
    out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), [q, k, v])
    assert dispatch._WARMUPS == {}  # nothing recorded: a later forward tries again
    assert_grads_match_dense(out, grads, (q, k, v), lambda ls, dt: dense_reference(*ls, sm, mm, dt)[0], dout,
                             ["dq", "dk", "dv"])


def test_one_warmup_per_kernel_and_none_when_turned_off(warmups, monkeypatch):
    """A second forward that selects the same backward kernel starts no warmup (a warm process pays
    nothing), a new mask structure does; none with ``flex_bwd_precompile=False``, and none in
    deterministic mode with a capture gradient (the blocked backward runs there)."""
    started = []  # counted when submitted: on a GPU the worker may still be compiling an earlier one
    pool = dispatch._WARMUP_THREAD

    class _Counting:
        def submit(self, fn, *a, **kw):
            started.append(1)
            return pool.submit(fn, *a, **kw)

    monkeypatch.setattr(dispatch, "_WARMUP_THREAD", _Counting())
    g = torch.Generator().manual_seed(2)
    table = torch.randn(1, 64, generator=g).to(DEVICE).requires_grad_()
    sm = lambda s, b, h, q_idx, kv_idx: s + table[h, q_idx - kv_idx + 32]

    def forward(mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx):
        q, k, v = (torch.randn(1, 1, 32, E, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
        bm = flex.create_block_mask(mask_mod, None, None, 32, 32, device=DEVICE, BLOCK_SIZE=16)
        return flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm)

    with kernel_options(flex_bwd_precompile=False):
        forward()
    assert started == []
    forward()
    forward()
    assert len(started) == 1
    forward(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 8)
    assert len(started) == 2
    _settle_warmups()
    dispatch._WARMUPS.clear()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        forward()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(started) == 2


def _drain_warmups() -> None:
    """Wait until the warmup pool runs nothing: an earlier test's warmup (its futures dropped with
    its ``_WARMUPS``) may still be compiling, and would add to the count below. Every worker waits on
    one barrier with this thread, so none can still be inside an earlier task."""
    n = dispatch._WARMUP_THREAD._max_workers
    barrier = threading.Barrier(n + 1)
    futs = [dispatch._WARMUP_THREAD.submit(barrier.wait, 600) for _ in range(n)]
    barrier.wait(600)
    for f in futs:
        f.result()


def _backward_variants(kernel=None) -> int:
    """Compiled variants of the core's backward (or ``kernel``; a GPU run: the interpreter compiles
    nothing)."""
    return sum(len(c[0]) for c in (kernel or core.attn_bwd).device_caches.values())


@pytest.mark.skipif(DEVICE != "cuda", reason="counts Triton compiles: the interpreter compiles nothing")
def test_first_backward_after_a_warmed_forward_compiles_nothing(monkeypatch):
    """A mod never seen in this process: its backward's kernel is compiled once, by the warmup the
    forward started, and the backward's own launch compiles nothing; nor does its row statistics'
    kernel (head dim 80: a specialization no other test builds). (Counted by the JIT's cache:
    Triton's compile hooks cannot serialize the generated functions the core takes as constexprs.)"""
    _drain_warmups()
    monkeypatch.setattr(dispatch, "_WARMUPS", {})
    n = 200
    g = torch.Generator().manual_seed(3)
    table = torch.randn(2, 2 * n, generator=g).to(DEVICE).requires_grad_()
    # an op chain no other test's mod has (constants are runtime data, not structure): new kernels here
    sm = lambda s, b, h, q_idx, kv_idx: torch.sigmoid(torch.tanh(s) * table[h, q_idx - kv_idx + n]) + s
    bm = flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=DEVICE)
    q, k, v = (torch.randn(1, 2, n, 80, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(3))
    before, stats_before = _backward_variants(), _backward_variants(core.attn_bwd_preprocess)
    out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm)
    started = [f for futs in dispatch._WARMUPS.values() if futs is not None for f in futs]
    for f in started:
        f.result()  # raises if the warmup failed
    assert len(dispatch._WARMUPS) == 1 and _backward_variants() == before + 1, "the forward warmed up no backward"
    assert _backward_variants(core.attn_bwd_preprocess) == stats_before + 1, "no row statistics' kernel warmed up"
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v, table))
    torch.cuda.synchronize()
    assert _backward_variants() == before + 1, "the backward compiled a kernel the warmup had not"
    assert _backward_variants(core.attn_bwd_preprocess) == stats_before + 1, "the row statistics' kernel compiled again"
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon dK / dV kernel runs on sm_90")
def test_gluon_route_warms_up_both_launches(monkeypatch):
    """A new mod over a band on the Gluon route: the forward's warmup compiles the Gluon dK / dV
    kernel and the core's dQ programs (on two threads), and the backward compiles neither again."""
    from attend.kernels import ws_bwd

    _drain_warmups()
    monkeypatch.setattr(dispatch, "_WARMUPS", {})
    gluon_variants = lambda: sum(len(c[0]) for c in ws_bwd.attn_bwd_dkdv_ws.device_caches.values())
    n = 256
    g = torch.Generator().manual_seed(5)
    # an op chain no other test's mod has: new kernels here
    sm = lambda s, b, h, q_idx, kv_idx: torch.tanh(torch.sigmoid(s) - 0.5) * 3.0 + s
    bm = flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=DEVICE)
    q, k, v = (torch.randn(1, 2, n, 128, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(3))
    parts, failed, real = [], [], dispatch._warm_backward  # (the warmups may finish before the forward does)

    def warm(*a):  # a[7]: the part; a failed warmup's error is kept for the assertion below
        parts.append(a[7])
        try:
            return real(*a)
        except BaseException:
            failed.append(f"the {a[7]} warmup raised:\n{traceback.format_exc()}")
            raise

    monkeypatch.setattr(dispatch, "_warm_backward", warm)
    before = (_backward_variants(), gluon_variants())
    forks_before = dict(forkcompile.COUNTS)
    with kernel_options(bwd_ws_min_seq_bucket=0):  # the Gluon dK / dV kernel at this length too
        out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm)
    assert sorted(parts) == ["dkdv", "dq"], "the Gluon kernel and the dQ programs, each on a warmup thread"
    _drain_warmups()
    assert not failed, failed[0]
    warmed = (_backward_variants(), gluon_variants())
    forks = {what: forkcompile.COUNTS[what] - count for what, count in forks_before.items()}
    assert warmed == (before[0] + 1, before[1] + 1), f"(core, Gluon) variants {before} -> {warmed}; forks {forks}"
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    torch.cuda.synchronize()
    assert (_backward_variants(), gluon_variants()) == warmed, "the backward compiled a kernel the warmup had not"
    assert all(torch.isfinite(t).all() for t in grads)

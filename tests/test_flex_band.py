"""Band mask_mods on the dense kernels (attend/_flex/band.py): which mods are recognized as a band,
the route's results and gradients against the float64 definition, and every case it declines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.attention.flex_attention as tflex

import attend.flex_attention as flex
from attend._flex import band, dispatch
from attend._flex.block_mask import create_block_mask as _create_block_mask
from attend._flex.trace import trace
from attend._layout import Band
from attend.kernels.options import kernel_options
from conftest import DEVICE, assert_scaled_close
from test_flex import _close_with_empty_rows, assert_matches_definition, dense_reference

W = 20
_BIAS = torch.zeros(4)

RECOGNIZED = {
    "causal": (lambda b, h, q, kv: q >= kv, Band(-1, 0)),
    "causal_window": (lambda b, h, q, kv: (q >= kv) & (q - kv <= W), Band(W, 0)),
    "symmetric_window": (lambda b, h, q, kv: (q - kv).abs() <= W, Band(W, W)),
    "shifted_diagonal": (lambda b, h, q, kv: kv <= q + 3, Band(-1, 3)),
    "window_written_on_keys": (lambda b, h, q, kv: (kv + W >= q) & (2 * kv <= 2 * q), Band(W, 0)),
    "floor_divided_difference": (lambda b, h, q, kv: ((q - kv) // 4 <= 1) & (kv <= q), Band(7, 0)),
    "window_past_every_query": (lambda b, h, q, kv: (q >= kv) & (q - kv < 10_000), Band(-1, 0)),
}
NOT_BANDS = {
    "int32_wraparound": lambda b, h, q, kv: (q >= kv) & (kv + (2 ** 31 - 1) >= q),  # kv + c wraps: keeps kv = 0 only
    "strictly_below_diagonal": lambda b, h, q, kv: q > kv,  # a band without the diagonal
    "every_other_key": lambda b, h, q, kv: (q - kv) % 2 == 0,  # a function of q - kv, not one interval
    "query_alone": lambda b, h, q, kv: (q >= 5) & (q >= kv),
    "head_dependent": lambda b, h, q, kv: q - kv <= h,
    "blocks_of_four": lambda b, h, q, kv: q // 4 >= kv // 4,
    "sum_of_indices": lambda b, h, q, kv: q + kv > 3,
    "captured_tensor": lambda b, h, q, kv: (q >= kv) & (_BIAS[h] == 0),
    "float_arithmetic": lambda b, h, q, kv: (q - kv).float() / W < 1.5,
    "runtime_multiple": lambda b, h, q, kv: 3 * q >= 3 * kv,  # 3 is a runtime number: not provably affine
}


@pytest.mark.parametrize("name", list(RECOGNIZED))
def test_band_masks_are_recognized(name):
    mod, expected = RECOGNIZED[name]
    assert band.band(trace(mod, "mask"), 90, 70) == expected


@pytest.mark.parametrize("name", list(NOT_BANDS))
def test_other_masks_are_not_bands(name):
    assert band.band(trace(NOT_BANDS[name], "mask"), 64, 64) is None


# Bottom-right bands: queries at the end of their keys (decode steps, chunked prefill), as the
# transformers integration writes them (kv_idx against q_idx + S - L): (mod, L, S, band)
BOTTOM_RIGHT = {
    "decode_causal": (lambda b, h, q, kv: kv <= q + 1023, 1, 1024, Band(-1, -1, False)),  # every key
    "decode_window": (lambda b, h, q, kv: (kv <= q + 1023) & (kv > q + 1023 - 512), 1, 1024, Band(511, -1, True)),
    "chunk_causal": (lambda b, h, q, kv: kv <= q + 960, 64, 1024, Band(-1, 0, True)),
    "chunk_window": (lambda b, h, q, kv: (kv <= q + 160) & (kv > q + 160 - 100), 64, 224, Band(99, 0, True)),
}


@pytest.mark.parametrize("name", list(BOTTOM_RIGHT))
def test_bottom_right_bands_are_recognized(name):
    mod, L, S, expected = BOTTOM_RIGHT[name]
    assert band.band(trace(mod, "mask"), L, S) == expected


@pytest.mark.parametrize("name", ["decode_window", "chunk_window"])
def test_bottom_right_band_route_matches_float64(name):
    """A decode step's and a chunk's window on the dense kernels, bottom-right aligned; and the
    same window with a softcap on the band hooks."""
    mod, L, S, _ = BOTTOM_RIGHT[name]
    q, k, v = _inputs(L, S, seed=11)
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=32)
    softcap = SCORES["softcap"]
    for score, path in ((None, "band"), (softcap, "band_hooks")):
        before = dispatch.PATHS[path]
        out = flex.flex_attention(q, k, v, score, bm, enable_gqa=True)
        assert dispatch.PATHS[path] == before + 1, (name, path)
        go = torch.randn_like(out)
        grads = torch.autograd.grad((out * go).sum(), (q, k, v))
        res = {}
        for dt in (torch.float64, torch.float32):
            leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
            o = dense_reference(*leaves, score, mod, dt)[0]
            res[dt] = (o, torch.autograd.grad((o * go.to(dt)).sum(), leaves))
        assert_scaled_close(out, res[torch.float64][0], res[torch.float32][0], what=f"{name} {path} out")
        for n, a, r, s_ in zip("qkv", grads, res[torch.float64][1], res[torch.float32][1]):
            assert_scaled_close(a, r, s_, k=6.0, what=f"{name} {path} d{n}")


def _inputs(L, S, HQ=2, HKV=1, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(2, h, n, E, generator=g).to(DEVICE).requires_grad_()
    return mk(HQ, L), mk(HKV, S), mk(HKV, S)


@pytest.mark.parametrize("name,L,S", [("causal", 70, 90), ("causal_window", 90, 40), ("symmetric_window", 64, 64),
                                      ("shifted_diagonal", 90, 70)])
def test_band_route_matches_float64(name, L, S):
    """Output, LSE (natural log; -inf on a row that keeps no key: causal_window at L > S) and the
    gradients of out and lse, GQA 2:1, on the dense path and never the flex kernel."""
    mod = RECOGNIZED[name][0]
    q, k, v = _inputs(L, S, seed=len(name))
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=32)
    before = dict(dispatch.PATHS)
    out, lse = flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    assert dispatch.PATHS["band"] == before["band"] + 1 and dispatch.PATHS["fused"] == before["fused"]
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse.nan_to_num(neginf=0.0) * gl).sum(), (q, k, v))
    res = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l_, _ = dense_reference(*leaves, None, mod, dt)
        total = (o * go.to(dt)).sum() + (torch.where(torch.isfinite(l_), l_, 0.0) * gl.to(dt)).sum()
        res[dt] = (o, l_, torch.autograd.grad(total, leaves))
    (o64, l64, g64), (o32, l32, g32) = res[torch.float64], res[torch.float32]
    assert_scaled_close(out, o64, o32, what=f"{name} out")
    _close_with_empty_rows(lse, l64, l32, what=f"{name} lse")
    for n, a, r, s in zip("qkv", grads, g64, g32):
        assert_scaled_close(a, r, s, k=6.0, what=f"{name} d{n}")


def test_no_mask_and_no_score_mod_is_dense_attention():
    q, k, v = _inputs(40, 56, HQ=2, HKV=2)
    before = dispatch.PATHS["band"]
    out = flex.flex_attention(q, k, v)
    assert dispatch.PATHS["band"] == before + 1
    assert_scaled_close(out, *(dense_reference(q, k, v, None, None, dt)[0] for dt in (torch.float64, torch.float32)))


def _declined_cases(L, S):
    """name -> (flex_attention kwargs, what to run it under): each must run the flex kernel."""
    causal = RECOGNIZED["causal"][0]
    ours = lambda: flex.create_block_mask(causal, None, None, L, S, device=DEVICE, BLOCK_SIZE=32)
    reassigned = ours()
    reassigned.mask_mod = lambda b, h, q, kv: q >= kv  # same mask, but not the one the lists came from
    return {
        "max_scores_asked": dict(block_mask=ours(), return_aux=flex.AuxRequest(lse=True, max_scores=True)),
        "score_mod": dict(block_mask=ours(), score_mod=lambda s, b, h, q, kv: s * 0.5),  # the band hooks instead
        "pytorch_block_mask": dict(block_mask=tflex.create_block_mask(causal, None, None, L, S, device=DEVICE,
                                                                      BLOCK_SIZE=32)),
        "mask_mod_reassigned": dict(block_mask=reassigned),
        "kernel_options": dict(block_mask=ours(), kernel_options={"BLOCK_M": 32}),
        "flex_bands_off": dict(block_mask=ours()),
    }


def test_band_route_declined_where_lists_or_asks_differ():
    """Where the route cannot know the lists are the band's blocks, or the call asks for what the
    dense kernels do not give (max_scores, a score_mod, tiles), the flex kernel runs; each result
    still matches the definition (the score_mod case: score * 0.5 is scale * 0.5)."""
    L, S = 48, 64
    q, k, v = _inputs(L, S, HQ=2, HKV=2, seed=3)
    causal = RECOGNIZED["causal"][0]
    for name, kw in _declined_cases(L, S).items():
        before = dict(dispatch.PATHS)
        with kernel_options(flex_bands=name != "flex_bands_off"):
            res = flex.flex_attention(q, k, v, **kw)
        out = res[0] if isinstance(res, tuple) else res
        assert dispatch.PATHS["band"] == before["band"], name
        assert dispatch.PATHS["fused"] + dispatch.PATHS["blocked"] == before["fused"] + before["blocked"] + 1, name
        hooked = dispatch.PATHS["band_hooks"] - before["band_hooks"]
        assert hooked == (name == "score_mod"), (name, hooked)  # the others walk the lists
        scale = 0.125 if name == "score_mod" else None
        refs = (dense_reference(q, k, v, None, causal, dt, scale=scale)[0] for dt in (torch.float64, torch.float32))
        assert_scaled_close(out, *refs, what=name)


def test_a_global_number_changed_since_the_block_mask_declines():
    """The lists were built for the window at creation; the mod now reads another window, so the
    lists are not its band's blocks (flex applies the new mod in the listed partial blocks only)."""
    global W
    saved = W
    try:
        mod = lambda b, h, q, kv: (q >= kv) & (q - kv <= W)
        bm = flex.create_block_mask(mod, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
        W = 5
        q, k, v = _inputs(64, 64, HQ=2, HKV=2, seed=4)
        before = dispatch.PATHS["band"]
        out = flex.flex_attention(q, k, v, block_mask=bm)
        assert dispatch.PATHS["band"] == before
        # the old lists cover the narrower window: the result is the new mod's
        assert_scaled_close(out, *(dense_reference(q, k, v, None, mod, dt)[0] for dt in (torch.float64, torch.float32)))
    finally:
        W = saved


def test_a_moved_or_cropped_block_mask_keeps_the_route():
    L, S = 64, 96
    mod = RECOGNIZED["causal_window"][0]
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=32)._adjust(48, 80).to(DEVICE)
    q, k, v = _inputs(48, 80, HQ=2, HKV=2, seed=5)
    before = dispatch.PATHS["band"]
    out = flex.flex_attention(q, k, v, block_mask=bm)
    assert dispatch.PATHS["band"] == before + 1
    assert_scaled_close(out, *(dense_reference(q, k, v, None, mod, dt)[0] for dt in (torch.float64, torch.float32)))


_SLOPES = torch.tensor([0.5, 0.125], device=DEVICE)
SCORES = {
    "alibi": lambda s, b, h, q, kv: s - _SLOPES[h] * (q - kv).abs(),
    "softcap": lambda s, b, h, q, kv: 4.0 * torch.tanh(s / 4.0),
}


@pytest.mark.parametrize("score_name,mask_name,L,S,tma", [
    ("alibi", "causal", 70, 90, False), ("softcap", "causal_window", 90, 40, True),
    ("softcap", "symmetric_window", 64, 64, False), ("alibi", None, 50, 75, True)])
def test_score_mod_over_a_band_matches_float64(score_name, mask_name, L, S, tma):
    """A score_mod with a band mask (or none): the core's forward and backward walk the band by
    arithmetic with the score hooks (no lists, no mask hook; ``tma`` forces the forward's
    tensor-descriptor reads). out, lse, max_scores and the gradients against float64; the lists'
    forward (flex_bands off) agrees."""
    score = SCORES[score_name]
    mod = RECOGNIZED[mask_name][0] if mask_name else None
    q, k, v = _inputs(L, S, seed=L + S)
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=32) if mod else None
    aux = flex.AuxRequest(lse=True, max_scores=True)
    before = dict(dispatch.PATHS)
    with kernel_options(tma=True if tma else None, flex_tma=tma):
        out, got = flex.flex_attention(q, k, v, score, bm, enable_gqa=True, return_aux=aux)
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"] + 1 and dispatch.PATHS["band"] == before["band"]
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), (q, k, v))
    assert dispatch.PATHS["band_hooks_backward"] == before["band_hooks_backward"] + 1
    what = f"{score_name} x {mask_name}"
    assert_matches_definition(out, got, grads, (q, k, v), [], score, mod, go, what)
    with torch.no_grad(), kernel_options(flex_bands=False):
        lists_out = flex.flex_attention(q, k, v, score, bm, enable_gqa=True)
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"] + 1
    refs = (dense_reference(q, k, v, score, mod, dt)[0] for dt in (torch.float64, torch.float32))
    assert_scaled_close(lists_out, *refs, what=f"{what} out through the lists")


def test_a_relabeled_block_mask_keeps_the_route_only_where_create_block_mask_built_it():
    """The transformers integration caches a mask's lists and hands each call a copy holding that
    call's mask_mod (a new closure over the same mask): ``_relabeled`` keeps the band route open
    for lists create_block_mask built, and opens none for lists from from_kv_blocks."""
    L = S = 64
    q, k, v = _inputs(L, S, HQ=2, HKV=2, seed=6)
    make = lambda: (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    built = flex.create_block_mask(make(), None, None, L, S, device=DEVICE, BLOCK_SIZE=32)
    listed = flex.BlockMask.from_kv_blocks(built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks,
                                           built.full_kv_indices, BLOCK_SIZE=32, seq_lengths=(L, S))
    for bm, routed in ((built._relabeled(make()), True), (listed._relabeled(make()), False)):
        before = dispatch.PATHS["band"]
        out = flex.flex_attention(q, k, v, block_mask=bm)
        assert dispatch.PATHS["band"] == before + routed
        assert_scaled_close(out, *(dense_reference(q, k, v, None, make(), dt)[0] for dt in (torch.float64, torch.float32)))


def _routes(bm, L, S) -> bool:
    q, k, v = _inputs(L, S, HQ=2, HKV=2, seed=7)
    before = dispatch.PATHS["band"]
    flex.flex_attention(q, k, v, block_mask=bm)
    return dispatch.PATHS["band"] == before + 1


def test_changed_lists_close_the_route():
    """The record of how create_block_mask built the lists holds only while they are the same
    tensors, unchanged: a replaced list, an in-place change and a longer _adjust close the route
    (the lists then say something else than the band)."""
    L = S = 64
    make = lambda: flex.create_block_mask(RECOGNIZED["causal"][0], None, None, L, S, device=DEVICE, BLOCK_SIZE=16)
    assert _routes(make(), L, S)
    replaced = make()
    replaced.full_kv_num_blocks = replaced.full_kv_indices = None
    assert not _routes(replaced, L, S)
    in_place = make()
    in_place.kv_num_blocks.zero_()
    assert not _routes(in_place, L, S)
    longer = make()._adjust(96, 96)
    assert not longer._lists_recorded()
    with pytest.raises(ValueError, match="4 query blocks.*need 6"):
        flex.flex_attention(*_inputs(96, 96, HQ=2, HKV=2), block_mask=longer)


def test_captured_gradients_and_lse_gradient_over_a_band():
    """A trained relative-position table and ALiBi slopes, a gradient into the lse, GQA 2:1: the
    band's dQ programs scatter the captures' gradient (each pair once), against float64."""
    L, S = 70, 90
    q, k, v = _inputs(L, S, seed=8)
    table = (0.5 * torch.randn(2, L + S, generator=torch.Generator().manual_seed(9))).to(DEVICE).requires_grad_()
    slopes = torch.tensor([0.3, 0.1], device=DEVICE).requires_grad_()
    score = lambda s, b, h, q_i, kv_i: s + table[h, q_i - kv_i + S] - slopes[h] * (q_i - kv_i).abs()
    mod = RECOGNIZED["causal_window"][0]
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=32)
    before = dict(dispatch.PATHS)
    out, lse = flex.flex_attention(q, k, v, score, bm, enable_gqa=True, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    leaves = (q, k, v, table, slopes)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), leaves)
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"] + 1
    assert dispatch.PATHS["band_hooks_backward"] == before["band_hooks_backward"] + 1
    res = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        sm = lambda s, b, h, q_i, kv_i: s + ls[3][h, q_i - kv_i + S] - ls[4][h] * (q_i - kv_i).abs()
        o, l_, _ = dense_reference(*ls[:3], sm, mod, dt)
        res[dt] = torch.autograd.grad((o * go.to(dt)).sum() + (l_ * gl.to(dt)).sum(), ls)
    # dslopes sums dS * |q - kv| over every kept position of a head (about 2 * 70 * 46 terms) by
    # atomics in any order, where torch sums pairwise: its floor grows with the root of that count
    terms = [1.0, 1.0, 1.0, 1.0, (2 * L * 46) ** 0.5]
    for n, a, r, s_, f in zip(["dq", "dk", "dv", "dtable", "dslopes"], grads, res[torch.float64], res[torch.float32],
                              terms):
        assert_scaled_close(a, r, s_, k=6.0, what=n, floor_scale=f)


@pytest.mark.parametrize("mask_name,L,S,per_head", [
    ("causal_window", 70, 45, False), (None, 35, 51, True),
], ids=["window-L>S", "no-mask"])
def test_a_relative_table_gradient_from_the_diagonal_pass(mask_name, L, S, per_head, monkeypatch):
    """KernelOptions.flex_diagonal_pass: a table indexed by q_idx - kv_idx (per head or shared) gets
    its gradient from programs that each own one block diagonal (core._diagonal_pass), not the dQ
    programs' scatter: against float64, every gradient, with ragged lengths, GQA, bands whose block
    diagonals start below and above the main one, and no mask (every diagonal)."""
    from attend.kernels import core, launch

    launches = []

    class Recorded:  # core.attn_bwd, recording each launch's DIAG_ONLY
        def __getitem__(self, grid):
            return lambda **kw: (launches.append(kw.get("DIAG_ONLY", False)), core.attn_bwd[grid](**kw))[1]

    monkeypatch.setattr(launch, "core", SimpleNamespace(attn_bwd=Recorded()))
    q, k, v = _inputs(L, S, seed=21)
    g = torch.Generator().manual_seed(22)
    table = (0.5 * torch.randn(*((2,) if per_head else ()), L + S, generator=g)).to(DEVICE).requires_grad_()
    pick = (lambda t, h, i: t[h, i]) if per_head else (lambda t, h, i: t[i])
    score = lambda s, b, h, q_i, kv_i: 5.0 * torch.tanh(s / 5.0) + pick(table, h, q_i - kv_i + S)
    mod = RECOGNIZED[mask_name][0] if mask_name else None
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=32) if mod else None
    leaves = (q, k, v, table)
    go = torch.randn(2, 2, L, 16, generator=g).to(DEVICE)
    got = {}
    for on in (True, False):
        before = dict(dispatch.PATHS)
        launches.clear()
        with kernel_options(flex_diagonal_pass=on):
            out = flex.flex_attention(q, k, v, score, bm, enable_gqa=True)
            got[on] = torch.autograd.grad((out * go).sum(), leaves)
        assert dispatch.PATHS["band_hooks_backward"] == before["band_hooks_backward"] + 1
        assert launches.count(True) == int(on), launches
    res = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        sm = lambda s, b, h, q_i, kv_i: 5.0 * torch.tanh(s / 5.0) + pick(ls[3], h, q_i - kv_i + S)
        o, _, _ = dense_reference(*ls[:3], sm, mod, dt)
        res[dt] = torch.autograd.grad((o * go.to(dt)).sum(), ls)
    for on in (True, False):
        for n, a, r, s_ in zip(["dq", "dk", "dv", "dtable"], got[on], res[torch.float64], res[torch.float32]):
            assert_scaled_close(a, r, s_, k=6.0, what=f"{n} ({'diagonal pass' if on else 'dQ scatter'})")


@pytest.mark.parametrize("L,S,blocks", [(90, 70, (32, 32)), (64, 64, (16, 16)), (200, 130, (64, 32)), (1, 300, (128, 128)),
                                        (300, 1, (32, 128))])
def test_band_blocks_by_arithmetic_equal_the_evaluated_ones(L, S, blocks):
    """create_block_mask classifies a band's blocks by arithmetic (no mask evaluated, no device
    sync): the same lists as evaluating the mask at every position, for every recognized band,
    ragged ends and uneven block sizes included."""
    from attend._flex.block_mask import classify

    for name, (mod, _) in RECOGNIZED.items():
        graph = trace(mod, "mask")
        lo_hi = band.kept(graph, L, S)
        assert lo_hi is not None, name
        fast = band.block_status(*lo_hi, L, S, *blocks, torch.device("cpu"))
        slow = classify(graph, 1, 1, L, S, *blocks, "cpu", impl="torch", bounds=False)[0, 0]
        assert torch.equal(fast, slow), (name, fast, slow)
        made = flex.create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=blocks)
        forced = _create_block_mask(mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=blocks, _impl="torch")
        for a in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(made, a), getattr(forced, a)), (name, a)


def _caps_need_grad(caps: list) -> bool:
    return any(c.requires_grad for c in caps)


def _hopper_gluon() -> bool:
    from attend.kernels import versions

    return DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9 and versions.usable("gluon_forward")


_D128 = 128
_TABLE_S = 640  # the captured table's span of q_idx - kv_idx
_GLUON_SCORES = {
    "softcap": lambda caps: (lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)),
    "alibi": lambda caps: (lambda s, b, h, q, kv: s - caps[0][h] * (q - kv).abs()),
    "softcap_table": lambda caps: (lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0) + caps[0][h, q - kv + _TABLE_S]),
    "rows_only": lambda caps: (lambda s, b, h, q, kv: 0.01 * q + b + 0.25 * h),  # reads no score: [BM, 1]
}


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon forward runs on sm_90 GPUs")
@pytest.mark.parametrize("score_name,mask_name,L,S,HQ,HKV,views", [
    ("softcap", "causal", 300, 300, 4, 2, False), ("alibi", "causal_window", 257, 400, 4, 4, False),
    ("softcap_table", None, 200, 333, 2, 1, False), ("softcap", "symmetric_window", 384, 384, 4, 2, True),
    ("alibi", None, 130, 256, 4, 4, True), ("rows_only", "causal", 2100, 2100, 2, 1, True),
    ("softcap", "chunk_window", 128, 288, 2, 2, False)])
@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-programs", "fused-dq"])
def test_score_mod_over_a_band_on_the_gluon_forward(score_name, mask_name, L, S, HQ, HKV, views, fused_dq,
                                                    monkeypatch):
    """On sm_90 at D = 128 in bf16, a score_mod over a band (or no mask) runs on the Gluon forward
    with the generated hook (KernelOptions.flex_gluon), and its backward's dK / dV on the Gluon
    kernel with the hook and its derivative where the tensors are contiguous (the core's dQ programs
    beside it, scattering a trained capture's gradient; else the core's whole backward): out, lse and every
    gradient (a captured table's too) against float64, with ragged lengths, GQA, a bottom-right
    window and a model's (B, S, H, D) views (packed sequences); the core's forward (flex_gluon off)
    agrees. ``fused_dq`` (KernelOptions.bwd_ws_fused_dq): dQ from the Gluon kernel too, except where a
    capture needs a gradient (the dQ programs take it)."""
    from attend.kernels import launch

    dkdv_calls = []  # launches (whether dQ was fused), not the backward warmup's compile (warmup=True)
    real_dkdv = launch.ws_bwd.dkdv
    monkeypatch.setattr(launch.ws_bwd, "dkdv", lambda *a, **kw: (
        kw.get("warmup") or dkdv_calls.append(kw.get("dq") is not None), real_dkdv(*a, **kw))[1])
    g = torch.Generator().manual_seed(L + S + HQ)
    def mk(h, n):
        t = torch.randn(2, n, h, _D128, generator=g) if views else torch.randn(2, h, n, _D128, generator=g)
        t = t.to(DEVICE, torch.bfloat16).requires_grad_()
        return t, (t.transpose(1, 2) if views else t)
    (ql, q), (kl, k), (vl, v) = mk(HQ, L), mk(HKV, S), mk(HKV, S)
    caps = {"alibi": [torch.rand(HQ, generator=g).to(DEVICE)],
            "softcap_table": [(0.5 * torch.randn(HQ, 2 * _TABLE_S, generator=g)).to(DEVICE).requires_grad_()]
            }.get(score_name, [])
    score = _GLUON_SCORES[score_name](caps)
    mod = {**{n: m[0] for n, m in RECOGNIZED.items()}, **{n: m[0] for n, m in BOTTOM_RIGHT.items()}}.get(mask_name)
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE) if mod else None
    before = dict(dispatch.PATHS)
    # the Gluon dK / dV kernel at these short lengths too
    with kernel_options(bwd_ws_min_seq_bucket=0, bwd_ws_fused_dq=fused_dq):
        out, lse = flex.flex_attention(q, k, v, score, bm, enable_gqa=HQ != HKV, return_lse=True)
    assert dispatch.PATHS["band_hooks_gluon"] == before["band_hooks_gluon"] + 1
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"]
    assert lse.is_contiguous(), "the lse as PyTorch returns it"
    # the output gradient a model hands back: (B, L, H, D) seen as (B, H, L, D) (copied for the Gluon
    # dK / dV kernel, which takes a contiguous one)
    go = torch.randn(out.shape[0], out.shape[2], out.shape[1], out.shape[3], generator=g).to(out).transpose(1, 2)
    leaves = (ql, kl, vl, *caps)
    grads = torch.autograd.grad((out * go).sum(), [t for t in leaves if t.requires_grad])
    assert len(dkdv_calls) == (0 if views else 1), "the Gluon dK / dV route"
    assert dkdv_calls == [fused_dq and not _caps_need_grad(caps)] * len(dkdv_calls), "dQ fused where no capture trains"
    refs = {}
    for dt in (torch.float64, torch.bfloat16):  # the same-precision reference: bf16 scores and softmax
        cap_dt = torch.float64 if dt == torch.float64 else torch.float32  # captures stay fp32, as the kernels read them
        ls = [t.detach().to(dt if t.dtype == torch.bfloat16 else cap_dt).requires_grad_() for t in leaves]
        rq, rk, rv = (t.transpose(1, 2) if views else t for t in ls[:3])
        f = _GLUON_SCORES[score_name](ls[3:])
        # the modded scores in the reference's precision (a mod that reads no score, or mixes in fp32
        # captures, would promote them)
        o, l_, _ = dense_reference(rq, rk, rv, lambda s, *idx: torch.broadcast_to(f(s, *idx), s.shape).to(s.dtype),
                                   mod, dt)
        want = [t for t, w in zip(ls, leaves) if w.requires_grad]
        # a mod that reads no score leaves out independent of q and k: their gradient is 0
        got = torch.autograd.grad((o * go.to(dt)).sum(), want, allow_unused=True)
        got = [torch.zeros_like(t) if d is None else d for t, d in zip(want, got)]
        refs[dt] = (o, l_.float() if dt != torch.float64 else l_, got)
    r64, r16 = refs[torch.float64], refs[torch.bfloat16]
    what = f"{score_name} x {mask_name}{' views' if views else ''}"
    assert_scaled_close(out, r64[0], r16[0], what=f"{what} out")
    _close_with_empty_rows(lse, r64[1], r16[1], what=f"{what} lse")
    for name, a, r, s_ in zip(["dq", "dk", "dv", "dtable"], grads, r64[2], r16[2]):
        assert_scaled_close(a, r, s_, k=6.0, what=f"{what} {name}")
    with torch.no_grad(), kernel_options(flex_gluon=False):
        core_out = flex.flex_attention(q, k, v, score, bm, enable_gqa=HQ != HKV)
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"] + 1
    assert_scaled_close(core_out, r64[0], r16[0], what=f"{what} out of the core's forward")


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon kernels run on sm_90 GPUs")
def test_gluon_band_hooks_new_length_or_value_compiles_nothing():
    """The Gluon route of a score_mod over a band (forward, dK / dV, the core's dQ programs): a new
    length of the same Triton specialization class or a new captured value compiles no kernel,
    counted over every attend kernel (``bench_flex._compiles``)."""
    from attend.bench_flex import _compiles

    def run(n, value):
        slopes = torch.full((4,), value, device=DEVICE)
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 4, n, _D128, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
                   for _ in range(3))
        bm = flex.create_block_mask(RECOGNIZED["causal"][0], None, None, n, n, device=DEVICE)
        before = dispatch.PATHS["band_hooks_gluon"]
        with kernel_options(bwd_ws_min_seq_bucket=0):  # the Gluon dK / dV kernel at these lengths too
            out = flex.flex_attention(q, k, v, lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki), bm)
        out.sum().backward()
        torch.cuda.synchronize()
        assert dispatch.PATHS["band_hooks_gluon"] == before + 1

    run(300, 0.5)  # lengths of one specialization class (not multiples of 16)
    compiled = _compiles("attend")
    run(310, 0.5)
    run(300, 0.25)
    assert _compiles("attend") == compiled, "a new length or captured value compiled a kernel"


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon kernels run on sm_90 GPUs")
def test_decode_step_keeps_the_core_score_hooks():
    """A decode step (one query, Gemma 2's softcap over its causal keys) has fewer queries than one
    Gluon tile: it keeps the core's score hooks and their 16-row decode tiles, against float64."""
    mod, L, S, _ = BOTTOM_RIGHT["decode_causal"]
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 4, n, _D128, generator=g).to(DEVICE, torch.bfloat16) for n in (L, S, S))
    score = _GLUON_SCORES["softcap"]([])
    bm = flex.create_block_mask(mod, None, None, L, S, device=DEVICE)
    before = dict(dispatch.PATHS)
    out = flex.flex_attention(q, k, v, score, bm)
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"] + 1
    assert dispatch.PATHS["band_hooks_gluon"] == before["band_hooks_gluon"]
    refs = [dense_reference(q, k, v, score, mod, dt)[0] for dt in (torch.float64, torch.bfloat16)]
    assert_scaled_close(out, *refs, what="decode step on the core's score hooks")


def _list_masks(n: int, g: torch.Generator) -> dict:
    """mask_mods whose BlockMasks are lists, not bands: documents (ids of ``n`` positions captured),
    prefix-LM, documents with causal inside each, and one that reads b and h (lists per batch and
    head)."""
    doc = torch.sort(torch.randint(0, 4, (n,), generator=g)).values.to(DEVICE)
    return {"document": lambda b, h, q, kv: doc[q] == doc[kv],
            "prefix_lm": lambda b, h, q, kv: (kv <= 100) | (q >= kv),
            "document_causal": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
            "per_batch_and_head": lambda b, h, q, kv: (doc[q] == doc[kv]) & ((kv + h + 2 * b) % 5 != 0)}


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon kernels run on sm_90 GPUs")
@pytest.mark.parametrize("score_name,mask_name,L,S,HQ,HKV,made_by", [
    (None, "document", 384, 384, 2, 2, "attend"), ("softcap", "prefix_lm", 300, 300, 4, 2, "attend"),
    ("alibi", "document_causal", 700, 700, 2, 1, "attend"),
    ("softcap_table", "document_causal", 256, 256, 2, 2, "attend"),
    ("alibi", "per_batch_and_head", 384, 520, 4, 2, "attend"), ("softcap", "document", 300, 300, 2, 2, "pytorch")])
@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-programs", "fused-dq"])
def test_block_mask_lists_on_the_gluon_kernels(score_name, mask_name, L, S, HQ, HKV, made_by, fused_dq, monkeypatch):
    """KernelOptions.flex_gluon_lists: flex over a BlockMask's lists of 128 x 128 blocks runs its
    forward on the Gluon forward walking the key-side lists (ws's LISTS) and its backward's dK / dV
    on the Gluon kernel walking the query-side lists (ws_bwd's LISTS), the mask_mod on partial blocks,
    and with ``fused_dq`` dQ too, except where a capture needs a gradient: the output and every
    gradient against float64, with ragged lengths (a last block of 128 with rows past L), L != S,
    grouped heads, lists per batch and head, a BlockMask made by PyTorch, with or without a
    score_mod."""
    from attend.kernels import launch

    calls = []  # (lists given, dQ fused) per launch, not the warmup's compile
    real = launch.ws_bwd.dkdv
    monkeypatch.setattr(launch.ws_bwd, "dkdv", lambda *a, **kw: (
        kw.get("warmup") or calls.append((kw.get("lists") is not None, kw.get("dq") is not None)), real(*a, **kw))[1])
    g = torch.Generator().manual_seed(L + S + HQ)
    q = torch.randn(2, HQ, L, _D128, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, HKV, S, _D128, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(2))
    caps = {"alibi": [torch.rand(HQ, generator=g).to(DEVICE)],
            "softcap_table": [(0.5 * torch.randn(HQ, 2 * _TABLE_S, generator=g)).to(DEVICE).requires_grad_()]
            }.get(score_name, [])
    score = _GLUON_SCORES[score_name](caps) if score_name else None
    mask_mod = _list_masks(max(L, S), g)[mask_name]
    per_bh = mask_name == "per_batch_and_head"
    make = flex.create_block_mask if made_by == "attend" else tflex.create_block_mask
    bm = make(mask_mod, 2 if per_bh else None, HQ if per_bh else None, L, S, device=DEVICE)
    before = dispatch.PATHS["lists_gluon"]
    with kernel_options(bwd_ws_min_seq_bucket=0, bwd_ws_fused_dq=fused_dq, flex_gluon_lists=True,
                        flex_gluon_lists_bwd=True):
        route = flex.explain(q, k, v, score, bm, enable_gqa=HQ != HKV)
        out = flex.flex_attention(q, k, v, score, bm, enable_gqa=HQ != HKV)
    want_fused = fused_dq and not _caps_need_grad(caps)
    assert route.forward == "gluon_lists" and dispatch.PATHS["lists_gluon"] == before + 1, str(route)
    assert route.backward == ("gluon_fused" if want_fused else "gluon_dkdv"), str(route)
    go = torch.randn(out.shape, generator=g).to(out)
    leaves = (q, k, v, *caps)
    grads = torch.autograd.grad((out * go).sum(), [t for t in leaves if t.requires_grad])
    assert calls == [(True, want_fused)], calls
    refs = {}
    for dt in (torch.float64, torch.bfloat16):  # the same-precision reference: bf16 scores and softmax
        cap_dt = torch.float64 if dt == torch.float64 else torch.float32
        ls = [t.detach().to(dt if t.dtype == torch.bfloat16 else cap_dt).requires_grad_() for t in leaves]
        f = _GLUON_SCORES[score_name](ls[3:]) if score_name else (lambda s, *idx: s)
        o, _, _ = dense_reference(*ls[:3], lambda s, *idx: torch.broadcast_to(f(s, *idx), s.shape).to(s.dtype),
                                  mask_mod, dt)
        want = [t for t, w in zip(ls, leaves) if w.requires_grad]
        refs[dt] = (o, torch.autograd.grad((o * go.to(dt)).sum(), want))
    what = f"{score_name} x {mask_name}"
    assert_scaled_close(out, refs[torch.float64][0], refs[torch.bfloat16][0], what=f"{what} out")
    for name, a, r, s_ in zip(["dq", "dk", "dv", "dtable"], grads, refs[torch.float64][1], refs[torch.bfloat16][1]):
        assert_scaled_close(a, r, s_, k=6.0, what=f"{what} {name}")


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon kernels run on sm_90 GPUs")
@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-programs", "fused-dq"])
def test_gluon_lists_with_an_empty_query_block_and_ragged_keys(fused_dq):
    """flex_gluon_lists with no score_mod (the pipelined forward) over ragged keys (S = 333): the first
    query block lists no key block, so its rows give output 0 and dQ 0 exactly, and lse -inf; the other
    rows, and dK / dV, match float64 on their own problem (the empty rows add nothing to dK / dV)."""
    L, S, E = 300, 333, 128
    mask_mod = lambda b, h, q, kv: (q >= 128) & (kv <= q + 20)  # noqa: E731
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, L, E, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 2, S, E, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(2))
    bm = flex.create_block_mask(mask_mod, None, None, L, S, device=DEVICE)
    with kernel_options(bwd_ws_min_seq_bucket=0, bwd_ws_fused_dq=fused_dq, flex_gluon_lists=True,
                        flex_gluon_lists_bwd=True):
        route = flex.explain(q, k, v, None, bm)
        out, lse = flex.flex_attention(q, k, v, None, bm, return_lse=True)
    assert route.forward == "gluon_lists" and route.backward == ("gluon_fused" if fused_dq else "gluon_dkdv"), route
    go = torch.randn(out.shape, generator=g).to(out)
    dq, dk, dv = torch.autograd.grad((out * go).sum(), (q, k, v))
    assert torch.equal(out[:, :, :128], torch.zeros_like(out[:, :, :128]))
    assert torch.isneginf(lse[:, :, :128]).all() and torch.equal(dq[:, :, :128], torch.zeros_like(dq[:, :, :128]))
    kept = lambda b, h, q_, kv: mask_mod(b, h, q_ + 128, kv)  # noqa: E731 - the rows from 128 on, as a problem
    refs = {}
    for dt in (torch.float64, torch.bfloat16):
        ls = [t.detach()[:, :, 128:] if i == 0 else t.detach() for i, t in enumerate((q, k, v))]
        ls = [t.to(dt).requires_grad_() for t in ls]
        o, _, _ = dense_reference(*ls, None, kept, dt)
        refs[dt] = (o, torch.autograd.grad((o * go[:, :, 128:].to(dt)).sum(), ls))
    assert_scaled_close(out[:, :, 128:], refs[torch.float64][0], refs[torch.bfloat16][0], what="out")
    for name, a, r, s_ in zip(("dq", "dk", "dv"), (dq[:, :, 128:], dk, dv), refs[torch.float64][1],
                              refs[torch.bfloat16][1]):
        assert_scaled_close(a, r, s_, k=6.0, what=name)

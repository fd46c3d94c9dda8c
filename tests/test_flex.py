"""attend.flex_attention: the API against a float64 dense definition, BlockMask against PyTorch's,
the generated Triton hooks against the traced graph in float64, and the generation cache."""

from __future__ import annotations

import functools
import itertools
import math
import re

import pytest
import torch
import torch.nn.attention.flex_attention as tflex

import attend.flex_attention as flex
from attend._flex import codegen, dispatch, kernels
from attend._flex import trace as trace_mod
from attend._flex.block_mask import create_block_mask as _create_block_mask
from attend.kernels.options import kernel_options
from conftest import DEVICE, assert_scaled_close

B, HQ, HKV, L, S, E = 2, 2, 1, 150, 170, 16  # GQA 2:1; the interpreter's cost grows with B * HQ
BLOCK = 32  # small blocks: several partial / full / empty blocks at these lengths
WINDOW, PREFIX = 40, 45


def _doc_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (B, n), generator=g).sort(-1).values.to(DEVICE)


# mask_mods: name -> (mask_mod, depends on b)
DOC_Q, DOC_KV = _doc_ids(L, 1), _doc_ids(S, 1)
MASKS = {
    "none": None,
    "causal": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
    "window": lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= WINDOW,
    "document": lambda b, h, q_idx, kv_idx: (DOC_Q[b, q_idx] == DOC_KV[b, kv_idx]) & (q_idx >= kv_idx),
    "prefix_lm": flex.or_masks(lambda b, h, q_idx, kv_idx: kv_idx < PREFIX,
                               lambda b, h, q_idx, kv_idx: q_idx >= kv_idx),
}


@functools.lru_cache(maxsize=None)
def _block_mask(mask_name):
    """One BlockMask per mask_mod for the whole matrix (the interpreter's classification is the slow part)."""
    if MASKS[mask_name] is None:
        return None
    return flex.create_block_mask(MASKS[mask_name], B if mask_name == "document" else None, None, L, S, device=DEVICE,
                                  BLOCK_SIZE=BLOCK)


def _score_mods(dtype):
    """name -> (score_mod, captured tensors that require grad), fresh captures per call."""
    slopes = torch.exp2(-torch.arange(1, HQ + 1, dtype=torch.float32, device=DEVICE) * 8 / HQ)
    table = (0.5 * torch.randn(HQ, L + S, device=DEVICE)).requires_grad_()

    def relative(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) / 64

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def softcap(score, b, h, q_idx, kv_idx):
        return 4.0 * torch.tanh(score / 4.0)

    def table_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + S]

    return {"none": (None, []), "relative": (relative, []), "alibi": (alibi, []), "softcap": (softcap, []),
            "table_grad": (table_bias, [table])}


def dense_reference(q, k, v, score_mod, mask_mod, dtype, scale=None):
    """The definition, materialized: mods applied to the (B, H, L, S) scores in ``dtype``."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    i32 = dict(dtype=torch.int32, device=q.device)
    b = torch.arange(q.shape[0], **i32).view(-1, 1, 1, 1)
    h = torch.arange(q.shape[1], **i32).view(1, -1, 1, 1)
    qi = torch.arange(q.shape[2], **i32).view(1, 1, -1, 1)
    ki = torch.arange(k.shape[2], **i32).view(1, 1, 1, -1)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, qi, ki), -float("inf"))
    lse = s.logsumexp(-1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse, s.amax(-1)


def assert_grads_match_dense(out, grads, inputs, reference, dout, names):
    """``out`` and ``grads`` (of ``(out * dout).sum()`` with respect to ``inputs``) against
    ``reference(leaves, dtype)``, the dense definition's output on leaves like ``inputs``: float64,
    with tolerances scaled by the float32 reference's error (``names``: one per gradient)."""
    res = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t.detach().to(dt).requires_grad_() for t in inputs]
        o = reference(leaves, dt)
        res[dt] = (o, torch.autograd.grad((o * dout.to(dt)).sum(), leaves))
    assert_scaled_close(out, res[torch.float64][0], res[torch.float32][0], what="out")
    for name, a, r64, r32 in zip(names, grads, res[torch.float64][1], res[torch.float32][1], strict=True):
        assert_scaled_close(a, r64, r32, k=6.0, what=name)


def _close_with_empty_rows(out, ref64, ref_same, what):
    """Rows with no kept key are -inf in both; the others within the scaled tolerance."""
    empty = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(out), empty), f"{what}: -inf rows differ"
    zero = lambda t: torch.where(empty, 0.0, t.detach().to(t.dtype))
    assert_scaled_close(zero(out), zero(ref64), zero(ref_same), what=what)


def _as(dtype, caps):
    """Copies of the captures in ``dtype`` (float ones), for the reference's own autograd graph."""
    return [c.detach().to(dtype).requires_grad_() for c in caps]


def _with_captures(fn, caps, new):
    """``fn`` rebound to read ``new`` where it read ``caps`` (closure cells swapped)."""
    if fn is None or not caps:
        return fn
    import types

    cells = []
    for cell in fn.__closure__ or ():
        v = cell.cell_contents
        hit = next((n for c, n in zip(caps, new) if v is c), None)
        cells.append(types.CellType(hit if hit is not None else v))
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))


# The pairs the core's flex mode runs under the interpreter (every score_mod and every mask_mod at
# least once; the interpreter's forward is the slow part); the rest of the matrix takes the blocked
# path there. On CUDA every pair runs fused.
FUSED_PAIRS = {("none", "causal"), ("relative", "window"), ("alibi", "document"), ("softcap", "prefix_lm"),
               ("table_grad", "causal")}  # table_grad with no mask: tests/test_flex_band.py's diagonal pass test


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("score_name", ["none", "relative", "alibi", "softcap", "table_grad"])
def test_matches_float64_definition(score_name, mask_name, monkeypatch):
    fused_expected = DEVICE == "cuda" or (score_name, mask_name) in FUSED_PAIRS
    if not fused_expected:
        monkeypatch.setattr(dispatch, "_unfusable", lambda call: "the interpreter runs a subset of the pairs")
    torch.manual_seed(0)
    score_mod, caps = _score_mods(torch.float32)[score_name]
    mask_mod = MASKS[mask_name]
    q = torch.randn(B, HQ, L, E, device=DEVICE, requires_grad=True)
    k = torch.randn(B, HKV, S, E, device=DEVICE, requires_grad=True)
    v = torch.randn(B, HKV, S, E, device=DEVICE, requires_grad=True)
    bm = _block_mask(mask_name)
    fused = dispatch.PATHS["fused"]
    out, aux = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True,
                                   return_aux=flex.AuxRequest(lse=True, max_scores=True))
    assert dispatch.PATHS["fused"] == fused + fused_expected, "fp32 ran the blocked path, not the core's flex mode"
    g = torch.randn_like(out)
    fused_bwd = dispatch.PATHS["fused_backward"]
    grads = torch.autograd.grad((out * g).sum(), [q, k, v, *caps])
    assert dispatch.PATHS["fused_backward"] == fused_bwd + fused_expected, "the core's flex backward did not run"

    assert_matches_definition(out, aux, grads, (q, k, v), caps, score_mod, mask_mod, g, f"{score_name} x {mask_name}")


def assert_matches_definition(out, aux, grads, qkv, caps, score_mod, mask_mod, dout, what) -> None:
    """``out``, ``aux``'s lse and max_scores and ``grads`` (of ``(out * dout).sum()`` with respect
    to ``qkv`` and then ``caps``) against the dense definition in float64, tolerances scaled by the
    float32 definition's error; a row that keeps no key must be -inf in the lse and max_scores."""
    refs = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t.detach().to(dt).requires_grad_() for t in qkv] + _as(dt, caps)
        sm = _with_captures(score_mod, caps, leaves[3:])
        o, lse, mx = dense_reference(*leaves[:3], sm, mask_mod, dt)
        refs[dt] = (o, lse, mx, torch.autograd.grad((o * dout.to(dt)).sum(), leaves))
    (o64, lse64, mx64, g64), (o32, lse32, mx32, g32) = refs[torch.float64], refs[torch.float32]
    assert_scaled_close(out, o64, o32, what=f"{what} out")
    _close_with_empty_rows(aux.lse, lse64, lse32, what=f"{what} lse")
    _close_with_empty_rows(aux.max_scores, mx64, mx32, what=f"{what} max_scores")
    for name, a, r, s in zip(["dq", "dk", "dv", *(f"d(capture {i})" for i in range(len(caps)))], grads, g64, g32,
                             strict=True):
        assert_scaled_close(a, r, s, k=6.0, what=f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_dtypes_softcap_causal(dtype):
    torch.manual_seed(1)
    q = torch.randn(1, 2, 100, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 2, 90, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 2, 90, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    causal = MASKS["causal"]
    softcap = lambda s, b, h, qi, ki: 4.0 * torch.tanh(s / 4.0)
    bm = flex.create_block_mask(causal, None, None, 100, 90, device=DEVICE, BLOCK_SIZE=32)
    out, aux = flex.flex_attention(q, k, v, softcap, bm, return_aux=flex.AuxRequest(lse=True))
    assert out.dtype == dtype and aux.lse.dtype == torch.float32 and aux.max_scores is None
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, l64, _ = dense_reference(*leaves, softcap, causal, torch.float64)
    g64 = torch.autograd.grad((o64 * g.double()).sum(), leaves)
    same = [t.detach().requires_grad_() for t in (q, k, v)]
    os_, ls_, _ = dense_reference(*same, softcap, causal, dtype)
    gs = torch.autograd.grad((os_ * g).sum(), same)
    assert_scaled_close(out, o64, os_, what="out")
    for name, a, r, s in zip("qkv", grads, g64, gs):
        assert_scaled_close(a, r, s, k=6.0, what=f"d{name}")
    if q.is_cuda and dtype != torch.float64:  # 16-bit on a GPU: the hardware's tanh (KernelOptions.flex_fast_tanh)
        from attend._flex import codegen
        assert (trace_mod.trace(softcap, "score").key, "fast") in codegen._CACHE


def test_head_and_batch_dependent_mods_with_broadcast_key_batch():
    """A per-head window (captured), a per-batch score offset, GQA 4:1, a key batch of 1 broadcast
    over a BlockMask of batch B, and D=64 with Ev=32."""
    torch.manual_seed(5)
    win = torch.tensor([8, 20, 40, 1000], device=DEVICE)
    shift = torch.randn(B, device=DEVICE, requires_grad=True)
    mask = lambda b, h, qi, ki: ((qi - ki).abs() <= win[h]) & (ki <= qi + 3)
    score = lambda s, b, h, qi, ki: s * (1 + 0.1 * h) + shift[b] * (ki % 3 == 0)
    q = torch.randn(B, 4, 90, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 75, 64, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 1, 75, 32, device=DEVICE, requires_grad=True)
    bm = flex.create_block_mask(mask, B, 4, 90, 75, device=DEVICE, BLOCK_SIZE=(16, 32))
    out = flex.flex_attention(q, k, v, score, bm, enable_gqa=True)
    assert out.shape == (B, 4, 90, 32)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, shift))
    expand = lambda t: t.expand(B, *t.shape[1:])
    res = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, shift)]
        sm = _with_captures(score, [shift], [leaves[3]])
        o, _, _ = dense_reference(leaves[0], expand(leaves[1]), expand(leaves[2]), sm, mask, dt)
        res[dt] = (o, torch.autograd.grad((o * g.to(dt)).sum(), leaves))
    assert_scaled_close(out, res[torch.float64][0], res[torch.float32][0], what="out")
    for name, a, r, s_ in zip(["dq", "dk", "dv", "dshift"], grads, res[torch.float64][1], res[torch.float32][1]):
        assert_scaled_close(a, r, s_, k=6.0, what=name)


def test_score_mod_that_ignores_the_score():
    """A mod that returns a per-head constant (or a literal) weighs keys uniformly: out = mean of v."""
    q, v = torch.randn(1, 2, 40, 16, device=DEVICE), torch.randn(1, 2, 40, 16, device=DEVICE)
    per_head = torch.randn(2, device=DEVICE)
    for mod in (lambda s, b, h, qi, ki: per_head[h], lambda s, b, h, qi, ki: s * 0 + 3.0):
        out = flex.flex_attention(q, q, v, mod)
        assert_scaled_close(out, v.double().mean(2, keepdim=True).expand_as(out), v.mean(2, keepdim=True).expand_as(out))


def test_core_forward_stores_a_row_max_only_where_asked(monkeypatch):
    """The core's flex forward writes max_scores (its MAX_SCORES variant, and a buffer) only for
    return_aux=AuxRequest(max_scores=True): a plain call, or one asking for the lse alone, takes the
    variant without it, and its gradients are unchanged."""
    from attend.kernels import launch

    if not dispatch._fusable(dispatch.FlexCall(*(torch.empty(1, 1, 1, 16, device=DEVICE),) * 3, None, None,
                                               None, 1.0)):
        pytest.skip("the core's flex mode does not run here")
    seen = []
    real = launch.flex_forward
    monkeypatch.setattr(launch, "flex_forward", lambda *a, **kw: seen.append(kw["want_max"]) or real(*a, **kw))
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    doc = lambda b, h, qi, ki: qi // 20 == ki // 20  # not a band: the core's lists
    bm = flex.create_block_mask(doc, None, None, 48, 48, device=DEVICE, BLOCK_SIZE=16)
    plain = flex.flex_attention(q, k, v, block_mask=bm)
    _, lse_only = flex.flex_attention(q, k, v, block_mask=bm, return_aux=flex.AuxRequest(lse=True))
    out, aux = flex.flex_attention(q, k, v, block_mask=bm, return_aux=flex.AuxRequest(lse=True, max_scores=True))
    assert seen == [False, False, True], seen
    assert lse_only.max_scores is None and aux.max_scores is not None
    assert torch.equal(plain, out) and torch.equal(lse_only.lse, aux.lse)
    keep = flex.create_mask(doc, None, None, 48, 48, device=DEVICE)
    row_max = lambda a, b: (a @ b.transpose(-1, -2) * 16 ** -0.5).masked_fill(~keep, float("-inf")).amax(-1)
    assert_scaled_close(aux.max_scores, row_max(q.detach().double(), k.detach().double()),
                        row_max(q.detach(), k.detach()), what="max_scores")
    g1 = torch.autograd.grad(plain.sum(), (q, k, v))
    g2 = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_empty_rows_give_zero_output_and_neg_inf_lse():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    late = lambda b, h, qi, ki: (qi >= 40) & (qi >= ki)  # rows 0..39 keep nothing
    bm = flex.create_block_mask(late, None, None, 70, 70, device=DEVICE, BLOCK_SIZE=16)
    out, aux = flex.flex_attention(q, k, v, block_mask=bm, return_aux=flex.AuxRequest(lse=True, max_scores=True))
    assert torch.equal(out[:, :, :40], torch.zeros_like(out[:, :, :40]))
    assert torch.isneginf(aux.lse[:, :, :40]).all() and torch.isneginf(aux.max_scores[:, :, :40]).all()
    assert torch.isfinite(aux.lse[:, :, 40:]).all()
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq[:, :, :40], torch.zeros_like(dq[:, :, :40]))


@pytest.mark.parametrize("shape", [(2, 4, 0, 16), (0, 4, 40, 16)], ids=["no-queries", "no-batch"])
def test_empty_queries_give_empty_outputs_and_zero_gradients(shape):
    """As PyTorch's flex_attention: no query row (L = 0) or no batch gives empty out and lse, and
    zero gradients for the inputs."""
    q = torch.randn(*shape, device=DEVICE, requires_grad=True)
    k = torch.randn(shape[0], 4, 40, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    out, lse = flex.flex_attention(q, k, k, score_mod=lambda s, b, h, qi, ki: s * 2 + bias[ki], return_lse=True)
    assert out.shape == shape and lse.shape == shape[:3]
    dq, dk, dbias = torch.autograd.grad(out.sum(), (q, k, bias))
    assert dq.shape == q.shape and bool((dk == 0).all()) and bool((dbias == 0).all())


def test_scale_takes_a_zero_dim_tensor_and_refuses_a_non_finite_one():
    q = torch.randn(1, 2, 32, 16, device=DEVICE)
    torch.testing.assert_close(flex.flex_attention(q, q, q, scale=torch.tensor(0.5)),
                               flex.flex_attention(q, q, q, scale=0.5), rtol=0, atol=0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite, got"):
            flex.flex_attention(q, q, q, scale=bad)


def test_return_lse_and_pytorch_block_mask_and_scale():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 64, 16, device=DEVICE) for _ in range(3))
    window = MASKS["window"]
    ours = flex.create_block_mask(window, None, 2, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    theirs = tflex.create_block_mask(window, None, 2, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    with kernel_options(flex_bands=False):  # the flex kernel for both (a PyTorch BlockMask never takes the band route)
        a, lse_a = flex.flex_attention(q, k, v, block_mask=ours, scale=0.3, return_lse=True)
    b, lse_b = flex.flex_attention(q, k, v, block_mask=theirs, scale=0.3, return_lse=True)
    assert torch.equal(a, b) and torch.equal(lse_a, lse_b)
    o64, l64, _ = dense_reference(q, k, v, None, window, torch.float64, scale=0.3)
    o32, l32, _ = dense_reference(q, k, v, None, window, torch.float32, scale=0.3)
    assert_scaled_close(a, o64, o32, what="out")
    assert_scaled_close(lse_a, l64, l32, what="lse (natural log)")
    plain = flex.flex_attention(q, k, v)
    assert_scaled_close(plain, *(dense_reference(q, k, v, None, None, dt)[0] for dt in (torch.float64, torch.float32)))


# ---------------------------------------------------------------------------------------------
# BlockMask structure against PyTorch


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mask_name", ["causal", "window", "document", "prefix_lm"])
def test_block_mask_structure_matches_pytorch(mask_name, impl):
    mask_mod = MASKS[mask_name]
    bsz = B if mask_name == "document" else None
    for block in (32, (16, 64)):
        ours = _create_block_mask(mask_mod, bsz, 3, L, S, device=DEVICE, BLOCK_SIZE=block, _impl=impl)
        theirs = tflex.create_block_mask(mask_mod, bsz, 3, L, S, device=DEVICE, BLOCK_SIZE=block)
        for name in flex.BlockMask._TENSOR_ATTRS:
            a, b = getattr(ours, name), getattr(theirs, name)
            assert a.dtype == torch.int32 and torch.equal(a, b), f"{mask_name} {block} {name}"
        assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE and ours.seq_lengths == theirs.seq_lengths
        assert ours.shape == theirs.shape and ours.numel() == theirs.numel()
        computed = theirs.kv_num_blocks.sum().item() + theirs.full_kv_num_blocks.sum().item()
        total = theirs.kv_num_blocks.numel() * -(-S // theirs.BLOCK_SIZE[1])  # (B, H, NQ) x NK
        assert ours.sparsity() == pytest.approx(100 * (1 - computed / total))  # PyTorch 2.14's definition
        if L % theirs.BLOCK_SIZE[0] == 0 and S % theirs.BLOCK_SIZE[1] == 0:  # 2.13's agrees only then
            assert ours.sparsity() == pytest.approx(theirs.sparsity())
        assert torch.equal(ours.to_dense(), theirs.to_dense())
        assert ours.to_string() == theirs.to_string()


def test_block_mask_methods_match_pytorch():
    doc = MASKS["document"]
    ours = flex.create_block_mask(doc, B, 2, L, S, device=DEVICE, BLOCK_SIZE=32)
    theirs = tflex.create_block_mask(doc, B, 2, L, S, device=DEVICE, BLOCK_SIZE=32)
    rows = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    for index in (0, (1, 0), (slice(0, 2), slice(1, 2)), (slice(None), slice(None), rows), -1):
        a, b = ours[index], theirs[index]
        for name in flex.BlockMask._TENSOR_ATTRS:
            assert torch.equal(getattr(a, name), getattr(b, name)), f"{index} {name}"
        with pytest.raises(RuntimeError, match="sliced"):
            a.mask_mod(0, 0, 0, 0)
    tup_a, tup_b = ours.as_tuple(), theirs.as_tuple()
    if len(tup_b) == len(tup_a) - 4:  # PyTorch before 2.13 has no dq_* fields (between the lists and sizes)
        tup_a = tup_a[:10] + tup_a[14:]
    assert len(tup_a) == len(tup_b)
    for x, y in zip(tup_a, tup_b):
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y or callable(x)), (x, y)
    fk = flex.BlockMask.from_kv_blocks(theirs.kv_num_blocks, theirs.kv_indices, theirs.full_kv_num_blocks,
                                       theirs.full_kv_indices, BLOCK_SIZE=32, seq_lengths=(L, S))
    fk_t = tflex.BlockMask.from_kv_blocks(theirs.kv_num_blocks, theirs.kv_indices, theirs.full_kv_num_blocks,
                                          theirs.full_kv_indices, BLOCK_SIZE=32, seq_lengths=(L, S))
    for name in flex.BlockMask._TENSOR_ATTRS:
        assert torch.equal(getattr(fk, name), getattr(fk_t, name)), name
    causal = MASKS["causal"]
    cropped = flex.create_block_mask(causal, None, None, 256, 256, device=DEVICE, BLOCK_SIZE=32)._adjust(128, 160)
    cropped_t = tflex.create_block_mask(causal, None, None, 256, 256, device=DEVICE, BLOCK_SIZE=32)._adjust(128, 160)
    for name in flex.BlockMask._TENSOR_ATTRS:
        assert torch.equal(getattr(cropped, name), getattr(cropped_t, name)), f"_adjust {name}"
    moved = ours.to("cpu")
    assert moved.kv_indices.device.type == "cpu" and torch.equal(moved.kv_indices.to(DEVICE), ours.kv_indices)
    assert "BlockMask(shape=(2, 2, 150, 170)" in str(ours) and "kv_num_blocks=(2, 2, 5)" in repr(ours)


def test_coarsened_lists_equal_create_block_mask_at_the_coarse_size():
    """The core may tile coarser than a mask's blocks: lists.coarsen gives create_block_mask's lists there."""
    from attend._flex import lists

    for mask_name in ("causal", "document", "prefix_lm"):
        bsz = B if mask_name == "document" else None
        fine = _create_block_mask(MASKS[mask_name], bsz, None, L, S, device=DEVICE, BLOCK_SIZE=16, _impl="torch")
        coarse = lists.coarsen(lists.from_block_mask(fine), 64, 32)
        ref = tflex.create_block_mask(MASKS[mask_name], bsz, None, L, S, device=DEVICE, BLOCK_SIZE=(64, 32))
        for name in flex.BlockMask._TENSOR_ATTRS:
            assert torch.equal(getattr(coarse, name), getattr(ref, name)), f"{mask_name} {name}"


def test_dense_lists_are_every_block_full_and_made_once():
    """A call without a block_mask iterates every block as full (a ragged end's bounds are the
    kernel's: FLEX_RAGGED_IN_FULL), in both directions; lists.dense's tensors are made once per
    block counts and device (a new length of the same counts reuses them), never under a
    fake-tensor trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attend._flex import lists

    for n_q, n_kv in ((150, 170), (129, 64), (1, 300)):
        got = lists.dense(n_q, n_kv, DEVICE, 32)
        nq, nk = -(-n_q // 32), -(-n_kv // 32)
        for num, idx, rows, cols in ((got.full_kv_num_blocks, got.full_kv_indices, nq, nk),
                                     (got.full_q_num_blocks, got.full_q_indices, nk, nq)):
            assert num.tolist() == [[[cols] * rows]]
            assert idx.tolist() == [[[list(range(cols))] * rows]]
        assert got.kv_num_blocks.tolist() == [[[0] * nq]] and got.q_num_blocks.tolist() == [[[0] * nk]]
        assert got.seq_lengths == (n_q, n_kv) and got.BLOCK_SIZE == (32, 32)
    again = lists.dense(140, 165, DEVICE, 32)  # the counts of (150, 170)
    assert again.full_kv_indices is lists.dense(150, 170, DEVICE, 32).full_kv_indices
    assert again.seq_lengths == (140, 165)
    before = dict(lists._DENSE)
    with FakeTensorMode():
        lists.dense(4096, 4096, DEVICE, 32)
    assert lists._DENSE == before, "a fake tensor was kept"
    fresh = lists.dense(140, 165, DEVICE, 32, cache=False)  # the compiled op's: CUDA graph trees own its memory
    assert fresh.full_kv_indices is not again.full_kv_indices and torch.equal(fresh.full_kv_indices, again.full_kv_indices)
    assert lists._DENSE == before


def test_interval_bounds_decide_all_but_the_boundary_blocks():
    """create_block_mask evaluates the mask position by position only in the blocks interval
    arithmetic cannot decide: for causal the diagonal, for a chunked mask none; a document mask
    under causal leaves every block above the diagonal decided (empty) without reading the ids.
    Either way the status equals the exhaustive classification."""
    from attend._flex import bounds
    from attend._flex.block_mask import EMPTY, classify

    n, blk = 1000, 64
    nb = -(-n // blk)
    cases = {"causal": (MASKS["causal"], nb), "chunk": (lambda b, h, qi, ki: qi // 256 == ki // 256, 0)}
    for name, (mask, undecided) in cases.items():
        g = trace_mod.trace(mask, "mask")
        pre = bounds.block_bounds(g, 1, 1, n, n, blk, blk, DEVICE)
        assert int((pre == bounds.UNDECIDED).sum()) == undecided, name
        assert torch.equal(classify(g, 1, 1, n, n, blk, blk, DEVICE, impl="torch"),
                           classify(g, 1, 1, n, n, blk, blk, DEVICE, impl="torch", bounds=False)), name
    g = trace_mod.trace(MASKS["document"], "mask")
    pre = bounds.block_bounds(g, B, 1, L, S, 16, 16, DEVICE)
    above = torch.ones(pre.shape, dtype=torch.bool, device=pre.device).triu(1)
    assert (pre[above] == EMPTY).all() and (pre[~above] == bounds.UNDECIDED).any()


_ATOMS = ["q", "k", "b", "h"]


def _expr(draw, depth):
    """A random integer expression over q_idx, kv_idx, b, h and small constants (source text)."""
    st_ = __import__("hypothesis").strategies
    if depth == 0 or draw(st_.integers(0, 3)) == 0:
        return draw(st_.sampled_from(_ATOMS))  # every leftmost leaf an index: every subexpression a tensor
    kind = draw(st_.sampled_from(["+", "-", "*", "//", "%", "abs", "min", "max"]))
    a = _expr(draw, depth - 1)
    if kind == "abs":
        return f"({a}).abs()"
    if kind in ("//", "%"):
        return f"(({a}) {kind} {draw(st_.integers(1, 90))})"
    if kind in ("min", "max"):
        return f"torch.{'minimum' if kind == 'min' else 'maximum'}({a}, {_expr(draw, depth - 1)})"
    other = _expr(draw, depth - 1) if draw(st_.booleans()) else str(draw(st_.integers(-70, 70)))
    return f"({a} {kind} {other})"


def _cond(draw, depth):
    st_ = __import__("hypothesis").strategies
    if depth == 0 or draw(st_.integers(0, 2)) == 0:
        op = draw(st_.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        other = _expr(draw, 2) if draw(st_.booleans()) else str(draw(st_.integers(-200, 200)))
        return f"({_expr(draw, 2)} {op} {other})"
    kind = draw(st_.sampled_from(["&", "|", "~", "where"]))
    if kind == "~":
        return f"(~{_cond(draw, depth - 1)})"
    if kind == "where":
        return f"torch.where({_cond(draw, depth - 1)}, {_cond(draw, depth - 1)}, {_cond(draw, depth - 1)})"
    return f"({_cond(draw, depth - 1)} {kind} {_cond(draw, depth - 1)})"


def test_interval_bounds_never_change_a_random_integer_mask():
    """Property: for random integer masks (arithmetic, floor division and remainder, abs, min /
    max, comparisons, &, |, ~, where) at ragged lengths, classifying with interval bounds gives
    exactly the exhaustive classification."""
    from hypothesis import given, settings
    from hypothesis import strategies as st_

    from attend._flex.block_mask import classify

    @settings(max_examples=60, deadline=None)
    @given(st_.data())
    def check(data):
        src = _cond(data.draw, 3)
        mask = eval(f"lambda b, h, q, k: {src}", {"torch": torch})
        Lq, Sk = data.draw(st_.integers(1, 200)), data.draw(st_.integers(1, 200))
        bq, bk = data.draw(st_.sampled_from([16, 32, 64])), data.draw(st_.sampled_from([16, 32, 64]))
        g = trace_mod.trace(mask, "mask")
        got = classify(g, 2, 2, Lq, Sk, bq, bk, DEVICE, impl="torch")
        ref = classify(g, 2, 2, Lq, Sk, bq, bk, DEVICE, impl="torch", bounds=False)
        assert torch.equal(got, ref), src

    check()


def test_create_block_mask_never_holds_l_by_s(monkeypatch):
    """The torch path evaluates bounded tiles; the largest tensor it builds is far below L x S."""
    import attend._flex.block_mask as bmod

    monkeypatch.setattr(bmod, "TORCH_TILE_ELEMENTS", 1 << 14)
    seen = []
    real = trace_mod.evaluate

    def spy(graph, inputs, *a, **kw):
        out = real(graph, inputs, *a, **kw)
        seen.append(torch.broadcast_shapes(*(t.shape for t in inputs.values() if isinstance(t, torch.Tensor))))
        return out

    monkeypatch.setattr(trace_mod, "evaluate", spy)
    n = 2048
    bm = _create_block_mask(MASKS["causal"], None, None, n, n, device=DEVICE, BLOCK_SIZE=128, _impl="torch")
    assert max(math.prod(s) for s in seen) <= 1 << 14 < n * n
    ref = tflex.create_block_mask(MASKS["causal"], None, None, n, n, device=DEVICE, BLOCK_SIZE=128)
    assert torch.equal(bm.full_kv_indices, ref.full_kv_indices) and torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)


# ---------------------------------------------------------------------------------------------
# Generated hooks: the Triton functions against the traced graph in float64


def _all_ops_mod():
    tab = torch.randn(3, 40, device=DEVICE)
    row = torch.randn(30, 50, device=DEVICE, dtype=torch.float16)
    w = torch.rand(3, device=DEVICE) + 0.5
    ids = torch.randint(0, 3, (2, 60), device=DEVICE)

    def mod(score, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        x = torch.where(d >= 0, score, score * 0.5) + tab[h, d.abs() % 40] + row[q_idx, kv_idx].float()
        x = x + torch.sigmoid(score) - torch.exp(score / 8) + torch.exp2(score / 16) + torch.log(score.abs() + 1)
        x = x + torch.sqrt(score * score + 1) * w[h] + torch.minimum(score, torch.tensor(1.5).item() + d * 0.0)
        x = x + torch.maximum(score, -score) + (d // 3).float() - torch.remainder(d, 5) + torch.floor_divide(d, -4)
        x = x + ((ids[b, q_idx] == ids[b, kv_idx]) | ~(kv_idx < 7)).float() * 0.25 + (-score) ** 2 / 10
        return x.to(torch.float16).float() + torch.clamp(score, -1, 1) + abs(score).sqrt()

    return mod


def _run_tile(graph, score, b, h, q0, kv0, q_len, kv_len, ds, wide=False):
    fns = codegen.hooks(graph, wide=wide).functions
    caps = [c.tensor for c in graph.captures]
    args = codegen.capture_args(caps, score.device, scalars=graph.scalars)
    bm, bn = score.shape
    out, dscore = torch.empty_like(score), torch.empty_like(score)
    kernels.mod_tile[(1,)](score, out, dscore, ds, b, h, q0, kv0, q_len, kv_len, bn, args.ptrs, args.meta, args.grads,
                           SCORE_MOD=fns["score_mod"], SCORE_DSCORE=fns["score_mod_dscore"],
                           SCORE_GRAD=fns["score_mod_grad_captures"], LOAD_META=fns["load_meta"],
                           LOAD_GRAD_STRIDES=fns["load_grad_strides"], HAS_GRAD=True, BLOCK_M=bm, BLOCK_N=bn)
    return out, dscore, args.grads


@pytest.mark.parametrize("mod_name", ["all_ops", "composed_ops", "softcap_alibi_table", "nested_index"])
def test_generated_hooks_match_float64_graph(mod_name):
    torch.manual_seed(4)
    if mod_name == "all_ops":
        mod, q_len, kv_len = _all_ops_mod(), 30, 50
    elif mod_name == "composed_ops":  # erf, and the ops written as others (trace._COMPOSED): torch's values
        F = torch.nn.functional
        mod = lambda s, b, h, qi, ki: (torch.erf(s / 2) + torch.square(s) / 8 + torch.relu(s) + s.relu()
                                       - F.softplus(s, beta=2.0, threshold=3.0) + F.softplus(s) / 4
                                       + torch.sign(qi - ki).float() * 0.5 + s.sign() + torch.log1p(s.abs())
                                       + torch.expm1(-s.abs()) + s.square() * 0.01 + F.relu(-s) / 3)
        q_len, kv_len = 30, 50
    elif mod_name == "nested_index":  # a capture indexed by a value loaded from another
        pos, bias = torch.randperm(50, device=DEVICE), torch.randn(50, device=DEVICE)
        mod = lambda s, b, h, qi, ki: s + bias[pos[qi]] - bias[pos[ki]]
        q_len, kv_len = 30, 50
    else:
        slopes, table = torch.rand(3, device=DEVICE), torch.randn(3, 80, device=DEVICE)
        mod = lambda s, b, h, qi, ki: 30 * torch.tanh(s / 30) - slopes[h] * (qi - ki).abs() + table[h, qi - ki + 40]
        q_len, kv_len = 30, 40
    graph = trace_mod.trace(mod, "score")
    BM = BN = 16
    score = 3 * torch.randn(BM, BN, device=DEVICE)
    ds = torch.randn(BM, BN, device=DEVICE)
    b, h, q0, kv0 = 1, 2, 20, 30  # a ragged tile: rows >= 30 and keys >= kv_len are out of range
    out, dscore, grads = _run_tile(graph, score, b, h, q0, kv0, q_len, kv_len, ds)

    qi = (q0 + torch.arange(BM, device=DEVICE)).view(-1, 1)
    ki = (kv0 + torch.arange(BN, device=DEVICE)).view(1, -1)
    valid = (qi < q_len) & (ki < kv_len)
    i32 = lambda t: torch.as_tensor(t, dtype=torch.int32, device=DEVICE)
    s64 = score.double().requires_grad_()
    caps64 = [c.tensor.double().requires_grad_() if c.tensor.is_floating_point() else c.tensor
              for c in graph.captures]
    ref, = trace_mod.evaluate(graph, dict(score=s64, b=i32(b), h=i32(h), q_idx=i32(qi.clamp(max=q_len - 1)),
                                          kv_idx=i32(ki.clamp(max=kv_len - 1))), caps64, float_dtype=torch.float64)
    # the graph is the mod: the user's function itself in float64 agrees
    direct = _with_captures(mod, [c.tensor for c in graph.captures],
                            [c.detach() for c in caps64]) if mod_name != "all_ops" else None
    if direct is not None:
        d = direct(s64.detach(), i32(b), i32(h), i32(qi.clamp(max=q_len - 1)), i32(ki.clamp(max=kv_len - 1)))
        assert torch.allclose(d, ref.detach())
    dsv = torch.where(valid, ds.double(), 0.0)
    grads64 = torch.autograd.grad((ref * dsv).sum(), [s64] + [c for c in caps64 if c.requires_grad])
    tol = lambda r: 2e-5 * (1 + r.abs().max().item())
    assert (out.double() - ref).abs().max() <= tol(ref), "score_mod"
    assert (dscore.double() * dsv - grads64[0]).abs().max() <= tol(grads64[0]), "d score_mod / d score"
    float_grads = [g for g, c in zip(grads, graph.captures) if c.tensor.is_floating_point()]
    for k_, (a, r) in enumerate(zip(float_grads, grads64[1:])):
        assert (a.double() - r).abs().max() <= 4 * tol(r), f"capture {k_} gradient"


def test_index_arithmetic_in_fp32_is_exact_up_to_the_limit():
    """ALiBi's ``slope * (q_idx - kv_idx).abs()`` takes the difference in fp32 of the indices as
    2**23 + i (their exponent bits set: ``_Writer.float_index``), exact for indices up to
    ``FLOAT_INDEX_LIMIT``; a product of two indices is never taken so. Past the limit the trick
    is wrong (a tile at 2**23 + 5 shows it), so a longer call takes the ``wide`` hooks, which convert
    the integer result in every generated function: the score hooks, a relative table's gradient
    index and the mask hook alike."""
    bits = "| 0x4B000000).to(tl.float32, bitcast=True)"
    torch.manual_seed(5)
    slopes = torch.rand(3, device=DEVICE) + 0.5
    mod = lambda s, b, h, qi, ki: s - slopes[h] * (qi.long() - ki).abs() + (qi * ki).float() * 0.0
    graph = trace_mod.trace(mod, "score")
    body = lambda src: src[src.index("def score_mod("):src.index("def score_mod_dscore(")]
    narrow = body(codegen.source(graph))
    assert f"tl.abs(((q_idx.to(tl.int32) {bits} - (kv_idx.to(tl.int32) {bits}))" in narrow, narrow
    assert f"{bits} - 8388608.0) * ((kv_idx" not in narrow and "(q_idx * kv_idx)" in narrow
    table = torch.randn(3, 64, device=DEVICE)
    bucketed = lambda s, b, h, qi, ki: s + table[h, (torch.log((qi - ki).abs().float() + 1) * 4).int()]
    window = lambda b, h, qi, ki: (qi - ki).abs().float() * 0.5 < 40
    for g in (graph, trace_mod.trace(bucketed, "score"), trace_mod.trace(window, "mask")):
        assert "0x4B000000" not in codegen.source(g, wide=True)
    assert "0x4B000000" in codegen.source(trace_mod.trace(window, "mask"))
    assert not codegen.wide_index(codegen.FLOAT_INDEX_LIMIT, 5) and codegen.wide_index(7, codegen.FLOAT_INDEX_LIMIT + 1)

    BM = BN = 16
    score, ds = torch.randn(BM, BN, device=DEVICE), torch.randn(BM, BN, device=DEVICE)
    kv0 = 3
    ki = (kv0 + torch.arange(BN, dtype=torch.float64, device=DEVICE)).view(1, -1)
    for wide, q0, exact in ((False, codegen.FLOAT_INDEX_LIMIT - BM, True), (True, codegen.FLOAT_INDEX_LIMIT - BM, True),
                            (True, 2 ** 23 + 5, True), (False, 2 ** 23 + 5, False)):
        out, dscore, grads = _run_tile(graph, score, 0, 1, q0, kv0, q0 + BM, 64, ds, wide=wide)
        qi = (q0 + torch.arange(BM, dtype=torch.float64, device=DEVICE)).view(-1, 1)
        ref = score.double() - slopes[1].double() * (qi - ki).abs()
        err = (out.double() - ref).abs().max().item()
        # the fp32 result's own rounding (|ref| up to 2**23 * slope), nothing more
        assert (err <= 2 * ref.abs().max().item() * 2.0 ** -24) == exact, (wide, q0, err)
        if exact:
            g_ref = -(ds.double() * (qi - ki).abs()).sum().item()  # d out / d slopes[1], summed by the hook
            assert abs(grads[0][1].item() - g_ref) <= 1e-5 * (ds.double().abs() * (qi - ki).abs()).sum().item()


def test_generated_hooks_compile_for_gpu():
    """The kernels calling generated hooks build for sm_90 and sm_80 (no GPU needed)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")  # compiling needs real JIT functions
    res = subprocess.run([sys.executable, "-m", "attend._flex.build"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    builds = json.loads(res.stdout)
    assert {(b["kernel"], b["arch"]) for b in builds} == {(k, a) for k in ("mod_tile", "classify_blocks")
                                                          for a in (90, 80)}
    for b in builds:  # the captures' gradient scatter is in the tile kernel, and only there
        assert b["atomics"] == (b["kernel"] == "mod_tile"), b


# ---------------------------------------------------------------------------------------------
# The generation cache: by structure, never by value or size


def test_new_length_batch_or_captured_value_generates_nothing():
    def make(doc):
        return lambda b, h, q_idx, kv_idx: (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    def score_of(table):
        return lambda s, b, h, q_idx, kv_idx: s + table[h, q_idx - kv_idx + table.shape[1] // 2]

    flex.create_block_mask(make(_doc_ids(64, 5)), B, None, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    first = trace_mod.trace(score_of(torch.randn(2, 128, device=DEVICE)), "score")
    codegen.hooks(first)
    before = codegen.GENERATIONS["count"]
    # compiled kernels of the classifier (a GPU run; the interpreter compiles nothing)
    compiles = lambda: sum(len(c[0]) for c in getattr(kernels.classify_blocks, "device_caches", {}).values())
    compiled = compiles()
    for n, bsz, seed in ((96, 2, 6), (80, 3, 7), (64, 2, 8)):
        doc = torch.randint(0, 3, (bsz, n), device=DEVICE).sort(-1).values
        bm = flex.create_block_mask(make(doc), bsz, None, n, n, device=DEVICE, BLOCK_SIZE=16)
        ref = tflex.create_block_mask(make(doc), bsz, None, n, n, device=DEVICE, BLOCK_SIZE=16)
        assert torch.equal(bm.kv_indices, ref.kv_indices) and torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
        g = trace_mod.trace(score_of(torch.randn(5, 2 * n, device=DEVICE)), "score")
        assert g.key == first.key
        codegen.hooks(g)
    assert codegen.GENERATIONS["count"] == before, "a new length, batch or captured value generated code"
    assert compiles() == compiled, "a new length, batch or captured value compiled the classifier again"
    # a structure no other test generates (the count is the process's), then the same one again
    codegen.hooks(trace_mod.trace(lambda s, b, h, q_idx, kv_idx: torch.sigmoid(s) * s * 2, "score"))
    codegen.hooks(trace_mod.trace(lambda s, b, h, q_idx, kv_idx: torch.sigmoid(s) * s * 2, "score"))  # a new function
    assert codegen.GENERATIONS["count"] == before + 1


def test_generated_constants_are_layout_free_and_exact():
    """A constant of the generated code is a 0-d ``tl.cast`` (no ``tl.full``: the Gluon kernels call
    the hooks, and a Gluon tensor needs a layout); a float64 one, which Triton would read as an fp32
    literal, is the exact sum of fp32 parts."""
    import struct

    assert codegen._const(2, "tl.int64") == "tl.cast(2, tl.int64)"
    assert codegen._const(True, "tl.int1") == "tl.cast(True, tl.int1)"
    assert codegen._const(0.1, "tl.float32") == "tl.cast(0.1, tl.float32)"
    rng = torch.Generator().manual_seed(0)
    for v in [0.1, 1 / 3, -2.5e-8, 123456.789, *(torch.randn(20, generator=rng, dtype=torch.float64) * 1e3).tolist()]:
        src = codegen._const(v, "tl.float64")
        parts = [float(x) for x in re.findall(r"tl\.cast\(([^,]+), tl\.float64\)", src)]
        assert all(struct.unpack("f", struct.pack("f", p))[0] == p for p in parts), src  # each an fp32 literal
        assert math.fsum(parts) == v and sum(parts) == v, (v, src)


def test_generated_source_is_inspectable():
    g = trace_mod.trace(lambda s, b, h, q_idx, kv_idx: s + (q_idx - kv_idx), "score")
    h = codegen.hooks(g)
    text = open(h.path).read()
    assert "@triton.jit" in text and "def score_mod(" in text and "def score_mod_dscore(" in text
    assert "test_flex.py:" in text  # each op names the user's line
    import inspect

    assert inspect.getsource(h.functions["score_mod"].fn).startswith("@triton.jit")


# ---------------------------------------------------------------------------------------------
# Errors name the op, the line, the argument


def test_unsupported_op_names_op_and_line():
    def mod(score, b, h, q_idx, kv_idx):
        return torch.erfinv(score)  # the line the error must name

    with pytest.raises(flex.FlexTraceError) as e:
        flex.flex_attention(*(torch.randn(1, 1, 8, 8) for _ in range(3)), score_mod=mod)
    msg = str(e.value)
    assert "torch.erfinv" in msg and "test_flex.py:" in msg and "return torch.erfinv(score)" in msg


def test_python_control_flow_names_line():
    def mask(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:  # data-dependent branch
            return q_idx > 0
        return kv_idx > 0

    with pytest.raises(flex.FlexTraceError, match=r"test_flex.py:\d+: if q_idx > kv_idx"):
        flex.create_block_mask(mask, None, None, 16, 16, device=DEVICE, BLOCK_SIZE=16)


def test_argument_errors_name_value_and_expectation():
    q = torch.randn(1, 4, 32, 16)
    kv = torch.randn(1, 3, 32, 16)
    with pytest.raises(ValueError, match="key has 3 heads, query has 4; 4 is not a multiple of 3"):
        flex.flex_attention(q, kv, kv, enable_gqa=True)
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        flex.flex_attention(q, kv, kv)
    bm = flex.create_block_mask(MASKS["causal"], None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=re.escape("created for (Q_LEN, KV_LEN) = (64, 64), the call has (32, 32)")):
        flex.flex_attention(q, q, q, block_mask=bm)
    with pytest.raises(ValueError, match="return_lse or return_aux"):
        flex.flex_attention(q, q, q, return_lse=True, return_aux=flex.AuxRequest(lse=True))
    with pytest.raises(ValueError, match="Q_LEN must be a positive int.*got 0"):
        flex.create_block_mask(MASKS["causal"], None, None, 0, 8)
    with pytest.raises(flex.FlexTraceError, match="shape \\(4, 5\\) is used with 1 of its 2 indices"):
        t = torch.randn(4, 5)
        flex.flex_attention(q, q, q, score_mod=lambda s, b, h, qi, ki: s + t[h])
    # lists with a column for 1 of the 2 key blocks: the backward would read past its query-side lists
    narrow = flex.BlockMask.from_kv_blocks(torch.ones(1, 1, 2, dtype=torch.int32),
                                           torch.zeros(1, 1, 2, 1, dtype=torch.int32), BLOCK_SIZE=16,
                                           seq_lengths=(32, 32))
    with pytest.raises(ValueError, match="kv_indices has 1 key blocks; the call's 32 keys in blocks of 16 need 2"):
        flex.flex_attention(q, q, q, block_mask=narrow)


# ---------------------------------------------------------------------------------------------
# The core's flex mode (kernels.core.attn_fwd / attn_bwd FLEX): which path ran, and what never recompiles


def _compiles() -> int:
    """Compiled variants of the core's forward and backward (a GPU run; the interpreter compiles nothing)."""
    from attend.kernels import core

    return sum(len(c[0]) for fn in (core.attn_fwd, core.attn_bwd) for c in getattr(fn, "device_caches", {}).values())


def test_fused_path_taken_and_blocked_where_declined():
    """fp32 (and CUDA tensors) run the core's flex mode; fp64 and a BLOCK_SIZE no tile divides
    decline to the blocked path. Both agree with the float64 definition. (Causal is a band mask,
    which runs the dense kernels; the band route is off here.)"""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, E, device=DEVICE) for n in (40, 56, 56))
    mask = MASKS["causal"]
    for dtype, block, path in ((torch.float32, 16, "fused"), (torch.float64, 16, "blocked"),
                               (torch.float32, 8, "blocked")):
        bm = flex.create_block_mask(mask, None, None, 40, 56, device=DEVICE, BLOCK_SIZE=block)
        before = dict(dispatch.PATHS)
        with kernel_options(flex_bands=False):
            out = flex.flex_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=bm)
        assert dispatch.PATHS[path] == before[path] + 1, (dtype, block, path)
        ref64, = dense_reference(q, k, v, None, mask, torch.float64)[:1]
        ref32, = dense_reference(q, k, v, None, mask, torch.float32)[:1]
        assert_scaled_close(out.to(torch.float64), ref64, ref32, what=f"{dtype} BLOCK_SIZE={block}")


def test_fused_kernel_options_tiles_and_ragged_full_blocks():
    """kernel_options' BLOCK_M / BLOCK_N reach the core (shrunk to divide BLOCK_SIZE), and a
    full block that runs past S (no mask: every block full) is bounded."""
    from attend.kernels import launch

    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, E, device=DEVICE) for n in (50, 75, 75))
    blocks = flex._lists.dense(50, 75, q.device, 32)
    t = launch.flex_tiles(q, k, blocks, kernel_options={"BLOCK_M": 64, "BLOCK_N": 16})
    assert (t.meta["BLOCK_M"], t.meta["BLOCK_N"]) == (32, 16), t
    fused = dispatch.PATHS["fused"]
    out, lse = flex.flex_attention(q, k, v, score_mod=_score_mods(torch.float32)["softcap"][0], return_lse=True,
                                   kernel_options={"BLOCK_M": 32, "BLOCK_N": 16})
    assert dispatch.PATHS["fused"] == fused + 1
    sm = _score_mods(torch.float32)["softcap"][0]
    o64, lse64, _ = dense_reference(q, k, v, sm, None, torch.float64)
    o32, lse32, _ = dense_reference(q, k, v, sm, None, torch.float32)
    assert_scaled_close(out, o64, o32, what="out")
    assert_scaled_close(lse, lse64, lse32, what="lse")


def test_fused_new_length_batch_or_captured_value_compiles_nothing():
    """On the core's flex mode, forward and backward (with the captured table's gradient): a new
    length, batch or captured value generates no code and compiles no kernel (counted on the GPU;
    the interpreter compiles nothing)."""
    def run(n, bsz, seed):
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(HQ, 2 * n, generator=g).to(DEVICE).requires_grad_()
        doc = torch.randint(0, 3, (bsz, n), generator=g).sort(-1).values.to(DEVICE)
        sm = lambda s, b, h, q_idx, kv_idx: s + table[h, q_idx - kv_idx + n]
        mm = lambda b, h, q_idx, kv_idx: (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
        bm = flex.create_block_mask(mm, bsz, None, n, n, device=DEVICE, BLOCK_SIZE=32)
        q, k, v = (torch.randn(bsz, HQ, n, E, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
        before = dict(dispatch.PATHS)
        out = flex.flex_attention(q, k, v, score_mod=sm, block_mask=bm)
        dout = torch.randn(out.shape, generator=g).to(DEVICE)
        grads = torch.autograd.grad((out * dout).sum(), (q, k, v, table))
        assert dispatch.PATHS["fused"] == before["fused"] + 1
        assert dispatch.PATHS["fused_backward"] == before["fused_backward"] + 1
        res = {}
        for dt in (torch.float64, torch.float32):
            leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, table)]
            o = dense_reference(*leaves[:3], _with_captures(sm, [table], leaves[3:]), mm, dt)[0]
            res[dt] = (o, torch.autograd.grad((o * dout.to(dt)).sum(), leaves))
        assert_scaled_close(out, res[torch.float64][0], res[torch.float32][0], what=f"n={n} batch={bsz}")
        for name, a, r, s_ in zip(["dq", "dk", "dv", "dtable"], grads, res[torch.float64][1], res[torch.float32][1]):
            assert_scaled_close(a, r, s_, k=6.0, what=f"n={n} batch={bsz} {name}")

    run(40, 2, 0)  # lengths of one Triton specialization class (not multiples of 16)
    gens, compiled = codegen.GENERATIONS["count"], _compiles()
    for n, bsz, seed in ((56, 2, 1), (40, 3, 2)):  # each with new captured values (its seed)
        run(n, bsz, seed)
    assert codegen.GENERATIONS["count"] == gens, "a new length, batch or captured value generated code"
    assert _compiles() == compiled, "a new length, batch or captured value compiled the core again"


def test_fused_backward_lse_gradient_broadcast_keys_and_kernel_options():
    """The core's flex backward with a gradient into the lse, GQA, a key batch of 1 broadcast
    over 2, ragged ends, and kernel_options' backward tiles (shrunk to divide BLOCK_SIZE)."""
    from attend.kernels import launch

    torch.manual_seed(6)
    q = torch.randn(2, HQ, 50, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, HKV, 75, E, device=DEVICE, requires_grad=True) for _ in range(2))
    mask = MASKS["window"]
    bm = flex.create_block_mask(mask, None, None, 50, 75, device=DEVICE, BLOCK_SIZE=32)
    opts = {"BLOCK_M1": 64, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 32}
    t = launch.flex_bwd_tiles(q, k, flex._lists.from_block_mask(bm), kernel_options=opts)
    assert [t.meta[n] for n in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")] == [32, 16, 16, 32], t
    sm = _score_mods(torch.float32)["alibi"][0]
    before = dict(dispatch.PATHS)
    out, lse = flex.flex_attention(q, k, v, sm, bm, enable_gqa=True, return_lse=True, kernel_options=opts)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    assert dispatch.PATHS["fused_backward"] == before["fused_backward"] + 1
    res = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t_.detach().to(dt).requires_grad_() for t_ in (q, k, v)]
        o, lse_r, _ = dense_reference(leaves[0], *(x.expand(2, -1, -1, -1) for x in leaves[1:]), sm, mask, dt)
        res[dt] = torch.autograd.grad((o * go.to(dt)).sum() + (lse_r * gl.to(dt)).sum(), leaves)
    for name, a, r, s_ in zip(["dq", "dk", "dv"], grads, res[torch.float64], res[torch.float32]):
        assert a.shape == r.shape, (name, a.shape, r.shape)
        assert_scaled_close(a, r, s_, k=6.0, what=name)


@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
def test_flex_tiles_never_exceed_the_dense_configs(block_d):
    """The flex kernels' tiles (configs.flex_tile / flex_bwd_tile) only shrink the dense config
    they start from: the dense configs are sized to fit shared memory (head dim 256's backward at
    16 / 64 / 64 / 16), and a flex kernel holds more buffers (its extra key loops), never fewer."""
    from attend.kernels.configs import flex_bwd_tile, flex_tile, heuristic

    keys = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
    for elem, seq, group in itertools.product((2, 4), (128, 1024, 16384), (1, 8)):
        f = heuristic("fwd", block_d, flags={}, elem=elem, seq_bucket=seq, group=group)
        block_n, stages, _ = flex_tile(f.kwargs["BLOCK_N"], f.num_stages, f.num_warps, block_d)
        assert block_n <= f.kwargs["BLOCK_N"] and stages <= f.num_stages, (block_d, elem, seq, group)
        b = heuristic("bwd", block_d, flags={}, elem=elem, seq_bucket=seq, group=group)
        dense = {key: b.kwargs[key] for key in keys}
        meta, stages, _ = flex_bwd_tile(dense, b.num_stages, b.num_warps, block_d)
        assert all(meta[key] <= dense[key] for key in keys) and stages <= b.num_stages, \
            (block_d, elem, seq, group, dense, meta)


def test_deterministic_mode_keeps_capture_gradients_off_atomics():
    """Under torch.use_deterministic_algorithms(True), a score capture that requires grad takes the
    blocked backward (the core scatters capture gradients by atomics), bit-identical across two
    runs; without one the core's backward runs (no atomics there)."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, HQ, 60, E, device=DEVICE, requires_grad=True) for _ in range(3))
    table = (0.5 * torch.randn(HQ, 120, device=DEVICE)).requires_grad_()
    sm = lambda s, b, h, qi, ki: s + table[h, qi - ki + 60]
    bm = flex.create_block_mask(MASKS["causal"], None, None, 60, 60, device=DEVICE, BLOCK_SIZE=16)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            before = dict(dispatch.PATHS)
            out = flex.flex_attention(q, k, v, sm, bm)
            runs.append(torch.autograd.grad(out.square().sum(), (q, k, v, table)))
            assert dispatch.PATHS["fused"] == before["fused"] + 1
            assert dispatch.PATHS["blocked_backward"] == before["blocked_backward"] + 1
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        before = dict(dispatch.PATHS)
        out = flex.flex_attention(q, k, v, _score_mods(torch.float32)["softcap"][0], bm)
        torch.autograd.grad(out.square().sum(), (q, k, v))
        assert dispatch.PATHS["fused_backward"] == before["fused_backward"] + 1
    finally:
        torch.use_deterministic_algorithms(was)
    res = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, table)]
        o = dense_reference(*leaves[:3], _with_captures(sm, [table], leaves[3:]), MASKS["causal"], dt)[0]
        res[dt] = torch.autograd.grad(o.square().sum(), leaves)
    for name, a, r, s_ in zip(["dq", "dk", "dv", "dtable"], runs[0], res[torch.float64], res[torch.float32]):
        assert_scaled_close(a, r, s_, k=6.0, what=name)


def test_fused_backward_keeps_non_finite_mod_values_out_of_gradients():
    """A score_mod that is not finite at s = 0 (rows past L read q = 0) or at masked positions
    (log of q - kv + 1 under causal) leaves every gradient finite and equal to the definition over
    the kept positions (the derivative is taken only where dS is nonzero)."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, HQ, 40, E, device=DEVICE, requires_grad=True) for _ in range(3))
    w = (0.1 * torch.rand(HQ, device=DEVICE)).requires_grad_()
    sm = lambda s, b, h, qi, ki: s - 0.1 * s * torch.log(s.abs()) - w[h] * torch.log((qi - ki + 1).float())
    bm = flex.create_block_mask(MASKS["causal"], None, None, 40, 40, device=DEVICE, BLOCK_SIZE=32)
    before = dict(dispatch.PATHS)
    out = flex.flex_attention(q, k, v, sm, bm)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, w))
    assert dispatch.PATHS["fused_backward"] == before["fused_backward"] + 1
    assert all(torch.isfinite(t).all() for t in grads)
    res = {}
    keep = torch.ones(40, 40, dtype=torch.bool, device=DEVICE).tril()
    for dt in (torch.float64, torch.float32):  # the definition, with masked positions never evaluated
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v, w)]
        s = ls[0] @ ls[1].transpose(-1, -2) / E ** 0.5
        qi, ki = torch.arange(40, device=DEVICE).view(-1, 1), torch.arange(40, device=DEVICE).view(1, -1)
        lag = torch.where(keep, qi - ki + 1, 1).to(dt)
        s = torch.where(keep, s - 0.1 * s * torch.log(s.abs()) - ls[3].view(1, -1, 1, 1) * torch.log(lag), -torch.inf)
        o = torch.softmax(s, -1) @ ls[2]
        res[dt] = torch.autograd.grad((o * g.to(dt)).sum(), ls)
    for name, a, r, s_ in zip(["dq", "dk", "dv", "dw"], grads, res[torch.float64], res[torch.float32]):
        assert_scaled_close(a, r, s_, k=6.0, what=name)


def test_interval_bounds_corner_cases_match_exhaustive():
    """Integer where with a bool branch, int64 products that would wrap, literals past int32, and
    torch.logical_not of an integer (its truth value, not its bits) classify as exhaustively."""
    from attend._flex.block_mask import classify

    cases = [lambda b, h, q, k: torch.where(q >= k, q >= 5, 3) > 0,
             lambda b, h, q, k: (q.to(torch.int64) * 2 ** 61) > 0,
             lambda b, h, q, k: (q - k) < 2 ** 32,
             lambda b, h, q, k: torch.logical_not(q - k)]
    for i, mask in enumerate(cases):
        g = trace_mod.trace(mask, "mask")
        got = classify(g, 1, 1, 40, 40, 16, 16, DEVICE, impl="torch")
        ref = classify(g, 1, 1, 40, 40, 16, 16, DEVICE, impl="torch", bounds=False)
        assert torch.equal(got, ref), i
    ours = flex.create_block_mask(cases[3], None, None, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    theirs = tflex.create_block_mask(cases[3], None, None, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)


def test_trace_cache_reuses_a_mod_only_while_what_it_reads_is_the_same():
    """A mod made again with the same code and the same closure values is not traced again; a new
    number or a new tensor is; a mod reading another object's attribute is traced every call; the
    cache keeps no captured tensor alive."""
    import gc
    import weakref

    def make(cap, t):
        def sm(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap) + t[h, q_idx - kv_idx + 64]
        return sm

    table = torch.randn(HQ, 128, device=DEVICE)
    counts = trace_mod.TRACES
    before = dict(counts)
    g1 = trace_mod.trace_cached(make(30.0, table), "score")
    g2 = trace_mod.trace_cached(make(30.0, table), "score")
    assert counts["traced"] == before["traced"] + 1 and counts["cached"] == before["cached"] + 1
    assert g2.key == g1.key and g2.scalars == g1.scalars and g2.captures[0].tensor is table
    assert trace_mod.trace_cached(make(20.0, table), "score").scalars[0] == 20.0
    other = torch.randn(HQ, 128, device=DEVICE)
    assert trace_mod.trace_cached(make(30.0, other), "score").captures[0].tensor is other
    assert counts["traced"] == before["traced"] + 3

    class Holder:
        scale = 2.0

    obj = Holder()
    for _ in range(2):
        trace_mod.trace_cached(lambda s, b, h, q_idx, kv_idx: s * obj.scale, "score")
    assert counts["traced"] == before["traced"] + 5

    ref = weakref.ref(other)
    del other, g1, g2
    gc.collect()
    assert ref() is None, "the trace cache kept a captured tensor alive"


def test_model_layout_views_keep_their_layout():
    """(B, L, H, D) projections seen through .transpose(1, 2), as models pass them: the output
    comes back in the same layout (its transpose is contiguous: no copy before the output
    projection) and equals the contiguous call's."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(B, n, h, E, device=DEVICE).transpose(1, 2) for n, h in ((L, HQ), (S, HKV), (S, HKV)))
    bm = _block_mask("causal")
    out = flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    assert out.transpose(1, 2).is_contiguous()
    ref = flex.flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=bm, enable_gqa=True)
    assert torch.equal(out, ref)


def test_output_on_model_views_takes_in_place_ops():
    """The output in the query's layout is made by strides, not as a view: under autograd it takes
    in-place ops as a contiguous call's output does."""
    q, k, v = (torch.randn(B, n, h, E, device=DEVICE).transpose(1, 2).requires_grad_()
               for n, h in ((L, HQ), (S, HKV), (S, HKV)))
    out = flex.flex_attention(q, k, v, enable_gqa=True)
    want = 2.0 * out.detach()
    out.mul_(2.0)
    assert torch.equal(out.detach(), want)


@pytest.mark.parametrize("n_q,n_kv,block,mask_name", [(300, 280, 256, "window"), (128, 192, 64, "window"),
                                                      (128, 192, 64, "document")],
                         ids=["block_past_padding", "even_band", "even_lists"])
def test_fused_backward_walks_whole_listed_blocks(n_q, n_kv, block, mask_name):
    """The core's loops run across every listed block: a BlockMask block larger than the rows the
    backward's statistics are padded to (256 > 128) with ragged ends, and lengths that are
    multiples of the blocks (unmasked loads, and no loop for a block past S), on the band's
    loops (the window) and on the lists (document ids), all against float64."""
    torch.manual_seed(10)
    q = torch.randn(1, HQ, n_q, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, HQ, n_kv, E, device=DEVICE, requires_grad=True) for _ in range(2))
    mask = MASKS[mask_name]
    if mask_name == "document":  # documents of 96 positions: full and partial blocks of 64, every key inside S
        ids_q, ids_kv = (torch.arange(n, device=DEVICE) // 96 for n in (n_q, n_kv))
        mask = lambda b, h, q_idx, kv_idx: ids_q[q_idx] == ids_kv[kv_idx]  # noqa: E731
    bm = flex.create_block_mask(mask, None, None, n_q, n_kv, device=DEVICE, BLOCK_SIZE=block)
    if mask_name == "document":
        assert bm.full_kv_num_blocks.sum() > 0 and bm.kv_num_blocks.sum() > 0
    sm = _score_mods(torch.float32)["relative"][0]
    before = dict(dispatch.PATHS)
    out = flex.flex_attention(q, k, v, sm, bm)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert dispatch.PATHS["fused_backward"] == before["fused_backward"] + 1
    assert_grads_match_dense(out, grads, (q, k, v), lambda ls, dt: dense_reference(*ls, sm, mask, dt)[0], g,
                             ["dq", "dk", "dv"])


@pytest.mark.parametrize("source", ["torch_adjust", "from_kv_blocks"])
def test_listed_blocks_past_the_keys_add_nothing(source):
    """A block listed past the keys: PyTorch's ``BlockMask._adjust`` keeps one (it cuts each list
    to the new column count, not to the columns that exist), and ``from_kv_blocks`` takes any
    index. Here a full and a partial key block past S = 192 with lengths that divide into the
    blocks (the kernels' unmasked loads): the lists lose them on the way in, and output and
    gradients match float64 over the keys that exist."""
    torch.manual_seed(13)
    n_q, n_kv, blk = 128, 192, 64
    mask = lambda b, h, q_idx, kv_idx: (kv_idx < 64) | ((kv_idx >= 192) & (kv_idx % 2 == 0))  # noqa: E731
    if source == "torch_adjust":
        bm = tflex.create_block_mask(mask, None, None, n_q, 256, device=DEVICE, BLOCK_SIZE=blk)._adjust(n_q, n_kv)
        assert (bm.kv_indices[..., :2] == 3).any(), "PyTorch's crop no longer keeps the block past S"
    else:
        full_num = torch.full((1, 1, 2), 2, dtype=torch.int32, device=DEVICE)
        num = torch.full((1, 1, 2), 1, dtype=torch.int32, device=DEVICE)
        full_idx = torch.tensor([0, 4, 1], dtype=torch.int32, device=DEVICE).expand(1, 1, 2, 3)  # 4: past the grid
        idx = torch.tensor([3, 1, 2], dtype=torch.int32, device=DEVICE).expand(1, 1, 2, 3)
        bm = flex.BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=blk, mask_mod=mask,
                                           seq_lengths=(n_q, n_kv))
        assert bm.kv_num_blocks.sum() == 0 and bm.full_kv_num_blocks.sum() == 2
    q = torch.randn(1, HQ, n_q, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, HQ, n_kv, E, device=DEVICE, requires_grad=True) for _ in range(2))
    before = dispatch.PATHS["fused_backward"]
    out = flex.flex_attention(q, k, v, block_mask=bm)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert dispatch.PATHS["fused_backward"] == before + 1
    kept = lambda b, h, q_idx, kv_idx: kv_idx < 64  # noqa: E731 - block 0, the only one inside S
    assert_grads_match_dense(out, grads, (q, k, v), lambda ls, dt: dense_reference(*ls, None, kept, dt)[0], g,
                             ["dq", "dk", "dv"])


def test_pytorch_block_mask_converted_once_until_its_lists_change():
    """A PyTorch BlockMask passed call after call is converted once (its lists are sorted and cut
    on the way in); a list written in place (its version counter moves) or a new object converts
    again."""
    from attend._flex import block_mask as bm_mod

    theirs = tflex.create_block_mask(MASKS["causal"], None, None, 128, 128, device=DEVICE, BLOCK_SIZE=32)
    first = bm_mod.from_torch(theirs)
    assert bm_mod.from_torch(theirs) is first
    theirs.kv_indices.add_(0)
    again = bm_mod.from_torch(theirs)
    assert again is not first and torch.equal(again.kv_indices, first.kv_indices)
    other = tflex.create_block_mask(MASKS["causal"], None, None, 128, 128, device=DEVICE, BLOCK_SIZE=32)
    assert bm_mod.from_torch(other) is not again
    theirs.kv_indices = theirs.kv_indices.clone()  # a new tensor, at version 0 again
    assert bm_mod.from_torch(theirs) is not again
    entries = len(bm_mod._FROM_TORCH)
    del theirs, first, again
    import gc

    gc.collect()
    assert len(bm_mod._FROM_TORCH) == entries - 1  # the object's entry went with it
    with torch.inference_mode():  # lists without a version counter: converted every call, no error
        frozen = tflex.create_block_mask(MASKS["causal"], None, None, 128, 128, device=DEVICE, BLOCK_SIZE=32)
    assert torch.equal(bm_mod.from_torch(frozen).kv_indices, bm_mod.from_torch(other).kv_indices)


def test_trace_cache_follows_module_and_class_attributes_and_item_reads():
    """Values the cache cannot see change without tracing (a module or class attribute, a global
    read in a nested function, a captured tensor read with .item()) are never served from it."""
    import types as types_

    cfg = types_.ModuleType("attend_test_cfg2")
    cfg.SCALE = 3.25
    temp = torch.tensor(2.0)
    mods = [lambda s, b, h, qi, ki: s * cfg.SCALE,
            lambda s, b, h, qi, ki: (lambda x: x * cfg.SCALE)(s),
            lambda s, b, h, qi, ki: s * temp.item()]
    for i, mod in enumerate(mods):
        first = trace_mod.trace_cached(mod, "score").scalars
        cfg.SCALE, _ = 5.75, temp.fill_(4.0)
        assert trace_mod.trace_cached(mod, "score").scalars == trace_mod.trace(mod, "score").scalars != first, i
        cfg.SCALE, _ = 3.25, temp.fill_(2.0)


def test_trace_cache_keys_closure_numbers_by_value_unless_declared_data():
    """An undeclared closure number is keyed by value, whatever the mod does with it (Python reads a
    number in ways nothing observes: a tuple index, math.isinf), so each value gets its own trace and
    the right graph. Numbers a function declares data (``data_cells``, as the transformers
    integration's masks do for a decode step's ``S - L`` and window) are keyed by type: one trace
    for every value (0, 1 and a value equal to another number included), each evaluating as a
    fresh trace does. A declared number the mod uses in Python after all is keyed by value."""
    import math as math_

    counts = trace_mod.TRACES
    layer_types = ("sliding", "sliding", "full", "full")

    def per_layer(layer):  # a per-layer pattern: a tuple index reads the number unseen
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx < 4) | (layer_types[layer] == "full"))

    def capped(cap):
        def sm(score, b, h, q_idx, kv_idx):
            if math_.isinf(cap):
                return score
            return cap * torch.tanh(score / cap)
        return sm

    def window(off, w):
        pos = trace_mod.data_cells(lambda b, q_idx: q_idx + off, "off")
        return flex.and_masks(lambda b, h, q_idx, kv_idx: kv_idx <= pos(b, q_idx),
                              trace_mod.data_cells(lambda b, h, q_idx, kv_idx: kv_idx > pos(b, q_idx) - w, "w"))

    def misdeclared(n):  # declared, but used in Python arithmetic: keyed by value
        return trace_mod.data_cells(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + n * 2, "n")

    idx = torch.arange(-40, 40, dtype=torch.int32)
    inputs = dict(b=idx.new_zeros(()), h=idx.new_zeros(()), q_idx=idx.view(-1, 1), kv_idx=idx.view(1, -1))
    score = torch.linspace(-60, 60, 80).view(1, -1)

    def same_as_fresh(mod, kind="mask"):
        args = dict(inputs, score=score) if kind == "score" else inputs
        got = trace_mod.evaluate(trace_mod.trace_cached(mod, kind), args)[0]
        want = trace_mod.evaluate(trace_mod.trace(mod, kind), args)[0]
        assert torch.allclose(torch.as_tensor(got).expand(80, 80).float(), torch.as_tensor(want).expand(80, 80).float(),
                              equal_nan=True)

    for make, values, kind, traces in ((per_layer, (0, 1, 2, 3, 0, 2), "mask", 4),
                                       (capped, (50.0, 30.0, float("inf"), 50.0), "score", 3),
                                       (window, ((0, 512), (1, 512), (5, 512), (512, 512), (7, 512)), "mask", 1),
                                       (misdeclared, (1, 2, 3, 1), "mask", 3)):
        before = counts["traced"]
        for v in values:
            same_as_fresh(make(*v) if isinstance(v, tuple) else make(v), kind)
        assert counts["traced"] == before + traces, make.__name__
    with pytest.raises(ValueError, match="no closure variable nope"):
        trace_mod.data_cells(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "nope")


def test_trace_cache_takes_a_declared_closure_tensor_as_data_only_where_it_is_a_capture():
    """A mod made per call over a new tensor it declares data (a padding mask, a packed batch's
    sequence ids: ``data_cells``) is traced once, then served with each call's own tensor as its
    capture; an undeclared tensor is keyed by identity (a trace per new tensor), and so is a
    declared one the mod reads in Python (its shape, its values: not cached at all); the cache
    keeps none of these tensors alive."""
    import gc
    import weakref

    counts = trace_mod.TRACES
    idx = torch.arange(0, 12, dtype=torch.int32)
    inputs = dict(b=idx.new_zeros(()), h=idx.new_zeros(()), q_idx=idx.view(-1, 1), kv_idx=idx.view(1, -1))

    def same_doc(ids):
        return trace_mod.data_cells(lambda b, h, q_idx, kv_idx: ids[b, q_idx] == ids[b, kv_idx], "ids")

    def undeclared(ids):
        return lambda b, h, q_idx, kv_idx: ids[b, q_idx] == ids[b, kv_idx]

    def shaped(ids):  # the tensor's shape read in Python
        return trace_mod.data_cells(
            lambda b, h, q_idx, kv_idx: (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx < ids.shape[1] - 2), "ids")

    def valued(ids):  # a value read in Python
        return trace_mod.data_cells(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + int(ids[0, 0]), "ids")

    for make, traces in ((same_doc, 1), (undeclared, 5), (shaped, 5), (valued, 5)):
        before = counts["traced"]
        for i in range(5):
            ids = torch.randint(0, 3, (1, 12), dtype=torch.int32).sort(-1).values
            ids[0, 0] = i
            mod = make(ids)
            g = trace_mod.trace_cached(mod, "mask")
            assert any(c.tensor is ids for c in g.captures) or make is valued
            got = trace_mod.evaluate(g, inputs)[0]
            want = trace_mod.evaluate(trace_mod.trace(mod, "mask"), inputs)[0]
            assert torch.equal(torch.as_tensor(got).expand(12, 12), torch.as_tensor(want).expand(12, 12)), make
        assert counts["traced"] == before + traces, make.__name__
    ids = torch.zeros(1, 12, dtype=torch.int32)
    ref = weakref.ref(ids)
    trace_mod.trace_cached(same_doc(ids), "mask")
    del ids
    gc.collect()
    assert ref() is None, "the trace cache kept a closure tensor alive"


@pytest.mark.parametrize("loops", ["three", "two"])
def test_full_block_lists_in_any_order(loops):
    """A BlockMask whose full blocks are listed out of order (from_kv_blocks does not require
    ascending indices) still bounds the ragged one: in its own loop (three loops), and in the full
    blocks' loop (two: flex_ragged_in_full with TMA reads, whose zero-filled keys past S would
    otherwise count as scores of 0), with and without a score_mod."""
    from attend.kernels.options import kernel_options

    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 1, n, E, device=DEVICE) for n in (32, 80, 80))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    bm = flex.BlockMask.from_kv_blocks(torch.zeros(1, 1, 1, **i32), torch.tensor([[[[0, 1, 2]]]], **i32),
                                       torch.full((1, 1, 1), 3, **i32), torch.tensor([[[[2, 0, 1]]]], **i32),
                                       BLOCK_SIZE=32, seq_lengths=(32, 80))
    two = loops == "two"
    softcap = _score_mods(torch.float32)["softcap"][0]
    with kernel_options(flex_tma=two, tma=True if two else None, flex_ragged_in_full=two):
        for mod in (None, softcap):
            out = flex.flex_attention(q, k, v, score_mod=mod, block_mask=bm)
            assert_scaled_close(out, *(dense_reference(q, k, v, mod, None, dt)[0]
                                       for dt in (torch.float64, torch.float32)), what=f"{loops} loops, {mod}")


@pytest.mark.parametrize("one_loop,tma", [(True, False), (False, True), (True, True)], ids=["one_loop", "tma", "both"])
@pytest.mark.parametrize("score_name,mask_name", [("alibi", "document"), ("softcap", "prefix_lm"), ("relative", "window")])
def test_forward_one_loop_and_tma_match_float64(one_loop, tma, score_name, mask_name):
    """The flex forward's single loop over partial and full blocks (KernelOptions.flex_one_loop)
    and its K / V reads through tensor descriptors (flex_tma; ``tma=True`` forces them where the
    copy engine's check would refuse, as under the interpreter): out, lse and max_scores against
    the float64 definition, with partial, full, ragged and empty blocks. (create_block_mask never
    lists a ragged block full: the two-loop form's bound is tested with explicit BlockMasks.)"""
    from attend.kernels.options import kernel_options

    torch.manual_seed(12)
    score_mod, _ = _score_mods(torch.float32)[score_name]
    q = torch.randn(B, HQ, L, E, device=DEVICE)
    k, v = (torch.randn(B, HKV, S, E, device=DEVICE) for _ in range(2))
    from attend.kernels import launch

    fused = dispatch.PATHS["fused"]
    with kernel_options(flex_one_loop=one_loop, flex_tma=tma, tma=True if tma else None):
        blocks = flex._lists.from_block_mask(_block_mask(mask_name))
        assert launch.flex_tiles(q, k, blocks).meta["ONE_LOOP"] == one_loop  # what reaches the kernel
        assert launch._flex_tma(k, v, None, None) == tma
        out, aux = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=_block_mask(mask_name),
                                       enable_gqa=True, return_aux=flex.AuxRequest(lse=True, max_scores=True))
    assert dispatch.PATHS["fused"] == fused + 1, "the core's flex mode did not run"
    (o64, lse64, mx64), (o32, lse32, mx32) = (dense_reference(q, k, v, score_mod, MASKS[mask_name], dt)
                                              for dt in (torch.float64, torch.float32))
    what = f"{score_name} x {mask_name}, one_loop={one_loop}, tma={tma}"
    assert_scaled_close(out, o64, o32, what=f"{what} out")
    _close_with_empty_rows(aux.lse, lse64, lse32, what=f"{what} lse")
    _close_with_empty_rows(aux.max_scores, mx64, mx32, what=f"{what} max_scores")


@pytest.mark.parametrize("loops", ["three", "two"])
def test_a_full_block_listed_wholly_past_s_adds_nothing(loops):
    """A full block listed past the keys (index 3 of 32-key blocks with S = 80: from_kv_blocks takes
    it) adds nothing: a row that lists nothing else is empty (output 0, LSE -inf), never NaN, and a
    row that also lists real blocks gets their attention alone."""
    from attend.kernels.options import kernel_options

    torch.manual_seed(14)
    q, k, v = (torch.randn(1, 1, n, E, device=DEVICE) for n in (64, 80, 80))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    # query block 0: only the block past S; query block 1: key blocks 0 and 1, and the block past S
    bm = flex.BlockMask.from_kv_blocks(torch.zeros(1, 1, 2, **i32), torch.zeros(1, 1, 2, 4, **i32),
                                       torch.tensor([[[1, 3]]], **i32), torch.tensor([[[[3, 0, 0, 0], [0, 1, 3, 0]]]], **i32),
                                       BLOCK_SIZE=32, seq_lengths=(64, 80))
    two = loops == "two"
    with kernel_options(flex_tma=two, tma=True if two else None, flex_ragged_in_full=two):
        out, aux = flex.flex_attention(q, k, v, block_mask=bm, return_aux=flex.AuxRequest(lse=True))
    assert torch.equal(out[..., :32, :], torch.zeros_like(out[..., :32, :])), "a row with no key must be 0"
    assert torch.isneginf(aux.lse[..., :32]).all(), "a row with no key must have LSE -inf"
    seen = lambda b, h, q_idx, kv_idx: kv_idx < 64  # noqa: E731  (query block 1's real keys)
    refs = [dense_reference(q[..., 32:, :], k, v, None, seen, dt)[0] for dt in (torch.float64, torch.float32)]
    assert_scaled_close(out[..., 32:, :], *refs, what=f"{loops} loops")


@pytest.mark.parametrize("scale,loops", [(0.0, "three"), (-0.3, "two")])
def test_a_scale_at_or_below_zero_masks_like_a_positive_one(scale, loops):
    """A negative or zero scale: a mask_mod's dropped scores stay dropped (the loops without a
    score_mod mask the unscaled score, and -inf times such a scale is +inf or NaN), forward and
    backward, against float64."""
    from attend.kernels.options import kernel_options

    torch.manual_seed(15)
    q = torch.randn(B, HQ, L, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, HKV, S, E, device=DEVICE, requires_grad=True) for _ in range(2))
    two = loops == "two"
    with kernel_options(flex_tma=two, tma=True if two else None, flex_ragged_in_full=two):
        out = flex.flex_attention(q, k, v, block_mask=_block_mask("document"), scale=scale, enable_gqa=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    refs = {}
    for dt in (torch.float64, torch.float32):
        ref = dense_reference(q, k, v, None, MASKS["document"], dt, scale=scale)[0]
        refs[dt] = (ref, *torch.autograd.grad((ref * dout.to(dt)).sum(), (q, k, v)))
    for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *grads))):
        assert_scaled_close(got, refs[torch.float64][i], refs[torch.float32][i], k=6.0,
                            what=f"scale {scale}, {loops} loops, {name}")


def test_one_loop_bounds_a_ragged_full_block_listed_first():
    """The single loop bounds the full block that reaches past S wherever its list puts it (the
    loops per kind of block take the last listed as the ragged one, which BlockMask's sorting
    guarantees; these lists skip it and go to the kernel as they are)."""
    from attend._flex.lists import BlockLists
    from attend.kernels import launch

    torch.manual_seed(13)
    q, k, v = (torch.randn(1, 1, n, E, device=DEVICE) for n in (32, 80, 80))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    blocks = BlockLists(torch.ones(1, 1, 1, **i32), torch.tensor([[[[1, 0, 2]]]], **i32),
                        torch.full((1, 1, 1), 2, **i32), torch.tensor([[[[2, 0, 1]]]], **i32),
                        None, None, None, None, (32, 32), (32, 80))
    out, _, _ = launch.flex_forward(q, k, v, blocks, E ** -0.5, options=dict(flex_one_loop=True))
    assert_scaled_close(out, *(dense_reference(q, k, v, None, None, dt)[0] for dt in (torch.float64, torch.float32)))


@pytest.mark.parametrize("score_name,mask_name", [("table_grad", "window"), ("alibi", "document")])
def test_backward_one_loop_matches_float64(score_name, mask_name):
    """The flex backward's single loops (KernelOptions.flex_bwd_one_loop: the dQ programs' partial,
    full and ragged key blocks in one loop, the dK / dV programs' partial and full query blocks in
    one): out and every gradient, a captured table's included, against the float64 definition."""
    from attend.kernels.options import kernel_options

    torch.manual_seed(14)
    score_mod, caps = _score_mods(torch.float32)[score_name]
    q = torch.randn(B, HQ, L, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, HKV, S, E, device=DEVICE, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, HQ, L, E, device=DEVICE)
    fused_bwd = dispatch.PATHS["fused_backward"]
    with kernel_options(flex_one_loop=True, flex_bwd_one_loop=True):
        out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=_block_mask(mask_name), enable_gqa=True)
        grads = torch.autograd.grad((out * dout).sum(), [q, k, v, *caps])
    assert dispatch.PATHS["fused_backward"] == fused_bwd + 1, "the core's flex backward did not run"

    def reference(leaves, dt):
        sm = _with_captures(score_mod, caps, leaves[3:])
        return dense_reference(*leaves[:3], sm, MASKS[mask_name], dt)[0]

    assert_grads_match_dense(out, grads, [q, k, v, *caps], reference, dout, ["dq", "dk", "dv", "dtable"][:len(grads)])


def test_relative_position_gradients_sum_diagonals_first():
    """A captured table read at a function of q_idx - kv_idx only (here T5-style: a bias per
    bucket, the bucket looked up from a second capture) gets its gradient summed along each tile
    diagonal before the atomics (codegen's ``_diagonals``); other indices keep one atomic per
    element. Out and every gradient against the float64 definition on the fused path."""
    torch.manual_seed(15)
    bucket = (torch.arange(L + S, device=DEVICE) // 7).to(torch.int32)  # relative position -> bucket
    bias = (0.5 * torch.randn(HQ, int(bucket.max()) + 1, device=DEVICE)).requires_grad_()
    rows = (0.5 * torch.randn(HQ, L, device=DEVICE)).requires_grad_()

    def t5(score, b, h, q_idx, kv_idx):
        return score + bias[h, bucket[kv_idx - q_idx + L]] + rows[h, q_idx]

    src = codegen.source(trace_mod.trace(t5, "score"))
    assert src.count("= _diagonals(g") == 1, "the bucketed table's gradient is not summed by diagonals"
    by_sign = lambda score, b, h, q_idx, kv_idx: score + bias[(score > 0).int(), kv_idx - q_idx + L]
    assert "= _diagonals(g" not in codegen.source(trace_mod.trace(by_sign, "score")), "an index of the score"
    q = torch.randn(B, HQ, L, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, HKV, S, E, device=DEVICE, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, HQ, L, E, device=DEVICE)
    fused_bwd = dispatch.PATHS["fused_backward"]
    out = flex.flex_attention(q, k, v, score_mod=t5, block_mask=_block_mask("causal"), enable_gqa=True)
    grads = torch.autograd.grad((out * dout).sum(), [q, k, v, bias, rows])
    assert dispatch.PATHS["fused_backward"] == fused_bwd + 1, "the core's flex backward did not run"

    def reference(leaves, dt):
        def mod(score, b, h, q_idx, kv_idx):
            return score + leaves[3][h, bucket.long()[kv_idx - q_idx + L]] + leaves[4][h, q_idx]
        return dense_reference(*leaves[:3], mod, MASKS["causal"], dt)[0]

    assert_grads_match_dense(out, grads, [q, k, v, bias, rows], reference, dout, ["dq", "dk", "dv", "dbias", "drows"])


@functools.lru_cache(maxsize=None)
def _diagonal_kernel():
    import triton
    import triton.language as tl

    diagonals = codegen.hooks(trace_mod.trace(lambda s, b, h, q, k: s, "score")).module._diagonals

    @triton.jit
    def kernel(G, Q, KV, D, m0, n0, L, S, DIAG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
        rows = m0 + tl.arange(0, BM)
        cols = n0 + tl.arange(0, BN)
        g = tl.load(G + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :])
        q, kv, sums = DIAG(g, tl.minimum(rows, L - 1)[:, None], tl.minimum(cols, S - 1)[None, :])
        t = tl.arange(0, T)[None, :]
        tl.store(Q + t, q)
        tl.store(KV + t, kv)
        tl.store(D + t, sums)

    return kernel, diagonals


@pytest.mark.parametrize("BM,BN,m0,n0", [(16, 16, 0, 0), (16, 16, 144, 160), (32, 32, 128, 32), (16, 32, 144, 160),
                                         (32, 16, 128, 32), (64, 16, 128, 0)])
def test_diagonal_sums_of_a_gradient_tile(BM, BN, m0, n0):
    """codegen's ``_diagonals`` on square (the cyclic skew), wide, tall and ragged tiles (rows past
    L = 150 and keys past S = 170 hold 0, as dS does): every nonzero sum is its diagonal's, at a (query, key) pair
    of that diagonal inside the tile and in range, and every returned pair is in range (the mod's
    index loads read there)."""
    L_, S_, T = 150, 170, 2 * max(BM, BN)
    kernel, diagonals = _diagonal_kernel()
    rows = torch.arange(m0, m0 + BM)[:, None]
    cols = torch.arange(n0, n0 + BN)[None, :]
    g = (torch.randn(BM, BN) * ((rows < L_) & (cols < S_))).to(DEVICE)
    q, kv = (torch.zeros(T, dtype=torch.int32, device=DEVICE) for _ in range(2))
    sums = torch.zeros(T, device=DEVICE)
    kernel[(1,)](g, q, kv, sums, m0, n0, L_, S_, diagonals, BM, BN, T)
    q, kv, sums, g = q.cpu(), kv.cpu(), sums.cpu(), g.cpu()
    assert bool(((q >= m0) & (q < min(m0 + BM, L_)) & (kv >= n0) & (kv < min(n0 + BN, S_))).all()), (q, kv)
    want = {}
    for i in range(BM):
        for j in range(BN):
            want[m0 + i - n0 - j] = want.get(m0 + i - n0 - j, 0.0) + float(g[i, j])
    got = {}
    for t in range(T):
        if sums[t] != 0:
            d = int(q[t] - kv[t])
            assert d not in got, f"diagonal {d} summed twice"
            got[d] = float(sums[t])
    for d in set(want) | set(got):
        assert abs(got.get(d, 0.0) - want.get(d, 0.0)) <= 1e-5 * (1 + abs(want.get(d, 0.0))), d


def test_list_strides_made_once_per_layout():
    """The lists' 14 strides (core._list_row) are one small tensor per layout and device: made anew
    each call, its host-to-device copy waits for the GPU's queue. A size-1 batch or head dim reads
    as stride 0 (broadcast)."""
    from attend.kernels import launch

    num, idx = torch.zeros(2, 4, 8, dtype=torch.int32), torch.zeros(2, 4, 8, 8, dtype=torch.int32)
    first = launch._list_strides(num, idx, num, idx, DEVICE)
    assert first.tolist() == [32, 8, 1, 256, 64, 8, 1] * 2
    assert launch._list_strides(num.clone(), idx.clone(), num, idx, DEVICE) is first
    shared = launch._list_strides(num[:1], idx[:1], num[:1], idx[:1], DEVICE)
    assert shared is not first and shared.tolist() == [0, 8, 1, 0, 64, 8, 1] * 2


def test_head_major_backward_order_gives_the_same_gradients(monkeypatch):
    """KernelOptions.head_major runs each KV head's dK / dV programs, then its dQ programs (the
    order Inductor's flex template uses; the default on the lists, not on a band's loops) instead
    of every head's dK / dV programs first: the same programs in another order, so the same
    gradients bit for bit (no atomics), with GQA and a document mask's lists."""
    from attend.kernels import launch
    from attend.kernels.options import kernel_options

    seen, tiles = [], launch.flex_bwd_tiles

    def spy(*a, **kw):  # the launches' calls (a GPU's warmup makes one more): they pass lists=
        out = tiles(*a, **kw)
        if "lists" in kw:
            seen.append(out.meta["HEAD_MAJOR"])
        return out

    monkeypatch.setattr(launch, "flex_bwd_tiles", spy)
    torch.manual_seed(12)
    n_q, n_kv = 96, 112  # three by four blocks of BLOCK, as the whole matrix's lists: partial and empty ones
    q = torch.randn(B, HQ, n_q, E, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, HKV, n_kv, E, device=DEVICE, requires_grad=True) for _ in range(2))
    bm = flex.create_block_mask(MASKS["document"], B, None, n_q, n_kv, device=DEVICE, BLOCK_SIZE=BLOCK)
    g = torch.randn(B, HQ, n_q, E, device=DEVICE)
    grads, orders = [], []
    before = dispatch.PATHS["fused_backward"]
    for opts in (dict(head_major=False), {}):  # key-block major, then the lists' default
        seen.clear()
        with kernel_options(**opts):
            out = flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
            grads.append(torch.autograd.grad((out * g).sum(), (q, k, v)))
        orders.append(set(seen))
    assert dispatch.PATHS["fused_backward"] == before + 2
    assert orders == [{False}, {True}], orders
    for name, a, b in zip("qkv", *grads):
        assert torch.equal(a, b), f"d{name}"
    order = lambda **kw: tiles(q, k, bm, **kw).meta["HEAD_MAJOR"]  # noqa: E731
    assert order() and not order(lists=False)
    assert not order(options=dict(head_major=False)) and order(options=dict(head_major=True), lists=False)
    assert not order(options=dict(flex_bwd_split=True))
    # a band's loops (a score_mod over causal) keep the key-block-major order
    seen.clear()
    n = 64
    qs, ks, vs = (t.detach()[:, :, :n].requires_grad_() for t in (q, k, v))
    causal = flex.create_block_mask(MASKS["causal"], None, None, n, n, device=DEVICE, BLOCK_SIZE=BLOCK)
    band_before = dispatch.PATHS["band_hooks_backward"]
    flex.flex_attention(qs, ks, vs, lambda s_, b, h, q_idx, kv_idx: s_ * 0.5, causal, enable_gqa=True).sum().backward()
    assert dispatch.PATHS["band_hooks_backward"] == band_before + 1
    assert seen and not any(seen), seen

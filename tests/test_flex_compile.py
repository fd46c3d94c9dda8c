"""attend.flex_attention inside torch.compile(fullgraph=True): the mods' tensors become inputs of
the attend::flex_fwd op (gradients included), against the same call run eagerly and the float64
definition."""

from __future__ import annotations

import math
import types

import pytest
import torch

import attend.flex_attention as flex
from attend._flex import dispatch
from attend._versions import GRAPH_MADE_MODS
from conftest import DEVICE, assert_scaled_close
from test_flex import MASKS, _with_captures, dense_reference

B, H, L, S, E = 2, 2, 48, 64, 16
GLOBAL_SLOPES = torch.tensor([0.25, 0.5], device=DEVICE)  # a module global a score_mod reads


def _inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, E, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for n in (L, S, S)]


def _compile(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _check_against_eager_and_float64(fn, args, trained, score_mod, mask_mod, what):
    """``fn`` compiled (fullgraph) equals ``fn`` eager, and both match the float64 definition,
    outputs and the gradients of the inputs and ``trained`` captures."""
    before = dict(dispatch.PATHS)
    out = _compile(fn)(*args)
    assert sum(dispatch.PATHS[p] for p in ("fused", "blocked")) == sum(before[p] for p in ("fused", "blocked")) + 1
    g = torch.randn_like(out)
    leaves = [*args[:3], *trained]
    grads = torch.autograd.grad((out * g).sum(), leaves)
    ref_out = fn(*args)
    ref_grads = torch.autograd.grad((ref_out * g).sum(), leaves)
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-6), what
    for a, r in zip(grads[:3], ref_grads[:3]):
        assert torch.allclose(a, r, rtol=0, atol=1e-6), what
    for a, r in zip(grads[3:], ref_grads[3:]):  # a capture's gradient adds by atomics, in any order on a GPU
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item())), what
    res = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        o = dense_reference(*ls[:3], _with_captures(score_mod, trained, ls[3:]), mask_mod, dt)[0]
        res[dt] = (o, torch.autograd.grad((o * g.to(dt)).sum(), ls))
    assert_scaled_close(out, res[torch.float64][0], res[torch.float32][0], what=f"{what} out")
    for i, (a, r, s) in enumerate(zip(grads, res[torch.float64][1], res[torch.float32][1])):
        assert_scaled_close(a, r, s, k=6.0, what=f"{what} grad {i}")


def test_trained_table_and_document_mask_fullgraph():
    """A relative-bias table that requires grad (a closure variable) and a document mask whose ids
    sit two closures deep (and_masks): compiled with fullgraph=True, equal to eager, gradients
    reach the table."""
    q, k, v = _inputs(0)
    table = (0.5 * torch.randn(H, L + S, device=DEVICE)).requires_grad_()
    doc = torch.randint(0, 3, (B, S), device=DEVICE).sort(-1).values

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + S]

    docs = flex.and_masks(lambda b, h, qi, ki: doc[b, qi] == doc[b, ki], MASKS["causal"])
    bm = flex.create_block_mask(docs, B, None, L, S, device=DEVICE, BLOCK_SIZE=16)
    fn = lambda q, k, v: flex.flex_attention(q, k, v, rel, bm)
    mask_ref = lambda b, h, qi, ki: (doc[b, qi] == doc[b, ki]) & (qi >= ki)
    _check_against_eager_and_float64(fn, (q, k, v), [table], rel, mask_ref, "table + document")


def _rel_bias(score, b, h, q_idx, kv_idx, table, factor):
    return score + factor * table[h, q_idx - kv_idx + S]


def _doc_mask(b, h, q_idx, kv_idx, doc):
    return doc[b, q_idx] == doc[b, kv_idx]


@pytest.mark.skipif(not GRAPH_MADE_MODS, reason="create_block_mask runs in the graph from torch 2.13")
def test_bound_mods_over_tensors_made_in_the_graph_fullgraph():
    """BoundMods (module-level bodies beside the tensors they read) over tensors the compiled
    function makes: a relative-bias table computed from a trained parameter, and a document mask's
    BlockMask built in the graph from ids computed there. fullgraph=True holds, the output and the
    gradients (the parameter's through the table) equal the eager call's and the float64
    definition. Eager flex takes a BoundMod as the mod it stands for."""
    q, k, v = _inputs(4)
    base = (0.5 * torch.randn(H, L + S, device=DEVICE)).requires_grad_()
    positions = torch.arange(S, device=DEVICE)
    def fn(q, k, v, base, positions):
        table = base * 2.0
        doc = (positions // 20).expand(B, S)
        bm = flex.create_block_mask(flex.BoundMod(_doc_mask, (doc,)), B, None, L, S, device=DEVICE, BLOCK_SIZE=16)
        return flex.flex_attention(q, k, v, flex.BoundMod(_rel_bias, (table,), (0.5,)), bm)

    doc = (positions // 20).expand(B, S)
    mask_ref = lambda b, h, qi, ki: _doc_mask(b, h, qi, ki, doc)
    before = dict(dispatch.PATHS)
    out = _compile(fn)(q, k, v, base, positions)
    assert dispatch.PATHS["fused"] + dispatch.PATHS["blocked"] == before["fused"] + before["blocked"] + 1
    g = torch.randn_like(out)
    leaves = (q, k, v, base)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    ref = fn(q, k, v, base, positions)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()))
    res = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        o = dense_reference(*ls[:3], lambda s, b, h, qi, ki: _rel_bias(s, b, h, qi, ki, ls[3] * 2.0, 0.5), mask_ref,
                            dt)[0]
        res[dt] = (o, torch.autograd.grad((o * g.to(dt)).sum(), ls))
    assert_scaled_close(out, res[torch.float64][0], res[torch.float32][0], what="out")
    for i, (a, r, s_) in enumerate(zip(grads, res[torch.float64][1], res[torch.float32][1])):
        assert_scaled_close(a, r, s_, k=6.0, what=f"grad {i}")


class _Biased(torch.nn.Module):
    """A model whose score_mod (made once, in __init__) reads a parameter through ``self``, a
    buffer, and a module global."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(0.1 * torch.randn(H, device=DEVICE))
        self.register_buffer("table", torch.randn(H, L + S, device=DEVICE))

        def mod(score, b, h, q_idx, kv_idx):
            return score + self.bias[h] + self.table[h, q_idx - kv_idx + S] - GLOBAL_SLOPES[h] * (q_idx - kv_idx).abs()

        self.mod = mod

    def forward(self, q, k, v):
        return flex.flex_attention(q, k, v, self.mod)


def test_module_parameter_buffer_and_global_capture():
    m = _Biased()
    q, k, v = _inputs(1)
    before = dict(dispatch.PATHS)
    out = _compile(m)(q, k, v)
    assert dispatch.PATHS["fused"] + dispatch.PATHS["blocked"] == before["fused"] + before["blocked"] + 1
    out.square().sum().backward()
    got = m.bias.grad.clone()
    m.bias.grad = None
    m(q, k, v).square().sum().backward()
    assert torch.allclose(got, m.bias.grad, rtol=0, atol=1e-6)
    assert got.abs().sum() > 0


def test_new_captured_value_does_not_recompile_and_nested_number_mods_work():
    """The compiled graph takes the mod's tensors as inputs: a new value of a buffer reuses the
    graph. A mod defined inside the compiled function that closes over a Python number (a
    softcap) traces too."""
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    m = _Biased()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    q, k, v = _inputs(2)
    a = compiled(q, k, v)
    with torch.no_grad():
        m.table.copy_(torch.randn_like(m.table))
    b = compiled(q, k, v)
    assert counts["n"] == 1, f"{counts['n']} graphs for a new captured value"
    assert torch.allclose(b, m(q, k, v), rtol=0, atol=1e-6) and not torch.allclose(a, b)

    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13):
        return  # Dynamo before 2.13 cannot read a cell of a function made in the graph (docs/flex.md)

    def capped(q, k, v, cap: float = 4.0):
        def softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        return flex.flex_attention(q, k, v, softcap)

    out = _compile(capped)(q, k, v)
    ref = capped(q, k, v)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)


def test_pytorch_block_mask_and_float64_blocked_path():
    """A PyTorch BlockMask, and fp64 inputs (the blocked path, forward and backward inside the
    ops) under fullgraph=True."""
    import torch.nn.attention.flex_attention as tflex

    q, k, v = _inputs(2, torch.float64)
    bm = tflex.create_block_mask(MASKS["window"], None, None, L, S, device=DEVICE, BLOCK_SIZE=16)
    fn = lambda q, k, v: flex.flex_attention(q, k, v, block_mask=bm, scale=0.3)
    before = dict(dispatch.PATHS)
    out = _compile(fn)(q, k, v)
    assert dispatch.PATHS["blocked"] == before["blocked"] + 1
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert dispatch.PATHS["blocked_backward"] == before["blocked_backward"] + 1
    ref = fn(q, k, v)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, rtol=0, atol=1e-12)


def test_tensor_built_inside_the_mod_names_the_problem():
    """A tensor the mod builds itself cannot be traced back to a variable: under torch.compile that
    is an error that says what to do."""
    q, k, v = (t.detach() for t in _inputs(3))

    built = lambda s, b, h, qi, ki: s + torch.linspace(0, 1, H, device=DEVICE)[h]

    def fn(q, k, v):
        return flex.flex_attention(q, k, v, built)

    with pytest.raises(Exception, match="not a closure variable, global or attribute"):
        _compile(fn)(q, k, v)


CAP = 1.0  # a module-level softcap: 1.0 is generated as code, so the graph guards on it


def _softcap_global(score, b, h, q_idx, kv_idx):
    return CAP * torch.tanh(score / CAP)


class _Temp(torch.nn.Module):
    """A score_mod reading a Python float attribute through ``self`` (a runtime scalar slot)."""

    def __init__(self, temp: float):
        super().__init__()
        self.temp = temp
        self.mod = lambda score, b, h, q_idx, kv_idx: score / self.temp

    def forward(self, q, k, v):
        return flex.flex_attention(q, k, v, self.mod)


def test_numbers_a_mod_reads_follow_their_variables():
    """A new value of a number the mod reads is never a stale constant: a runtime slot (an
    attribute 3.0 -> 5.0: an op argument, though Dynamo may guard on a module attribute and
    retrace) and a number generated as code (a global 1.0 -> 0.1: guarded) both give the eager
    result for the new value."""
    global CAP
    q, k, v = (t.detach() for t in _inputs(4))
    m = _Temp(3.0)
    compiled = _compile(m)
    first = compiled(q, k, v)
    m.temp = 5.0
    second = compiled(q, k, v)
    assert torch.allclose(second, m(q, k, v), rtol=0, atol=1e-6) and not torch.allclose(first, second)

    fn = torch.compile(lambda q, k, v: flex.flex_attention(q, k, v, _softcap_global), fullgraph=True)
    try:
        before = fn(q, k, v)
        CAP = 0.1
        after = fn(q, k, v)
        assert torch.allclose(after, flex.flex_attention(q, k, v, _softcap_global), rtol=0, atol=1e-6)
        assert not torch.allclose(before, after)
    finally:
        CAP = 1.0


def test_nested_mask_combinators_and_block_mask_shape_errors():
    """Tensors several closures deep (or_masks(and_masks(...))) are found; a BlockMask whose heads
    fit neither 1 nor the query's is refused before any kernel runs, as in eager."""
    doc = torch.randint(0, 3, (S,), device=DEVICE).sort().values
    same_doc = lambda b, h, qi, ki: doc[qi] == doc[ki]
    mask = flex.or_masks(flex.and_masks(MASKS["causal"], same_doc), lambda b, h, qi, ki: ki < 8)
    bm = flex.create_block_mask(mask, None, None, L, S, device=DEVICE, BLOCK_SIZE=16)
    q, k, v = (t.detach() for t in _inputs(5))
    fn = lambda q, k, v, bm: flex.flex_attention(q, k, v, block_mask=bm)
    assert torch.allclose(_compile(fn)(q, k, v, bm), fn(q, k, v, bm), rtol=0, atol=1e-6)
    heads3 = flex.create_block_mask(MASKS["causal"], None, 3, L, S, device=DEVICE, BLOCK_SIZE=16)
    with pytest.raises(Exception, match="block_mask has batch 1 and heads 3"):
        _compile(fn)(q, k, v, heads3)


USE_BIAS = True
CAPS = (2.0,)


def _flagged(score, b, h, q_idx, kv_idx):
    s = score * (CAPS[0] if USE_BIAS else 0.5)
    return s + math.pi if USE_BIAS else s


def test_bools_tuple_items_and_module_attributes_are_guarded():
    """Numbers the compiled graph cannot take as arguments (a bool, a tuple item, a module
    attribute) are guarded: after a change the compiled call equals eager."""
    global USE_BIAS, CAPS
    q, k, v = (t.detach() for t in _inputs(6))
    fn = lambda q, k, v: flex.flex_attention(q, k, v, _flagged)
    mod_attr = types.ModuleType("attend_test_cfg")
    mod_attr.SCALE = 1.5
    by_module = lambda s, b, h, qi, ki: s * mod_attr.SCALE
    gn = lambda q, k, v: flex.flex_attention(q, k, v, by_module)
    compiled, compiled_g = _compile(fn), torch.compile(gn, fullgraph=True, backend="aot_eager")
    try:
        compiled(q, k, v), compiled_g(q, k, v)
        USE_BIAS, CAPS, mod_attr.SCALE = False, (0.25,), 4.0
        assert torch.allclose(compiled(q, k, v), fn(q, k, v), rtol=0, atol=1e-6)
        assert torch.allclose(compiled_g(q, k, v), gn(q, k, v), rtol=0, atol=1e-6)
    finally:
        USE_BIAS, CAPS = True, (2.0,)


def test_model_layout_output_under_compile():
    """The op's fake output has the real output's layout (the query's): a model's reshape of the
    transposed output compiles and equals eager."""
    q, k, v = (torch.randn(B, n, H, E, device=DEVICE).transpose(1, 2) for n in (L, S, S))
    fn = lambda q, k, v: flex.flex_attention(q, k, v).transpose(1, 2).reshape(B, L, H * E)
    assert torch.allclose(_compile(fn)(q, k, v), fn(q, k, v), rtol=0, atol=1e-6)


def test_pytorch_block_mask_with_unsorted_full_blocks_under_compile():
    """A PyTorch BlockMask may list its full blocks in any order; the compiled path sorts them as
    the eager one does, so the core still bounds the block that reaches past S (S = 80, blocks of
    32: the last full block is ragged, listed first here)."""
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for n in (32, 80, 80))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    bm = TorchBlockMask.from_kv_blocks(torch.zeros(1, 1, 1, **i32), torch.tensor([[[[0, 1, 2]]]], **i32),
                                       torch.full((1, 1, 1), 3, **i32), torch.tensor([[[[2, 0, 1]]]], **i32),
                                       BLOCK_SIZE=32, seq_lengths=(32, 80))
    out = _compile(lambda q, k, v: flex.flex_attention(q, k, v, block_mask=bm))(q, k, v)
    assert_scaled_close(out, *(dense_reference(q, k, v, None, None, dt)[0] for dt in (torch.float64, torch.float32)))


@pytest.mark.parametrize("want_max", [False, True], ids=["no-max-scores", "max-scores"])
def test_compiled_calls_compute_max_scores_only_where_read(want_max, monkeypatch):
    """The compiled op knows whether the caller reads max_scores (``ops.flex.spec``'s want_max): the
    fused core stores no row max where it does not (and the Gluon forwards, which keep none, may
    serve the call), and one where it does, which matches the definition. Output and gradients
    against float64 either way."""
    from attend.kernels import launch

    asked, real = [], launch.flex_forward
    monkeypatch.setattr(launch, "flex_forward", lambda *a, **kw: asked.append(kw["want_max"]) or real(*a, **kw))
    q, k, v = _inputs(7)
    bm = flex.create_block_mask(MASKS["causal"], None, None, L, S, device=DEVICE)
    aux = flex.AuxRequest(max_scores=True) if want_max else None

    def fn(q, k, v):
        res = flex.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 0.5, block_mask=bm, return_aux=aux)
        return res if aux is None else (res[0], res[1].max_scores)

    res = _compile(fn)(q, k, v)
    out = res[0] if want_max else res
    assert asked == [want_max], asked
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    refs = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, _, mx = dense_reference(*ls, lambda s, b, h, qi, ki: s * 0.5, MASKS["causal"], dt)
        refs[dt] = (o, mx, torch.autograd.grad((o * g.to(dt)).sum(), ls))
    assert_scaled_close(out, refs[torch.float64][0], refs[torch.float32][0], what="out")
    if want_max:
        assert_scaled_close(res[1], refs[torch.float64][1], refs[torch.float32][1], what="max_scores")
    for name, a, r, s_ in zip("qkv", grads, refs[torch.float64][2], refs[torch.float32][2]):
        assert_scaled_close(a, r, s_, k=6.0, what=f"d{name}")


def _route(fn, *args) -> dict:
    """The dispatch counters one forward + backward of ``fn`` moved, with its output and gradients."""
    before = dict(dispatch.PATHS)
    out = fn(*args)
    grads = torch.autograd.grad(out.sum(), args)
    return {p: n - before[p] for p, n in dispatch.PATHS.items() if n != before[p]}, out, grads


@pytest.mark.parametrize("case", ["causal", "window-slot", "softcap-causal", "changed-in-place", "from-kv-blocks",
                                  "key-batch-1"])
def test_compiled_band_masks_take_the_eager_route(case):
    """A BlockMask that create_block_mask built from a band mask_mod takes the eager call's band
    route under torch.compile as well (``ops.flex._band_of``): the op sees the lists, and knows them
    by ``block_mask.built_lists``. The same dispatch counters as the eager call, forward and
    backward, the band's among them; lists changed in place since, or rebuilt by from_kv_blocks,
    walk the lists in both. Outputs and gradients equal eager's and the float64 definition."""
    q, k, v = _inputs(11)
    if case == "key-batch-1":  # one key batch broadcast over the queries' two: no band route (the lists)
        k, v = (t.detach()[:1].requires_grad_() for t in (k, v))
    width = types.SimpleNamespace(value=20)  # a closure object's attribute: a runtime number slot of the op

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= width.value)

    mask = window if case == "window-slot" else MASKS["causal"]
    score = (lambda s, b, h, qi, ki: 4.0 * torch.tanh(s / 4.0)) if case == "softcap-causal" else None
    bm = flex.create_block_mask(mask, None, None, L, S, device=DEVICE, BLOCK_SIZE=16)
    if case == "changed-in-place":
        bm.kv_num_blocks.add_(0)  # a write, though not a new value: the record no longer holds
    elif case == "from-kv-blocks":
        bm = flex.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                           bm.full_kv_indices, BLOCK_SIZE=16, mask_mod=mask, seq_lengths=(L, S))

    def fn(q, k, v):
        return flex.flex_attention(q, k, v, score_mod=score, block_mask=bm)

    eager_paths, ref, ref_grads = _route(fn, q, k, v)
    compiled = _compile(fn)
    paths, out, grads = _route(compiled, q, k, v)
    assert paths == eager_paths, (paths, eager_paths)
    band = case not in ("changed-in-place", "from-kv-blocks", "key-batch-1")
    assert any(p.startswith("band") for p in paths) == band, paths
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    refs = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = dense_reference(*ls, score, mask, dt)[0]
        refs[dt] = (o, torch.autograd.grad(o.sum(), ls))
    assert_scaled_close(out, refs[torch.float64][0], refs[torch.float32][0], what="out")
    for name, a, r, s_ in zip("qkv", grads, refs[torch.float64][1], refs[torch.float32][1]):
        assert_scaled_close(a, r, s_, k=6.0, what=f"d{name}")
    if case == "window-slot":
        # a new width, the BlockMask not rebuilt: its lists are no longer the mask's, so both calls walk them
        width.value = 5
        eager_paths, ref, _ = _route(fn, q, k, v)
        paths, out, _ = _route(compiled, q, k, v)
        assert paths == eager_paths and not any(p.startswith("band") for p in paths), (paths, eager_paths)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        # rebuilt for the new width: the band again, which follows the op's slot
        bm = flex.create_block_mask(mask, None, None, L, S, device=DEVICE, BLOCK_SIZE=16)
        paths, out, _ = _route(compiled, q, k, v)
        assert any(p.startswith("band") for p in paths), paths
        assert_scaled_close(out, *(dense_reference(q, k, v, None, mask, dt)[0] for dt in (torch.float64, torch.float32)))


_WIDTH = types.SimpleNamespace(value=20)  # a window a module-level mask_mod reads: a guarded number


def _window_mod(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= _WIDTH.value)


_DOC = types.SimpleNamespace(ids=(torch.arange(S) // 20).to(DEVICE))  # document ids a mask_mod reads


def _document_mod(b, h, q_idx, kv_idx):
    return _DOC.ids[q_idx] == _DOC.ids[kv_idx]


_PREFIX_LM = flex.or_masks(MASKS["causal"], lambda b, h, q_idx, kv_idx: kv_idx < 10)
_GRAPH_MASKS = {"causal": MASKS["causal"], "window": _window_mod, "document": _document_mod, "prefix-lm": _PREFIX_LM}


@pytest.mark.parametrize("case", ["causal", "window", "document", "prefix-lm", "made-inside"])
def test_create_block_mask_inside_a_compiled_function(case):
    """create_block_mask inside torch.compile builds the BlockMask in the graph, fullgraph: a band
    mask_mod (causal, a window whose width a variable holds) by arithmetic, taking the eager call's
    band route, a new width tracing again; any other mask (a document mask over a tensor, prefix-LM
    through or_masks) through the block-status op, new document ids reusing the graph. A mod made
    inside the compiled function over a variable runs create_block_mask outside the graph (the same
    lists and route), which fullgraph=True refuses with a reason that says what to do. The lists
    equal the eager call's, the output and gradients eager's and the float64 definition."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v = (t.detach() for t in _inputs(12))
    in_graph = case != "made-inside" and GRAPH_MADE_MODS  # (before torch 2.13 every case runs outside)
    inside = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= 9)  # the made-inside mask

    def fn(q, k, v):
        if case == "made-inside":
            width = 9

            def mask(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx <= width)
        else:
            mask = _GRAPH_MASKS[case]
        bm = flex.create_block_mask(mask, None, None, L, S, device=DEVICE, BLOCK_SIZE=16)
        return flex.flex_attention(q, k, v, block_mask=bm), [getattr(bm, a) for a in flex.BlockMask._TENSOR_ATTRS]

    def route(f):
        before = dict(dispatch.PATHS)
        (out, lists) = f(*leaves)
        grads = torch.autograd.grad(out.sum(), leaves)
        return {p: n - before[p] for p, n in dispatch.PATHS.items() if n != before[p]}, out, lists, grads

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter) if in_graph else None
    steps = {"window": [(20, None), (5, None)], "document": [(20, None), (20, 7)]}.get(case, [(20, None)])
    ids = _DOC.ids.clone()
    for width, doc_len in steps:
        _WIDTH.value = width
        if doc_len is not None:  # new ids, the same tensor: the graph reads them
            _DOC.ids.copy_(torch.arange(S, device=DEVICE) // doc_len)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        eager_paths, ref, ref_lists, ref_grads = route(fn)
        if not in_graph:
            with pytest.raises(Exception, match=r"(?s)create_block_mask.*before the compiled function"):
                _compile(fn)(*leaves)
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend="aot_eager")
        paths, out, lists, grads = route(compiled)
        assert paths == eager_paths, (paths, eager_paths)
        assert any(p.startswith("band") for p in paths) == (case in ("causal", "window", "made-inside")), paths
        for a, r in zip(lists, ref_lists):
            assert (a is None and r is None) or torch.equal(a, r)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
        refs = {}
        for dt in (torch.float64, torch.float32):
            ls = [t.detach().to(dt).requires_grad_() for t in leaves]
            o = dense_reference(*ls, None, _GRAPH_MASKS.get(case, inside), dt)[0]
            refs[dt] = (o, torch.autograd.grad(o.sum(), ls))
        assert_scaled_close(out, refs[torch.float64][0], refs[torch.float32][0], what=f"{case} out")
        for name, a, r, s_ in zip("qkv", grads, refs[torch.float64][1], refs[torch.float32][1]):
            assert_scaled_close(a, r, s_, k=6.0, what=f"{case} d{name}")
    if in_graph:  # a new width traces again; new document ids do not
        assert counter.frame_count == (2 if case == "window" else 1), counter.frame_count
    _WIDTH.value = 20
    _DOC.ids.copy_(ids)


_SCALE_W = 20  # a module global a BoundMod's body reads: guarded


def _global_width_mask(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= _SCALE_W)


_KEYED = {(0, 1): (torch.arange(S) // 8).to(DEVICE)}  # a tensor behind a tuple key: no path reaches it


def _keyed_mask(b, h, q_idx, kv_idx):
    return _KEYED[(0, 1)][q_idx] == _KEYED[(0, 1)][kv_idx]


@pytest.mark.skipif(not GRAPH_MADE_MODS, reason="create_block_mask runs in the graph from torch 2.13")
@pytest.mark.parametrize("case", ["mask-mod-reassigned", "global-number", "symbolic-lengths", "no-path"])
def test_graph_block_masks_stay_exact(case):
    """A BlockMask built in the graph keeps the eager call's route and result: its mask_mod
    reassigned after create_block_mask walks the lists (they are no longer the mask's); a number a
    BoundMod's body reads from a global is guarded (a new value traces again); symbolic lengths
    (dynamic=True, a growing L = S) reach the block-status op as arguments; a mask_mod whose tensor
    no path reaches runs create_block_mask outside the graph instead of failing (the same lists)."""
    global _SCALE_W
    from torch._dynamo.testing import CompileCounterWithBackend

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def fn(q, k, v):
        Lq, Sk = q.shape[-2], k.shape[-2]
        if case == "mask-mod-reassigned":
            bm = flex.create_block_mask(causal, None, None, Lq, Sk, device=DEVICE, BLOCK_SIZE=16)
            bm.mask_mod = MASKS["window"]  # a symmetric window: these lists are not its blocks
        elif case == "global-number":
            bm = flex.create_block_mask(flex.BoundMod(_global_width_mask), None, None, Lq, Sk, device=DEVICE,
                                        BLOCK_SIZE=16)
        elif case == "no-path":  # (flex_attention itself refuses such a mod under compile: FlexTraceError)
            bm = flex.create_block_mask(_keyed_mask, None, None, Lq, Sk, device=DEVICE, BLOCK_SIZE=16)
            return torch.cat([t.flatten() for t in bm.as_tuple()[2:] if isinstance(t, torch.Tensor)]).float()
        else:
            bm = flex.create_block_mask(causal, None, None, Lq, Sk, device=DEVICE, BLOCK_SIZE=16)
        return flex.flex_attention(q, k, v, block_mask=bm)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=case != "no-path", dynamic=case == "symbolic-lengths")
    rounds = {"global-number": [(S, 20), (S, 3)], "symbolic-lengths": [(32, 20), (48, 20), (64, 20)]}.get(
        case, [(S, 20)])
    for n, width in rounds:
        _SCALE_W = width
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 2, n, E, generator=g).to(DEVICE) for _ in range(3))
        before = dict(dispatch.PATHS)
        out = compiled(q, k, v)
        paths = {p: c - before[p] for p, c in dispatch.PATHS.items() if c != before[p]}
        before = dict(dispatch.PATHS)
        ref = fn(q, k, v)
        eager_paths = {p: c - before[p] for p, c in dispatch.PATHS.items() if c != before[p]}
        assert paths == eager_paths, (paths, eager_paths)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    if case == "global-number":
        assert counter.frame_count == 2, counter.frame_count
    _SCALE_W = 20

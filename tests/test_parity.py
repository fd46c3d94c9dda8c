"""Parity with PyTorch: what ``torch.nn.functional.scaled_dot_product_attention`` accepts, attend
accepts with the same result; what it refuses, attend refuses with its own message.

Hypothesis draws calls over ranks 2-4, broadcast batch and head dims, grouped heads (key and
value head counts may differ), bool / float masks, attend's and PyTorch's causal biases, scale as
a number or a 0-d tensor, dropout 0 or 1, and empty or zero-size dims. Each valid call must run
in PyTorch as given (its default path), and attend's output and gradients must match PyTorch's
MATH backend in float64 (``conftest.torch_sdpa``), never attend's own code. Each invalid call
must be refused by both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import bias as torch_bias

import attend
from attend import SDPBackend as B
from attend.bias import causal_lower_right, causal_upper_left
from conftest import assert_scaled_close, torch_sdpa

F = torch.nn.functional
ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class Call:
    """One SDPA call: tensors and keyword arguments, as a user would pass them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kw: dict = field(default_factory=dict)

    def torch_kw(self) -> dict:
        """The same arguments for PyTorch: an attend CausalBias becomes PyTorch's own (attend's
        would route the call back into attend through its ``__torch_function__``)."""
        m = self.kw.get("attn_mask")
        if isinstance(m, attend.bias.CausalBias):
            make = torch_bias.causal_upper_left if m.variant == 1 else torch_bias.causal_lower_right
            return dict(self.kw, attn_mask=make(m.seq_len_q, m.seq_len_kv))
        return self.kw

    def __repr__(self) -> str:
        kw = {n: (f"{str(v.dtype)[6:]}{tuple(v.shape)}" if isinstance(v, torch.Tensor) and v.dim() else v)
              for n, v in self.kw.items()}
        return f"Call(q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, v={tuple(self.v.shape)}, {kw})"


def _squeeze_dims(draw, shape: list[int], keep_heads: bool) -> tuple[int, ...]:
    """Broadcast forms of a full (..., H, seq, dim) shape: batch dims set to 1, leading dims
    dropped (never the heads dim when ``keep_heads``)."""
    batch = len(shape) - 2
    out = [1 if i < batch and not (keep_heads and i == batch - 1) and draw(st.booleans()) else n
           for i, n in enumerate(shape)]
    lowest = batch if not keep_heads else batch - 1
    drop = draw(st.integers(0, lowest)) if draw(st.integers(0, 3)) == 0 else 0
    return tuple(out[drop:])


@st.composite
def valid_calls(draw, dtype=torch.float64, small=False):
    rank = draw(st.sampled_from([2, 3, 4, 4]))
    gqa = rank >= 3 and draw(st.booleans())
    n = 2 if small else 4
    L, S = draw(st.integers(0, n + 2)), draw(st.integers(0, n + 2))
    E = draw(st.sampled_from([0, 1, 3, 4] if not small else [4, 8]))
    Ev = E if draw(st.booleans()) or small else draw(st.integers(0, 5))
    zero_batch = not small and draw(st.integers(0, 9)) == 0
    batch = [0 if zero_batch else draw(st.integers(1, 2))] if rank == 4 else []
    if gqa:
        hk, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        hq = hk * group
        hv = draw(st.sampled_from([d for d in range(1, hq + 1) if hq % d == 0]))
        heads = ([hq], [hk], [hv])
    elif rank >= 3:
        h = draw(st.integers(1, 3)) if small or draw(st.integers(0, 9)) else 0
        heads = ([h], [h], [h])
    else:
        heads = ([], [], [])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shapes = []
    for i, (h, tail) in enumerate(zip(heads, ([L, E], [S, E], [S, Ev]))):
        full = batch + h + tail
        shapes.append(_squeeze_dims(draw, full, keep_heads=gqa) if rank >= 3 else tuple(full))
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes)
    kw = {}
    if gqa or draw(st.booleans()):
        kw["enable_gqa"] = gqa
    kind = draw(st.sampled_from(["none", "causal", "bool", "float", "upper_left", "lower_right",
                                 "torch_upper_left", "torch_lower_right"]))
    if kind == "causal":
        kw["is_causal"] = True
    elif kind in ("bool", "float"):
        kb = list(k.shape[:-2])
        if gqa:
            kb[-1] = q.shape[-3]
        scores = tuple(torch.broadcast_shapes(q.shape[:-2], tuple(kb))) + (L, S)
        mrank = draw(st.integers(2, len(scores)))
        mshape = [1 if i < mrank - 2 and draw(st.booleans()) else d for i, d in enumerate(scores[-mrank:])]
        if kind == "bool":
            mask = torch.rand(mshape, generator=gen) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
        else:
            mask = torch.randn(mshape, generator=gen, dtype=torch.float64)
            mask = mask.masked_fill(torch.rand(mshape, generator=gen) < 0.3, float("-inf"))
            mask = mask.to(draw(st.sampled_from([dtype, torch.float32])))  # PyTorch takes float32 for any query
        kw["attn_mask"] = mask
    elif kind != "none":
        variant = kind.removeprefix("torch_")
        make = ({"upper_left": torch_bias.causal_upper_left, "lower_right": torch_bias.causal_lower_right}
                if kind.startswith("torch") else {"upper_left": causal_upper_left, "lower_right": causal_lower_right})
        kw["attn_mask"] = make[variant](L, S)
    scale = draw(st.sampled_from(["none", "float", "negative", "int", "tensor", "int_tensor"]))
    if scale != "none":
        kw["scale"] = {"float": 0.37, "negative": -0.6, "int": 2, "tensor": torch.tensor(0.45, dtype=torch.float64),
                       "int_tensor": torch.tensor(1)}[scale]
    if not small:
        dropout = draw(st.sampled_from([None, 0.0, 1.0, 1, "tensor"]))
        if dropout is not None:
            kw["dropout_p"] = torch.tensor(1.0) if dropout == "tensor" else dropout
    return Call(q, k, v, kw)


def _leaves(call: Call, dtype=None) -> tuple[Call, list[torch.Tensor]]:
    """A copy of ``call`` whose tensors (and float mask) are fresh leaves that require grad."""
    leaf = lambda t: t.detach().to(dtype or t.dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(call.q), leaf(call.k), leaf(call.v)
    kw = dict(call.kw)
    m = kw.get("attn_mask")
    grads = [q, k, v]
    if isinstance(m, torch.Tensor) and not isinstance(m, torch_bias.CausalBias) and m.is_floating_point():
        kw["attn_mask"] = leaf(m)
        grads.append(kw["attn_mask"])
    return Call(q, k, v, kw), grads


# attend holds PyTorch 2.13's rules (the seed's); an older PyTorch sizes some empty calls otherwise.
OLD_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


def _oracle(call: Call) -> torch.Tensor:
    """PyTorch's MATH on the CPU, whatever the call's device: on CUDA, PyTorch sizes some zero-size
    broadcasts differently (a query batch of 1 against a key batch of 3), and the CPU is the
    definition this suite holds attend to."""
    tk = call.torch_kw()
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t
    tk = {n: cpu(t) for n, t in tk.items() if n != "dropout_p"} | {"dropout_p": float(tk.get("dropout_p", 0.0))}
    return torch_sdpa(cpu(call.q), cpu(call.k), cpu(call.v), **tk).to(call.q.device)


def attend_sdpa(q, k, v, **kw):
    return attend.scaled_dot_product_attention(q, k, v, **kw)


def assert_parity(call: Call, sdpa=attend_sdpa, grads: bool = True) -> None:
    """PyTorch takes ``call`` as given; ``sdpa`` returns the shape and dtype of PyTorch's MATH
    backend, and its output and gradients match that backend in float64 (up to rounding for
    float64 inputs, within a multiple of the same-precision oracle's error otherwise). Shapes
    come from MATH, PyTorch's definition: its CPU default path sizes some zero-size broadcasts
    from the query alone (a batch of 1 against a key batch of 0 gives 1, MATH gives 0)."""
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t
    # accepted as given, on the CPU (PyTorch's CUDA cuDNN path refuses dropout_p=1 with an internal error)
    F.scaled_dot_product_attention(cpu(call.q), cpu(call.k), cpu(call.v),
                                   **{n: cpu(t) for n, t in call.torch_kw().items()})
    mine, inputs = _leaves(call)
    out = sdpa(mine.q, mine.k, mine.v, **mine.kw)
    ref_call, ref_inputs = _leaves(call, torch.float64)
    ref = _oracle(ref_call)
    if out.shape != ref.shape and OLD_TORCH:
        # PyTorch before 2.13 sizes some empty calls otherwise (a query batch of 1 against an empty
        # key batch gives 0 rows there, 1 in 2.13): attend follows 2.13, and either way the call
        # has no keys to read, so both results are zeros.
        assert ref.numel() == 0 or not ref.any(), f"PyTorch {torch.__version__} gave nonzeros: {ref}"
        assert not out.any() and out.dtype == call.q.dtype, f"{tuple(out.shape)} {out.dtype}"
        return
    assert out.shape == ref.shape and out.dtype == call.q.dtype, f"{tuple(out.shape)} {out.dtype}"
    g = torch.randn(out.shape, dtype=torch.float64)
    if call.q.dtype == torch.float64:
        tol = 1e-9 * max(1.0, ref.abs().max().item()) if ref.numel() else 0.0
        assert out.numel() == 0 or (out - ref).abs().max().item() <= tol, f"output differs from PyTorch by " \
            f"{(out - ref).abs().max().item():.3e}"
        if grads and out.numel():
            got = torch.autograd.grad(out, inputs, g, allow_unused=True)
            want = torch.autograd.grad(ref, ref_inputs, g, allow_unused=True)
            for name, a, b, x in zip(("query", "key", "value", "attn_mask"), got, want, inputs):
                a = torch.zeros_like(x) if a is None else a
                b = torch.zeros_like(x, dtype=torch.float64) if b is None else b
                if a.numel():
                    err = (a - b).abs().max().item()
                    rel = 1e-8 if x.dtype == torch.float64 else 4 * torch.finfo(x.dtype).eps  # a float32 mask's
                    assert err <= rel * max(1.0, b.abs().max().item()), f"d{name} differs by {err:.3e}"
    else:
        same = _oracle(call)
        assert_scaled_close(out, ref, same, k=8.0)


@settings(max_examples=250, deadline=None)
@given(call=valid_calls())
def test_valid_float64_calls_match_pytorch(call):
    assert_parity(call)


@settings(max_examples=12, deadline=None)
@given(call=valid_calls(dtype=torch.float32, small=True), backend=st.sampled_from([B.FLASH_ATTENTION,
                                                                                 B.EFFICIENT_ATTENTION]))
def test_valid_float32_calls_match_pytorch_on_fused_backends(call, backend):
    """fp32: the CPU suite's Triton core under the interpreter (EFFICIENT; FLASH there takes fp16
    and bf16 only, so FLASH calls move on down the order) within 8x PyTorch's own fp32 error."""
    with attend.sdpa_kernel([backend, B.EFFICIENT_ATTENTION, B.MATH], set_priority=True):
        assert_parity(call, grads=False)


@settings(max_examples=60, deadline=None)
@given(call=valid_calls(), backend=st.sampled_from([B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION]))
def test_every_backend_that_takes_a_call_matches_pytorch(call, backend):
    """Each backend first in the order; one that cannot take the call says why and the next runs."""
    with attend.sdpa_kernel([backend, B.MATH], set_priority=True):
        d = attend.explain(call.q, call.k, call.v, **call.kw)
        assert d.backend is backend or d.reasons[backend], str(d)
        assert_parity(call)


# ---- refusals: (what is wrong, how to make a valid call invalid, the argument the message names)

def _set(**kw):
    return lambda c: Call(c.q, c.k, c.v, dict(c.kw, **kw))


def _tensors(q=None, k=None, v=None):
    return lambda c: Call(c.q if q is None else q(c.q), c.k if k is None else k(c.k), c.v if v is None else v(c.v),
                          c.kw)


BREAKS = {
    "is_causal_str": (_set(is_causal="False"), "is_causal"),
    "is_causal_int": (_set(is_causal=1), "is_causal"),
    "is_causal_none": (_set(is_causal=None), "is_causal"),
    "enable_gqa_int": (_set(enable_gqa=1), "enable_gqa"),
    "enable_gqa_str": (_set(enable_gqa="True"), "enable_gqa"),
    "dropout_above_1": (_set(dropout_p=1.5), "dropout_p"),
    "dropout_negative": (_set(dropout_p=-0.1), "dropout_p"),
    "dropout_none": (_set(dropout_p=None), "dropout_p"),
    "scale_str": (_set(scale="0.5"), "scale"),
    "scale_1d_tensor": (_set(scale=torch.tensor([0.5])), "scale"),
    "scale_complex": (_set(scale=0.5j), "scale"),
    "query_1d": (_tensors(q=lambda t: t.reshape(-1)[:1]), "query"),
    "key_0d": (_tensors(k=lambda t: t.reshape(-1)[0]), "key"),
    "value_int": (_tensors(v=lambda t: t.to(torch.int32)), "value"),
    "dtype_mismatch": (_tensors(k=lambda t: t.float()), "dtype"),
    "head_dim_mismatch": (_tensors(k=lambda t: torch.cat([t, t[..., :1]], -1)), "head dim"),
    "heads_without_gqa": (_tensors(k=lambda t: torch.cat([t, t[..., :1, :, :]], -3),
                                   v=lambda t: torch.cat([t, t[..., :1, :, :]], -3)), "heads"),
    "gqa_heads_not_dividing": (lambda c: _set(enable_gqa=True)(_tensors(k=lambda t: torch.cat([t, t[..., :1, :, :]], -3),
                                                                        v=lambda t: torch.cat([t, t[..., :1, :, :]], -3))(c)),
                               "heads"),
    "batch_mismatch": (_tensors(k=lambda t: torch.cat([t, t[:1]]), v=lambda t: torch.cat([t, t[:1]])), "batch dims"),
    "mask_int": (lambda c: _set(attn_mask=torch.ones(c.q.shape[-2], c.k.shape[-2], dtype=torch.int64))(c), "attn_mask"),
    "mask_float16": (lambda c: _set(attn_mask=torch.zeros(c.q.shape[-2], c.k.shape[-2], dtype=torch.float16))(c),
                     "attn_mask"),
    "mask_1d": (lambda c: _set(attn_mask=torch.ones(c.k.shape[-2], dtype=torch.bool))(c), "attn_mask"),
    "mask_wrong_length": (lambda c: _set(attn_mask=torch.ones(c.q.shape[-2], c.k.shape[-2] + 1, dtype=torch.bool))(c),
                          "attn_mask"),
    "mask_grows_scores": (lambda c: _set(attn_mask=torch.ones(5, *c.q.shape[:-1], c.k.shape[-2], dtype=torch.bool))(c),
                          "attn_mask"),
    "mask_list": (lambda c: _set(attn_mask=[[True]])(c), "attn_mask"),
    # not square: PyTorch runs a square bias as is_causal=True without reading its size
    "causal_bias_wrong_size": (lambda c: _set(attn_mask=torch_bias.causal_lower_right(
        c.q.shape[-2] + c.k.shape[-2] + 1, c.k.shape[-2]))(c), "CausalBias"),
    "causal_bias_and_is_causal": (lambda c: _set(attn_mask=torch_bias.causal_lower_right(c.q.shape[-2], c.k.shape[-2]),
                                                 is_causal=True)(c), "is_causal"),
}


@st.composite
def plain_calls(draw):
    """Valid rank-4 float64 calls without broadcasting (batch and heads > 1, so that one more
    key batch or head does not broadcast), for the refusal cases to break."""
    Bn, H, L, S, E = (draw(st.integers(2 if i < 2 else 1, 3)) for i in range(5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(Bn, H, n, E, generator=gen, dtype=torch.float64) for n in (L, S, S))
    return Call(q, k, v, {})


@settings(max_examples=80, deadline=None)
@given(call=plain_calls(), broken=st.sampled_from(sorted(BREAKS)))
def test_invalid_calls_are_refused_by_both(call, broken):
    make, names = BREAKS[broken]
    bad = make(call)
    with pytest.raises(Exception):
        F.scaled_dot_product_attention(bad.q, bad.k, bad.v, **bad.torch_kw())
    with pytest.raises((TypeError, ValueError)) as info:
        attend.scaled_dot_product_attention(bad.q, bad.k, bad.v, **bad.kw)
    assert names in str(info.value), f"{broken}: {info.value}"
    with pytest.raises(type(info.value)):
        attend.explain(bad.q, bad.k, bad.v, **bad.kw)


@pytest.mark.parametrize("case", ["mask_and_is_causal", "key_value_lengths_differ"])
def test_refused_like_pytorchs_math_where_its_cpu_default_does_not_check(case):
    """Two calls PyTorch's MATH backend (and its documentation) refuses but its CPU default path
    runs anyway (ignoring the mask, or reading past the value's keys; from PyTorch 2.14 the default
    path refuses the first too): attend refuses both."""
    q, k = torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    if case == "mask_and_is_causal":
        args, kw, match = (q, k, k), dict(attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True), "is_causal"
    else:
        args, kw, match = (q, k, torch.randn(1, 2, 6, 8, dtype=torch.float64)), {}, "positions"
    if case != "mask_and_is_causal" or torch.__version__ < (2, 14):
        F.scaled_dot_product_attention(*args, **kw)  # PyTorch's default path runs it
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(*args, **kw)
    with pytest.raises(ValueError, match=match):
        attend.scaled_dot_product_attention(*args, **kw)


# ---- the listed cases, by name


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


LISTED = {
    "2d": Call(_r(5, 8), _r(6, 8), _r(6, 8)),
    "2d_with_bool_mask": Call(_r(5, 8), _r(6, 8), _r(6, 8), dict(attn_mask=torch.rand(5, 6) > 0.3)),
    "rank4_query_rank3_key_value": Call(_r(2, 3, 5, 8), _r(3, 6, 8), _r(3, 6, 8)),
    "scale_0d_tensor": Call(_r(2, 3, 5, 8), _r(2, 3, 6, 8), _r(2, 3, 6, 8), dict(scale=torch.tensor(0.5))),
    "dropout_1": Call(_r(2, 3, 5, 8), _r(2, 3, 6, 8), _r(2, 3, 6, 8), dict(dropout_p=1.0)),
    "gqa_key_value_heads_differ": Call(_r(2, 4, 5, 8), _r(2, 2, 6, 8), _r(2, 1, 6, 8), dict(enable_gqa=True)),
    "torch_causal_lower_right": Call(_r(1, 2, 256, 8), _r(1, 2, 512, 8), _r(1, 2, 512, 8),
                                     dict(attn_mask=torch_bias.causal_lower_right(256, 512))),
    "head_dim_0": Call(_r(2, 3, 5, 0), _r(2, 3, 6, 0), _r(2, 3, 6, 0)),
    "head_dim_0_value_dim_4": Call(_r(2, 3, 5, 0), _r(2, 3, 6, 0), _r(2, 3, 6, 4), dict(is_causal=True)),
}


@pytest.mark.parametrize("name", list(LISTED))
def test_listed_calls_match_pytorch(name):
    assert_parity(LISTED[name])


@pytest.mark.parametrize("backend", [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION], ids=lambda b: b.name)
@pytest.mark.parametrize("heads", [(4, 2, 2), (6, 3, 3), (4, 2, 1)], ids=lambda h: "q{}_k{}_v{}".format(*h))
def test_grouped_heads_match_pytorch(heads, backend):
    """Grouped heads on each backend (key and value head counts that differ go to MATH, as
    explain says): query head h reads key head h // (Hq // Hk), never h % Hk."""
    hq, hk, hv = heads
    call = Call(_r(2, hq, 5, 8), _r(2, hk, 7, 8), _r(2, hv, 7, 8), dict(enable_gqa=True, is_causal=True))
    with attend.sdpa_kernel([backend, B.MATH], set_priority=True):
        assert_parity(call)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the same listed calls on CUDA tensors, in bf16")
@pytest.mark.parametrize("name", list(LISTED))
def test_listed_calls_match_pytorch_on_the_gpu(name):
    c = LISTED[name]
    kw = {n: (v.cuda() if isinstance(v, torch.Tensor) and not isinstance(v, torch_bias.CausalBias) else v)
          for n, v in c.kw.items()}
    assert_parity(Call(*(t.cuda().bfloat16() for t in (c.q, c.k, c.v)), kw), grads=False)


def test_dropout_1_is_zeros_and_explain_says_why_fused_backends_skip_it():
    q = _r(1, 2, 4, 8)
    out = attend.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    d = attend.explain(q, q, q, dropout_p=1.0)
    assert d.backend is B.MATH
    assert any("dropout_p=1.0" in r for r in d.reasons[B.FLASH_ATTENTION]), str(d)


def test_empty_calls_give_pytorchs_zeros_and_explain_says_so():
    """No query rows, or an empty value: zeros shaped from the query (PyTorch's rule, also where
    key / value broadcast a batch of 1 to 3), with zero gradients; explain says no backend runs."""
    q, k = _r(1, 2, 4, 8).requires_grad_(), _r(3, 2, 0, 8).requires_grad_()
    out = attend.scaled_dot_product_attention(q, k, k)
    assert out.shape == (1, 2, 4, 8)  # PyTorch 2.13's CPU rule (its CUDA path and PyTorch before 2.13 give 3)
    assert OLD_TORCH or F.scaled_dot_product_attention(q.cpu(), k.cpu(), k.cpu()).shape == out.shape
    assert torch.equal(out, torch.zeros_like(out))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq, torch.zeros_like(q))
    assert "the result is zeros of shape (1, 2, 4, 8)" in str(attend.explain(q, k, k))


def test_pytorchs_math_gives_zero_rows_that_see_no_key():
    """The basis of the oracle's explicit zeroing: PyTorch's MATH already returns 0 (and 0
    gradients) for a row that sees no key, as attend promises."""
    q = _r(1, 1, 3, 4).requires_grad_()
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, _r(1, 1, 2, 4), _r(1, 1, 2, 4), attn_mask=mask)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(out[0, 0, 1], torch.zeros(4)) and torch.equal(dq[0, 0, 1], torch.zeros(4))


# ---- the parity check itself can fail: known mistakes, made through the public API, are caught


def _gqa_by_repeat(q, k, v, **kw):
    """Grouped heads expanded with ``repeat`` (query head h reads key head h % Hk) instead of
    ``repeat_interleave`` (h // G): the mistake a MATH path can make."""
    if kw.get("enable_gqa"):
        k = k.repeat(*([1] * (k.dim() - 3)), q.shape[-3] // k.shape[-3], 1, 1)
        v = v.repeat(*([1] * (v.dim() - 3)), q.shape[-3] // v.shape[-3], 1, 1)
    return attend.scaled_dot_product_attention(q, k, v, **kw)


def _flipped_causal(q, k, v, **kw):
    """is_causal run bottom-right aligned, and a bottom-right bias top-left: a flipped alignment."""
    L, S = q.shape[-2], k.shape[-2]
    m = kw.get("attn_mask")
    if kw.pop("is_causal", False):
        kw["attn_mask"] = causal_lower_right(L, S)
    elif isinstance(m, (attend.bias.CausalBias, torch_bias.CausalBias)) and int(m.variant) == 2:
        kw["attn_mask"] = causal_upper_left(L, S)
    return attend.scaled_dot_product_attention(q, k, v, **kw)


MISTAKES = {
    "gqa_by_repeat": (_gqa_by_repeat, Call(_r(1, 4, 6, 8), _r(1, 2, 7, 8), _r(1, 2, 7, 8), dict(enable_gqa=True))),
    "flipped_is_causal": (_flipped_causal, Call(_r(1, 2, 5, 8), _r(1, 2, 9, 8), _r(1, 2, 9, 8), dict(is_causal=True))),
    "flipped_lower_right": (_flipped_causal, Call(_r(1, 2, 9, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8),
                                                  dict(attn_mask=causal_lower_right(9, 5)))),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_parity_check_catches_known_mistakes(name):
    sdpa, call = MISTAKES[name]
    assert_parity(call)  # attend itself passes
    with pytest.raises(AssertionError, match="differs"):
        assert_parity(call, sdpa=sdpa)


def test_large_values_stay_finite():
    """Scores far apart (scale * q.k ~ 1e3) must not overflow the softmax: same as PyTorch."""
    q = _r(1, 1, 4, 8) * 30
    assert_parity(Call(q, q, q, dict(scale=math.sqrt(8.0))))

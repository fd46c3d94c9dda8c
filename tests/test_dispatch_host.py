"""What a call costs the host beyond the kernel, and must not change: the dispatcher's decision
cache (``attend._dispatch.choose``) answers what ``decide`` answers for every call, its key changes
with everything a backend's check reads, it stays bounded, and it is not used where the choice must
be made afresh (user checks, torch.compile, errors, explain); a prepared call skips validation only
where validation would pass and give the same call; PyTorch's SDPA runs with exactly one of its
backends enabled, as under ``torch.nn.attention.sdpa_kernel``, and its flags come back."""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch

import attend
from attend import SDPBackend as B
from attend import _dispatch, _registry
from attend._params import prepare
from attend.backends import _kernels
from attend.bias import causal_lower_right, causal_upper_left
from conftest import growing_layouts
from conftest import rand as _rand


def rand(*shape, **kw):
    # Dispatch tests run on CPU tensors everywhere (also in the GPU run of the suite).
    return _rand(*shape, device="cpu", **kw)


@pytest.fixture(autouse=True)
def _empty_cache(use_kernel):
    use_kernel("blocked")  # fp32 CPU calls go to FLASH's blocked kernel unless a case turns the interpreter on
    _dispatch._decisions.clear()
    _dispatch._prepared.clear()
    yield
    _dispatch._decisions.clear()
    _dispatch._prepared.clear()


def params(q, k=None, v=None, mask=None, dropout=0.0, causal=False, gqa=False):
    k = q if k is None else k
    return prepare(q, k, k if v is None else v, mask, dropout, causal, None, gqa).params


@contextlib.contextmanager
def deterministic(warn_only=False):
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


@contextlib.contextmanager
def torch_sdp_flag(name):
    enabled = getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
    getattr(torch.backends.cuda, f"enable_{name}_sdp")(not enabled)
    try:
        yield
    finally:
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)


def interpreter(on):
    return mock.patch.object(_kernels, "interpreter_on", lambda: on)


class _RefusingKernel:
    """A flash kernel that refuses every call; its check reads only the signature."""

    cacheable_check = True
    key_length_class = True

    def check(self, p):
        return ["refuses everything"]

    def forward(self, p, scale):
        raise AssertionError("never chosen")


@contextlib.contextmanager
def flash_kernel(kernel):
    handle = _registry.install_flash_kernel(kernel)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def overrideable(device_type):
    handle = attend.register_overrideable(device_type, lambda *a, **kw: None)
    try:
        yield
    finally:
        handle.remove()


def _calls():
    """(id, make params, context, the backend decide picks): each differs from the others in one
    component of the signature at least. CPU fp32 calls run FLASH's blocked kernel unless said."""
    q = rand(1, 4, 8, 16)
    k2 = rand(1, 2, 8, 16)
    bool_mask, float_mask = rand(8, 8) > 0, rand(8, 8)
    grad_mask = rand(8, 8, requires_grad=True)
    none = contextlib.nullcontext
    return [
        # Registering changes the registries' versions, which every key holds: these go first, so
        # that the entries after them stay readable.
        ("flash kernel installed", lambda: params(q), lambda: flash_kernel(_RefusingKernel()), B.EFFICIENT_ATTENTION),
        ("meta device, OVERRIDEABLE registered", lambda: params(torch.empty(1, 4, 8, 16, device="meta")),
         lambda: overrideable("meta"), B.OVERRIDEABLE),
        ("base", lambda: params(q), none, B.FLASH_ATTENTION),
        ("query length", lambda: params(rand(1, 4, 5, 16), q, q), none, B.FLASH_ATTENTION),
        ("key length", lambda: params(q, rand(1, 4, 12, 16)), none, B.FLASH_ATTENTION),
        ("head dim", lambda: params(rand(1, 4, 8, 32)), none, B.FLASH_ATTENTION),
        ("strides", lambda: params(rand(1, 8, 4, 16).transpose(1, 2)), none, B.FLASH_ATTENTION),
        ("dtype", lambda: params(q.double()), none, B.FLASH_ATTENTION),
        ("requires_grad", lambda: params(q.clone().requires_grad_()), none, B.FLASH_ATTENTION),
        ("is_causal", lambda: params(q, causal=True), none, B.FLASH_ATTENTION),
        ("dropout", lambda: params(q, dropout=0.25), none, B.FLASH_ATTENTION),
        ("dropout 1", lambda: params(q, dropout=1.0), none, B.MATH),
        ("enable_gqa", lambda: params(q, k2, gqa=True), none, B.FLASH_ATTENTION),
        ("bool mask", lambda: params(q, mask=bool_mask), none, B.EFFICIENT_ATTENTION),
        ("float mask", lambda: params(q, mask=float_mask), none, B.EFFICIENT_ATTENTION),
        ("mask shape", lambda: params(q, mask=rand(4, 8, 8) > 0), none, B.EFFICIENT_ATTENTION),
        ("mask strides", lambda: params(q, mask=bool_mask.t()), none, B.EFFICIENT_ATTENTION),
        ("causal bias upper-left", lambda: params(q, mask=causal_upper_left(8, 8)), none, B.FLASH_ATTENTION),
        ("causal bias lower-right", lambda: params(q, mask=causal_lower_right(8, 8)), none, B.FLASH_ATTENTION),
        ("sdpa_kernel", lambda: params(q), lambda: attend.sdpa_kernel([B.EFFICIENT_ATTENTION, B.MATH]),
         B.EFFICIENT_ATTENTION),
        ("set_priority", lambda: params(q), lambda: attend.sdpa_kernel([B.MATH, B.FLASH_ATTENTION], set_priority=True),
         B.MATH),
        ("grad mode", lambda: params(q), torch.no_grad, B.FLASH_ATTENTION),
        ("deterministic", lambda: params(q), deterministic, B.FLASH_ATTENTION),
        ("deterministic warn-only", lambda: params(q), lambda: deterministic(warn_only=True), B.FLASH_ATTENTION),
        ("torch cudnn flag", lambda: params(q), lambda: torch_sdp_flag("cudnn"), B.FLASH_ATTENTION),
        ("torch flash flag", lambda: params(q), lambda: torch_sdp_flag("flash"), B.FLASH_ATTENTION),
        # Triton's interpreter: the core takes no fp32 FLASH call, and EFFICIENT refuses a broadcast
        # float mask whose gradient it would sum with atomics where deterministic mode forbids them.
        ("interpreter", lambda: params(q), lambda: interpreter(True), B.EFFICIENT_ATTENTION),
        ("interpreter, head dim 288", lambda: params(rand(1, 4, 8, 288)), lambda: interpreter(True), B.MATH),
        ("mask requires_grad", lambda: params(q, mask=grad_mask), lambda: interpreter(True), B.EFFICIENT_ATTENTION),
        ("mask requires_grad, deterministic", lambda: params(q, mask=grad_mask),
         lambda: _both(interpreter(True), deterministic()), B.MATH),
        ("mask requires_grad, deterministic, no grad", lambda: params(q, mask=grad_mask),
         lambda: _both(interpreter(True), deterministic(), torch.no_grad()), B.EFFICIENT_ATTENTION),
        ("meta device", lambda: params(torch.empty(1, 4, 8, 16, device="meta")), none, B.MATH),
    ]


@contextlib.contextmanager
def _both(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


# Each registration is a new state of the registries, so its calls never meet an earlier entry.
REGISTERS = {"flash kernel installed", "meta device, OVERRIDEABLE registered"}


def test_every_component_changes_the_signature_and_the_cache_answers_as_decide():
    calls = _calls()
    signatures = set()
    for name, make, context, want in calls:  # fills the cache
        with context():
            p = make()
            signatures.add(_dispatch.signature(p, _dispatch._state.current_state()))
            assert _dispatch.decide(p).backend is want, name
            assert _dispatch.choose(p) is want, name
    assert len(signatures) == len(calls)  # no two calls share a signature
    assert set(_dispatch._decisions) == signatures
    for name, make, context, want in calls[::-1]:  # reads it, the latest entries first
        with context():
            p = make()
            assert (_dispatch.signature(p, _dispatch._state.current_state()) in signatures) is (name not in REGISTERS)
            assert _dispatch.choose(p) is want, name
            assert _dispatch.decide(p).backend is want, name


def test_a_cached_choice_skips_the_checks_and_a_user_check_runs_every_call():
    seen = []

    class Kernel:
        def check(self, p):
            seen.append(p.query.dtype)
            return [] if p.query.dtype is torch.float32 else ["fp32 only"]

        def forward(self, p, scale):
            return torch.zeros_like(p.query)

    q = rand(1, 2, 8, 16)
    cacheable = Kernel()
    cacheable.cacheable_check = True
    with flash_kernel(cacheable):
        for _ in range(3):
            assert _dispatch.choose(params(q)) is B.FLASH_ATTENTION
        assert seen == [torch.float32]  # asked once, then the cache answered
        assert _dispatch.choose(params(q.half())) is B.EFFICIENT_ATTENTION
        assert seen == [torch.float32, torch.float16]
    seen.clear()
    with flash_kernel(Kernel()):  # no cacheable_check: its check may read anything of the call
        for _ in range(3):
            assert _dispatch.choose(params(q)) is B.FLASH_ATTENTION
        assert seen == [torch.float32] * 3
    assert _dispatch.choose(params(q)) is B.FLASH_ATTENTION  # attend's own kernel again


def test_overrideable_with_a_check_is_not_cached():
    answers = iter([["not now"], []])
    handle = attend.register_overrideable("meta", lambda *a, **kw: None, check=lambda p: next(answers))
    try:
        p = params(torch.empty(1, 2, 8, 16, device="meta"))
        assert _dispatch.choose(p) is B.MATH
        assert _dispatch.choose(p) is B.OVERRIDEABLE
    finally:
        handle.remove()


def test_cache_is_bounded():
    for L in range(1, _dispatch.DECISION_CACHE_SIZE + 40):  # a new query length: a new key
        p = params(rand(1, 2, L, 8), rand(1, 2, 3, 8))
        assert _dispatch.choose(p) is B.FLASH_ATTENTION
        assert len(_dispatch._decisions) <= _dispatch.DECISION_CACHE_SIZE
    assert _dispatch.choose(params(rand(1, 2, 1, 8), mask=rand(1, 1) > 0)) is B.EFFICIENT_ATTENTION


def test_nothing_is_cached_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _dispatch.choose(params(rand(1, 2, 8, 16))) is B.FLASH_ATTENTION
    assert not _dispatch._decisions


def test_errors_are_never_cached():
    q = rand(1, 2, 8, 16)
    for _ in range(2):
        with attend.sdpa_kernel([B.CUDNN_ATTENTION]):
            with pytest.raises(RuntimeError, match="CUDNN_ATTENTION: CUDNN runs on cuda tensors only"):
                attend.scaled_dot_product_attention(q, q, q)
        assert not _dispatch._decisions
    out = attend.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and _dispatch._decisions


def test_explain_can_use_and_warnings_do_not_read_the_cache(monkeypatch):
    q, mask = rand(1, 2, 8, 16), rand(8, 8)
    with attend.sdpa_kernel([B.MATH, B.FLASH_ATTENTION]):
        attend.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        assert list(_dispatch._decisions.values()) == [B.MATH]
        key = next(iter(_dispatch._decisions))
        _dispatch._decisions[key] = B.FLASH_ATTENTION  # a wrong entry: only the dispatch itself may read it
        cached = dict(_dispatch._decisions)
        d = attend.explain(q, q, q, attn_mask=mask)
        assert d.backend is B.MATH and "FLASH takes no attn_mask" in d.reasons[B.FLASH_ATTENTION][0]
        assert not attend.can_use_flash_attention(attend.SDPAParams(q, q, q, mask, 0.0, False, False))
        assert _dispatch._decisions == cached
        _dispatch._decisions[key] = B.MATH
        monkeypatch.setattr(attend, "WARN_FOR_UNFUSED_KERNELS", True)
        for _ in range(2):  # the second call is a cache hit and still warns
            monkeypatch.setattr(_dispatch, "_warned", set())
            with pytest.warns(UserWarning, match="fell back to the unfused MATH backend"):
                attend.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend.scaled_dot_product_attention(q, q, q, attn_mask=mask)  # EFFICIENT: no warning


@pytest.mark.parametrize("backend", ["CUDNN_ATTENTION", "FLASH_ATTENTION"])
def test_torch_sdpa_only_sets_and_restores_torch_flags_as_sdpa_kernel_does(backend, monkeypatch):
    from torch.nn.attention import SDPBackend as TorchBackend
    from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel

    from attend.backends._base import torch_sdpa_only

    def flags():
        return [getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("cudnn", "flash", "mem_efficient", "math")]

    with torch_sdpa_kernel(getattr(TorchBackend, backend)):
        inside_sdpa_kernel = flags()
    before, seen = flags(), []
    q = rand(1, 2, 4, 8)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append((flags(), a, kw)) or a[0])
    member = B[backend]
    assert torch_sdpa_only(member, q, q, q, is_causal=True) is q
    assert seen == [(inside_sdpa_kernel, (q, q, q), {"is_causal": True})] and sum(inside_sdpa_kernel) == 1
    assert flags() == before

    def fails(*a, **kw):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fails)
    with pytest.raises(RuntimeError, match="no kernel"):
        torch_sdpa_only(member, q, q, q)
    assert flags() == before


def test_no_choice_is_cached_while_torch_flags_are_held_or_change(monkeypatch):
    """PyTorch's SDPA flags are process-global: a choice made while another thread's run holds them
    changed, or that sees them change, may have read two states, so it is not kept."""
    from attend.backends import _base

    q = rand(1, 2, 8, 16)
    monkeypatch.setitem(_base.TORCH_FLAGS, "HELD", 1)  # another thread inside torch_sdpa_only
    attend.scaled_dot_product_attention(q, q, q)
    assert not _dispatch._decisions
    monkeypatch.setitem(_base.TORCH_FLAGS, "HELD", 0)
    decide = _dispatch.decide

    def racing(p, **kw):  # another thread sets and restores the flags during this choice
        _base._flags_changing(+1)
        _base._flags_changing(-1)
        return decide(p, **kw)

    monkeypatch.setattr(_dispatch, "decide", racing)
    attend.scaled_dot_product_attention(q, q, q)
    assert not _dispatch._decisions
    monkeypatch.setattr(_dispatch, "decide", decide)
    attend.scaled_dot_product_attention(q, q, q)
    assert len(_dispatch._decisions) == 1


# ----------------------------------------------------------------------------------------------
# The key length's class (Note [key length class] in attend/_dispatch.py)
# ----------------------------------------------------------------------------------------------

def _count_decide(monkeypatch) -> list:
    seen = []
    real = _dispatch.decide
    monkeypatch.setattr(_dispatch, "decide", lambda p, **kw: seen.append(p.key.shape[-2]) or real(p, **kw))
    return seen


@pytest.mark.parametrize("layout", ["grown by cat", "static cache slice", "(B, S, H, D) rows", "packed K / V"])
def test_a_decode_loop_keeps_its_decision_as_the_keys_grow(monkeypatch, layout):
    """A decode loop's keys grow by one per call: its choice is made once per class of the length
    (S % 64 == 0 or not, S == L), not once per length, and every cached answer is decide's."""
    seen = _count_decide(monkeypatch)
    # 307 is prime: no length below it divides a buffer's stride, which would be a class of its own
    make = growing_layouts(2, 2, 307, 16)[layout]
    q = rand(2, 1, 4 * 16).view(2, 1, 4, 16).transpose(1, 2)  # one query row of 4 heads, GQA 2:1
    for S in range(3, 300):
        k, v = make(S)
        p = params(q, k, v, gqa=True)
        assert _dispatch.choose(p) is B.FLASH_ATTENTION
    assert sorted(seen) == [3, 64], seen  # S % 64 == 0 or not
    assert len(_dispatch._decisions) == len(seen)
    for S in (2, 64, 191, 299):  # the answers held are decide's
        k, v = make(S)
        assert _dispatch.choose(params(q, k, v, gqa=True)) is _dispatch.decide(params(q, k, v, gqa=True)).backend


def test_the_class_holds_what_the_checks_read_of_the_length():
    """S 0 and 1, S == L, S % 64 == 0 and the strides' relation to S each make their own key, and
    a key length class never holds a masked call (its mask's shape holds S)."""
    def key(q, k, mask=None):
        return _dispatch.signature(params(q, k, mask=mask), _dispatch._state.current_state())

    q = rand(1, 2, 8, 16)
    assert key(q, rand(1, 2, 1, 16)) != key(q, rand(1, 2, 2, 16))  # S == 1 keys exactly
    assert key(q, rand(1, 2, 7, 16)) == key(q, rand(1, 2, 9, 16)) != key(q, rand(1, 2, 8, 16))  # S == L
    assert key(q, rand(1, 2, 63, 16)) == key(q, rand(1, 2, 65, 16)) != key(q, rand(1, 2, 128, 16))  # S % 64
    buf = rand(1, 2, 100, 16)
    assert key(q, buf[:, :, :30]) == key(q, buf[:, :, :31]) != key(q, rand(1, 2, 30, 16))  # fixed strides
    assert key(q, buf[:, :, :30]) != key(q, buf[:, :, :50])  # 50 divides the buffer: its strides are 2 S-multiples
    assert key(q, rand(1, 30, 2, 16).transpose(1, 2)) == key(q, rand(1, 31, 2, 16).transpose(1, 2))
    masked = [key(q, rand(1, 2, S, 16), mask=rand(8, S) > 0) for S in (30, 31)]
    assert masked[0] != masked[1]
    assert not _dispatch._classed(masked[0]) and _dispatch._classed(key(q, buf[:, :, :30]))


def test_a_check_that_may_read_the_length_keeps_exact_keys(monkeypatch):
    """While a flash kernel whose check reads the key length (cacheable, no ``key_length_class``) is
    installed, decisions keep the exact signature, so its answer changes where its check's does, and
    a call of a fixed length is still kept prepared."""
    class UpTo100:
        cacheable_check = True

        def check(self, p):
            return [] if p.key.shape[-2] <= 100 else ["keys beyond 100"]

        def forward(self, p, scale):
            return torch.zeros_like(p.query)

    seen = _count_decide(monkeypatch)
    q = rand(1, 2, 1, 16)
    with flash_kernel(UpTo100()):
        for _ in range(2):
            for S in range(95, 106):
                want = B.FLASH_ATTENTION if S <= 100 else B.EFFICIENT_ATTENTION
                assert _dispatch.choose(params(q, rand(1, 2, S, 16))) is want, S
        assert len(seen) == 11  # once per length, the second pass from the cache
        assert not any(_dispatch._classed(key) for key in _dispatch._decisions)
        k = rand(1, 2, 50, 16)
        for _ in range(3):
            attend.scaled_dot_product_attention(q, k, k)
        assert len(_dispatch._prepared) == 1


def test_a_decode_loop_of_prepared_calls_matches_unprepared_ones(monkeypatch):
    seen = _count_prepare(monkeypatch)
    q = rand(1, 4, 1, 16)
    cache = rand(2, 1, 2, 83, 16)  # a prime length: no class of its own below it
    outs = [attend.scaled_dot_product_attention(q, cache[0, :, :, :S], cache[1, :, :, :S], enable_gqa=True)
            for S in range(10, 80)]
    assert len(seen) == 2  # a prepare per class: S % 64 == 0 or not
    _dispatch._prepared.clear()
    _dispatch._decisions.clear()
    for S, out in zip(range(10, 80), outs):
        _dispatch._prepared.clear()
        again = attend.scaled_dot_product_attention(q, cache[0, :, :, :S], cache[1, :, :, :S], enable_gqa=True)
        assert torch.equal(out, again), S


# ----------------------------------------------------------------------------------------------
# Prepared calls (Note [prepared calls] in attend/_dispatch.py)
# ----------------------------------------------------------------------------------------------

def _count_prepare(monkeypatch) -> list:
    seen = []
    real = _dispatch.prepare
    monkeypatch.setattr(_dispatch, "prepare", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    return seen


def test_a_prepared_call_skips_prepare_and_gives_the_same_output(monkeypatch):
    seen = _count_prepare(monkeypatch)
    q = rand(1, 8, 6, 16)
    k, v = rand(1, 2, 10, 16), rand(1, 2, 10, 16)
    keys = rand(1, 1, 1, 10) > 0.3
    for mask in (None, keys):
        first = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        again = attend.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        assert torch.equal(first, again)
    assert len(seen) == 2 and len(_dispatch._prepared) == 2  # one prepare per call form


@pytest.mark.parametrize("change,error", [
    (dict(key="float64 key"), (TypeError, "share a dtype")),
    (dict(value="meta value"), (ValueError, "on one device")),
    (dict(attn_mask="meta mask"), (ValueError, "attn_mask is on meta")),
    (dict(scale=float("inf")), (ValueError, "scale must be a finite float")),
    (dict(dropout_p=1.5), (ValueError, "dropout_p must be in")),
    (dict(is_causal=1), (TypeError, "is_causal must be a bool")),
    (dict(enable_gqa=1), (TypeError, "enable_gqa must be a bool")),
], ids=["key dtype", "value device", "mask device", "scale inf", "dropout 1.5", "is_causal int", "enable_gqa int"])
def test_a_prepared_call_never_skips_an_error(change, error):
    """After a valid call is kept, calls that differ only in what validation reads beyond the
    decision's signature (the key's and value's dtypes and devices, the mask's device, the scale's
    value, the flags' types) raise as they would with nothing kept."""
    q, k = rand(1, 2, 4, 8), rand(1, 2, 6, 8)
    mask = rand(1, 1, 4, 6) > 0.5
    base = dict(query=q, key=k, value=k, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    attend.scaled_dot_product_attention(**base)
    assert len(_dispatch._prepared) == 1
    stand_in = {"float64 key": k.double(), "meta value": k.to("meta"), "meta mask": mask.to("meta")}
    call = {**base, **{name: stand_in.get(val, val) if isinstance(val, str) else val for name, val in change.items()}}
    kind, match = error
    with pytest.raises(kind, match=match):
        attend.scaled_dot_product_attention(**call)
    _dispatch._prepared.clear()
    _dispatch._decisions.clear()
    with pytest.raises(kind, match=match):
        attend.scaled_dot_product_attention(**call)


def test_calls_prepare_changes_or_that_warn_are_not_kept(monkeypatch):
    q = rand(1, 2, 4, 8)
    h = q.half()
    attend.scaled_dot_product_attention(h, h, h, attn_mask=rand(1, 1, 4, 4))  # a float32 mask cast to half
    attend.scaled_dot_product_attention(rand(2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8))  # a broadcast query
    attend.scaled_dot_product_attention(q[:, :, :0], q, q)  # no query rows: zeros
    attend.scaled_dot_product_attention(q, q, q, dropout_p=1.0)  # MATH, which may warn
    attend.scaled_dot_product_attention(q, q, q, scale=torch.tensor(0.5))  # a tensor scale
    assert not _dispatch._prepared
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    attend.scaled_dot_product_attention(q, q, q)
    assert not _dispatch._prepared


def test_prepared_calls_follow_sdpa_kernel_and_are_bounded():
    q = rand(1, 2, 4, 8)
    mask = rand(4, 4) > 0.5
    attend.scaled_dot_product_attention(q, q, q, attn_mask=mask)  # EFFICIENT
    with attend.sdpa_kernel([B.MATH]):  # a new state: a new key, and MATH is not kept
        with mock.patch.object(_dispatch.BACKENDS[B.EFFICIENT_ATTENTION], "run",
                               side_effect=AssertionError("EFFICIENT ran inside sdpa_kernel(MATH)")):
            attend.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    for L in range(1, _dispatch.DECISION_CACHE_SIZE + 40):
        attend.scaled_dot_product_attention(rand(1, 2, L, 8), q, q)
        assert len(_dispatch._prepared) <= _dispatch.DECISION_CACHE_SIZE


def test_prepared_and_unprepared_calls_agree_on_random_calls(monkeypatch):
    """Random valid calls, each run twice (the second through the table where kept) and once more
    with the table off: the three outputs are equal bit for bit."""
    g = torch.Generator().manual_seed(7)
    for _ in range(40):
        B_, Hk, G = (int(x) for x in torch.randint(1, 3, (3,), generator=g))
        L, S, E = (int(x) for x in torch.randint(1, 9, (3,), generator=g))
        q, k, v = rand(B_, Hk * G, L, E), rand(B_, Hk, S, E), rand(B_, Hk, S, E)
        kw = dict(enable_gqa=G > 1)
        pick = int(torch.randint(0, 4, (1,), generator=g))
        if pick == 1:
            kw["attn_mask"] = rand(B_, 1, L, S) > 0.3
        elif pick == 2:
            kw["attn_mask"] = rand(L, S)
        elif pick == 3 and L <= S:
            kw["is_causal"] = True
        if bool(torch.randint(0, 2, (1,), generator=g)):
            kw["scale"] = float(torch.rand((), generator=g)) + 0.1
        a = attend.scaled_dot_product_attention(q, k, v, **kw)
        b = attend.scaled_dot_product_attention(q, k, v, **kw)
        with monkeypatch.context() as m:
            m.setattr(_dispatch, "_prepared_key", lambda *args: None)
            c = attend.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.equal(a, b) and torch.equal(a, c), kw
    assert _dispatch._prepared  # the table was used


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned, asynchronous copy is CUDA's"))])
def test_small_tensors_reach_the_device_with_their_values(device):
    """The kernels' small argument tensors (flex's list strides and capture metadata) go to a GPU
    through pinned memory and an asynchronous copy, which does not wait for the GPU's queue; the
    values must arrive whatever runs before the copy on the stream."""
    from attend._hostcache import small_tensor

    n = 2048 if device == "cuda" else 64
    busy = torch.randn(n, n, device=device)
    for i in range(8):
        busy = busy @ busy * 1e-3  # queued work ahead of the copies (on a GPU)
        vals = [i, -i, 2 ** 31 - 1 - i, 7 * i]
        t = small_tensor(vals, torch.int64, device)
        assert t.device.type == device and t.dtype == torch.int64
        assert t.tolist() == vals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and graph capture are CUDA's")
def test_small_tensors_per_stream_and_under_graph_capture():
    """Another stream gets its own copy (filled on that stream, so its kernels never read it
    before the copy has run); a tensor first asked for during a CUDA graph's capture is filled by
    the graph's own kernels, kept by no one, and right at every replay."""
    from attend import _hostcache
    from attend._hostcache import small_tensor

    vals = [3, 1, 4, 1, 5, 9, 2, 6]
    main = small_tensor(vals, torch.int32, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = small_tensor(vals, torch.int32, "cuda")
        assert other is not main and other.tolist() == vals
    assert small_tensor(vals, torch.int32, "cuda") is main
    new = [271, 828, 182]
    kept = len(_hostcache._SMALL)
    out = torch.zeros(3, dtype=torch.int32, device="cuda")
    g = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g, stream=side):
        out.copy_(small_tensor(new, torch.int32, "cuda") * 2)
    assert len(_hostcache._SMALL) == kept  # nothing kept from the capture
    for _ in range(2):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert out.tolist() == [2 * v for v in new]

"""``attend.flex_attention.explain``: the path it names is the one the call then takes (the dispatch's
path counters), forward and backward, with the reason each faster path declined."""

from __future__ import annotations

import pytest
import torch

import attend.flex_attention as flex
from attend._flex import dispatch
from attend.kernels.options import kernel_options
from conftest import DEVICE

N = 128  # one block of queries and keys: the Gluon forward's smallest call on an H100 / H200
D = 128 if DEVICE == "cuda" else 16
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

# which counters of dispatch.PATHS a call on each path moves
FORWARD_COUNTERS = {"band": {"band"}, "gluon_hooks": {"fused", "band_hooks_gluon"},
                    "gluon_lists": {"fused", "lists_gluon"},
                    "band_hooks": {"fused", "band_hooks"}, "lists": {"fused"}, "blocked": {"blocked"}}
BACKWARD_COUNTERS = {"dense": set(), "gluon_dkdv": {"fused_backward", "band_hooks_backward", "gluon_dkdv"},
                     "gluon_fused": {"fused_backward", "band_hooks_backward", "gluon_dkdv"},
                     "core": {"fused_backward"}, "blocked": {"blocked_backward"}}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


_DOC = torch.arange(N, device=DEVICE) // 40


def _document(b, h, q_idx, kv_idx):
    return _DOC[q_idx] == _DOC[kv_idx]


_TABLE = torch.randn(2, 2 * N, generator=torch.Generator().manual_seed(3)).to(DEVICE)


def _rel_bias(score, b, h, q_idx, kv_idx):
    return score + _TABLE[h, q_idx - kv_idx + N]


# name: (score_mod, mask_mod, flex_attention kwargs, KernelOptions, trained table, the paths on the CPU)
CASES = {
    "band_alone": (None, _causal, {}, {}, False, ("band", "dense")),
    "score_over_band": (_softcap, _causal, {}, {}, False, ("band_hooks", "core")),
    "max_scores_asked": (_softcap, _causal, dict(return_aux=flex.AuxRequest(max_scores=True)), {}, False,
                         ("band_hooks", "core")),
    "kernel_options": (_softcap, _causal, dict(kernel_options={"BLOCK_M": 64}), {}, False, ("band_hooks", "core")),
    "document_lists": (_softcap, _document, {}, {}, False, ("lists", "core")),
    "bands_off": (_softcap, _causal, {}, dict(flex_bands=False), False, ("lists", "core")),
    "trained_capture": (_rel_bias, _causal, {}, {}, True, ("band_hooks", "core")),
}


def _inputs(seed: int, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, N, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def _moved(before: dict) -> set:
    return {k for k, v in dispatch.PATHS.items() if v != before[k]}


@pytest.fixture(autouse=True)
def _count_gluon_dkdv(monkeypatch):
    """dispatch.PATHS["gluon_dkdv"]: launches of the Gluon dK / dV kernel (not its warmups)."""
    from attend.kernels import launch

    monkeypatch.setitem(dispatch.PATHS, "gluon_dkdv", 0)
    if launch.ws_bwd is not None:
        real = launch.ws_bwd.dkdv

        def counted(*a, **kw):
            if not kw.get("warmup"):
                dispatch.PATHS["gluon_dkdv"] += 1
            return real(*a, **kw)
        monkeypatch.setattr(launch.ws_bwd, "dkdv", counted)


def _run_and_compare(q, k, v, score, bm, kw, trained):
    """explain's route for the call, checked against the counters that running it moves (a
    backward over a band moves band_hooks_backward too; a blocked forward's backward, none)."""
    table = _TABLE.clone().requires_grad_() if trained else None
    if trained:
        score = lambda s, b, h, q_idx, kv_idx: s + table[h, q_idx - kv_idx + N]  # noqa: E731
    route = flex.explain(q, k, v, score, bm, **kw)
    before = dict(dispatch.PATHS)
    res = flex.flex_attention(q, k, v, score, bm, **kw)
    assert _moved(before) == FORWARD_COUNTERS[route.forward], (str(route), _moved(before))
    out = res[0] if isinstance(res, tuple) else res
    before = dict(dispatch.PATHS)
    out.float().square().sum().backward()
    over_band = route.forward in ("gluon_hooks", "band_hooks") and route.backward == "core"
    expected = BACKWARD_COUNTERS[route.backward] | ({"band_hooks_backward"} if over_band else set())
    if route.forward == "blocked":  # the blocked forward's own autograd: no recomputation
        expected = set()
    assert _moved(before) == expected, (str(route), _moved(before))
    if trained:
        assert table.grad is not None and table.grad.abs().sum() > 0
    return route


@pytest.mark.parametrize("name", list(CASES))
def test_explain_names_the_path_the_call_takes(name):
    score, mask_mod, kw, opts, trained, cpu_paths = CASES[name]
    q, k, v = _inputs(len(name))
    with kernel_options(**opts):
        bm = flex.create_block_mask(mask_mod, None, None, N, N, device=DEVICE)
        route = _run_and_compare(q, k, v, score, bm, kw, trained)
    if DEVICE == "cpu":
        assert (route.forward, route.backward) == cpu_paths, str(route)
        if route.forward == "band_hooks":
            assert "not on an sm_90 GPU" in route.forward_declined["gluon_hooks"] or "kernel_options" in str(route) \
                or "max_scores" in str(route)
    if name == "kernel_options":
        assert "kernel_options given" in route.forward_declined["gluon_hooks"]
        assert route.forward == "band_hooks"
    if name == "max_scores_asked":
        assert "max_scores asked" in route.forward_declined["gluon_hooks"] and route.forward == "band_hooks"
    if name == "document_lists":
        assert "not a band" in route.forward_declined["band_hooks"]
    if name == "bands_off":
        assert route.forward_declined["band_hooks"] == "KernelOptions.flex_bands is off"
    text = str(route)
    assert text.startswith("call: query (1, 2, 128,") and f"forward: {route.forward}: " in text
    assert all(f"  not {p}: {why}" in text for p, why in route.forward_declined.items())


def test_explain_declines_the_kernels_for_what_they_do_not_take():
    """The blocked path where the kernels cannot run, and the blocked backward where deterministic
    mode meets a capture's gradient (scattered by atomics), each with its reason."""
    bm = flex.create_block_mask(_causal, None, None, N, N, device=DEVICE)
    if DEVICE == "cpu":  # the interpreter has no bf16 arithmetic
        q, k, v = _inputs(1, torch.bfloat16)
        route = _run_and_compare(q, k, v, _softcap, bm, {}, False)
        assert (route.forward, route.backward) == ("blocked", "blocked")
        assert "interpreter" in route.forward_declined["lists"]
        assert route.backward_declined["core"] == "the forward ran on the blocked path"
    q, k, v = _inputs(2)
    with torch.no_grad():
        assert flex.explain(q, k, v, _softcap, bm).backward is None
    torch.use_deterministic_algorithms(True)
    try:
        route = _run_and_compare(q, k, v, None, bm, {}, True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert route.backward == "blocked" and "deterministic mode" in route.backward_declined["core"]


def test_explain_checks_arguments_as_the_call_does():
    q, k, v = _inputs(3)
    bm = flex.create_block_mask(_causal, None, None, N, N, device=DEVICE)
    with pytest.raises(ValueError, match="block_mask was created for"):
        flex.explain(q[:, :, :64], k, v, block_mask=bm)


def test_a_gluon_that_does_not_import_leaves_the_core(monkeypatch):
    """Where the Gluon kernels do not import (a Triton without the Gluon API attend uses), a score_mod
    over a band runs on the core's hooks, and explain gives the import error as the reason."""
    from attend.kernels import launch, versions

    monkeypatch.setattr(launch, "ws", None)
    monkeypatch.setattr(launch, "ws_bwd", None)
    monkeypatch.setattr(versions, "GLUON_ERROR", "the Gluon kernels do not import on Triton x.y (test)")
    q, k, v = _inputs(4)
    bm = flex.create_block_mask(_causal, None, None, N, N, device=DEVICE)
    route = _run_and_compare(q, k, v, _softcap, bm, {}, False)
    assert (route.forward, route.backward) == ("band_hooks", "core"), str(route)
    assert "do not import" in route.forward_declined["gluon_hooks"]
    assert "do not import" in route.backward_declined["gluon_dkdv"]

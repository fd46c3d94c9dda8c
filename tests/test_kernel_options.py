"""The launch layer as data: per-call kernel options (a ContextVar, not module globals), the
fixed configs as one ordered rule list, launches by argument name, and the backward's plan."""

from __future__ import annotations

import operator
import threading

import pytest
import torch

pytest.importorskip("triton")

from attend._layout import Band  # noqa: E402
from attend.kernels import configs, launch, options  # noqa: E402
from attend.kernels.fastlaunch import Launcher  # noqa: E402
from attend.kernels.options import KernelOptions, kernel_options  # noqa: E402
from conftest import DEVICE, rand  # noqa: E402


def test_options_nest_and_restore():
    base = options.current()
    with kernel_options(fwd_ws=False) as outer:
        assert options.current() is outer and not outer.fwd_ws
        with kernel_options(bwd_one_loop=True, fwd_ws=True):
            assert options.current().fwd_ws and options.current().bwd_one_loop
        assert options.current() is outer
    assert options.current() == base
    with pytest.raises(RuntimeError), kernel_options(dq_atomic=True):
        raise RuntimeError("the block raised")
    assert options.current().dq_atomic is None


def test_unknown_option_names_itself():
    with pytest.raises(TypeError, match="unknown kernel option.*FWD_WS.*known: .*fwd_ws"):
        with kernel_options(FWD_WS=False):
            pass
    with pytest.raises(TypeError, match="options must be a KernelOptions"):
        options.resolve(3)


def test_environment_is_read_when_options_are_built(monkeypatch):
    monkeypatch.setenv("ATTEND_AUTOTUNE", "1")
    assert options.current().autotune and KernelOptions().autotune
    monkeypatch.setenv("ATTEND_AUTOTUNE", "0")
    assert not options.current().autotune
    with kernel_options(autotune=True):
        assert options.current().autotune


def test_hold_fixes_the_options_until_release(monkeypatch):
    """``hold`` fixes the options in force for a call (read once, not per question); ``release``
    lets the environment count again; inside a ``kernel_options`` block it fixes nothing new."""
    monkeypatch.setenv("ATTEND_AUTOTUNE", "0")
    token = options.hold()
    held = options.current()
    monkeypatch.setenv("ATTEND_AUTOTUNE", "1")
    assert options.current() is held and not held.autotune
    options.release(token)
    assert options.current().autotune
    with kernel_options(fwd_ws=False) as opts:
        assert options.hold() is None and options.current() is opts


def test_options_are_per_thread():
    seen = []
    with kernel_options(varlen_worklist=True):
        t = threading.Thread(target=lambda: seen.append(options.current().varlen_worklist))
        t.start()
        t.join()
        assert options.current().varlen_worklist
    assert seen == [False]


def test_per_call_options_override_the_context():
    """``options=`` per call (flex's kernel_options): a dict of changes to the options in force,
    or a whole KernelOptions."""
    with kernel_options(fwd_ws=False):
        assert options.resolve({"bwd_ws": False}) == KernelOptions(fwd_ws=False, bwd_ws=False)
    opts = KernelOptions(dq_from_ds=False)
    assert options.resolve(opts) is opts


def test_backward_runs_with_its_forwards_options(monkeypatch):
    """Options in force at the forward apply to its backward (autograd may run it on another
    thread, where the ContextVar has its defaults): the dK/dV programs' one loop, here."""
    seen = []
    real = launch._BWD_LAUNCH
    monkeypatch.setattr(launch, "_BWD_LAUNCH", lambda grid, args, cx, *a: seen.append(cx) or real(grid, args, cx, *a))
    q, k, v = (rand(1, 2, 40, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    import attend

    with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
        for one in (False, True):
            with kernel_options(bwd_one_loop=one, bwd_ws=False):
                out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()
            assert seen[-1]["ONE_LOOP"] is one


def test_builders_take_flags_by_keyword():
    with pytest.raises(TypeError):
        configs.fwd_config(128, 128, 8, 3, True)
    with pytest.raises(TypeError):
        configs.bwd_config(64, 128, 64, 64, 8, 2, True)
    assert configs.bwd_config(64, 128, 64, 64, 8, 2, dq_atomic=True).kwargs["DQ_ATOMIC"]


def test_rule_order_is_the_precedence():
    """heuristic is the first matching rule of RULES: decode before fp32 before masks before
    windows before packed sequences before grouped heads before the table."""
    def rule(kind, d=128, **flags):
        key = configs.Key(kind, d, **flags)
        return configs.rule_for(key).name

    assert rule("fwd", l_bucket=1, elem=4, has_mask=True) == "decode"
    # head dim 256's decode tiles fit sm_90's shared memory (16x128 at 3 stages asked for 274432 bytes)
    assert all(configs.heuristic("fwd", 256, l_bucket=1, elem=e).num_stages == 2 for e in (2, 4))
    assert rule("fwd", elem=4, has_mask=True) == "fp32"
    assert rule("fwd", has_mask=True, mask_keys=True, window=True) == "key_mask"
    assert rule("bwd", has_mask=True, mask_keys=True) == "table"  # no key-mask rule for the backward
    assert rule("bwd", has_mask=True, window=True) == "mask"
    assert rule("fwd", window=True, varlen=True) == "window"
    assert rule("fwd", varlen=True, group=8, seq_bucket=4096) == "varlen"
    assert rule("bwd", group=8, seq_bucket=4096, causal=True) == "gqa"
    assert rule("bwd", group=8, seq_bucket=1024, causal=True) == "table"
    assert rule("fwd", 64, group=8, seq_bucket=4096) == "table"  # the D=64 GQA rule is causal only
    assert rule("bwd", elem=4) == "fp32" and rule("fwd", elem=4) == "fp32"
    assert all(rule(kind, d, elem=4, precision="ieee") == "fp32_ieee" for kind in ("fwd", "bwd") for d in (64, 128, 256))
    assert configs.ws_backward(128, 1024) is None and configs.ws_backward(128, 4096) is not None
    assert configs.ws_backward(128, 1024, min_seq_bucket=0) is not None


def test_every_rule_tile_divides_even_tile():
    for rule in configs.RULES:
        for c in rule.configs():
            for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
                assert configs.EVEN_TILE % c.kwargs.get(k, 1) == 0, (rule.name, c)


def _launcher(names):
    lau = Launcher.__new__(Launcher)
    lau.kernel = type("K", (), {"__name__": "kern"})
    lau.arg_names, lau._order = tuple(names), operator.itemgetter(*names)
    lau.unspecialized = ()
    return lau


def test_launcher_orders_arguments_by_name():
    lau = _launcher(["Q", "K", "stride_qb", "H"])
    assert lau.ordered(dict(H=4, stride_qb=7, K="k", Q="q")) == ("q", "k", 7, 4)
    with pytest.raises(TypeError, match=r"missing \['H'\], unknown \[\]"):
        lau.ordered(dict(Q=1, K=2, stride_qb=3))
    with pytest.raises(TypeError, match=r"missing \[\], unknown \['X'\]"):
        lau.ordered(dict(Q=1, K=2, stride_qb=3, H=4, X=5))


def test_backward_plan_prints_its_kernels():
    tiles = launch.Tiles(dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, HEAD_MAJOR=True), 4, 2)
    text = str(launch.BackwardPlan("programs", False, tiles))
    assert "core.attn_bwd_preprocess -> core.attn_bwd (dK/dV and dQ programs)" in text and "64x64/64x64 w4 s2" in text
    assert "HEAD_MAJOR" in text
    gluon = str(launch.BackwardPlan("programs", True, tiles))
    assert "ws_bwd.attn_bwd_dkdv_ws -> core.attn_bwd (dQ programs only)" in gluon


def test_backward_plan_follows_the_options():
    """Host side: dQ by atomics where the options force it, never in deterministic mode; the
    fixed config's tiles otherwise (here the D=128 causal table's head-major 64x64 at 16k)."""
    q = torch.empty(1, 4, 256, 128, dtype=torch.bfloat16, device=DEVICE)
    flags = dict(BLOCK_D=128, CAUSAL=True, WINDOW=False, HAS_MASK=False, MASK_KEYS=False, VARLEN=False,
                 DETERMINISTIC=False)
    opts = KernelOptions(interpret=False, autotune=False, bwd_ws=False)
    plan = launch.backward_plan(flags, q, q, q, q, None, 0.0, None, 16384, 16384, opts)
    assert plan.dq == "programs" and not plan.gluon and plan.tiles.meta["HEAD_MAJOR"]
    atomic = opts.replace(dq_atomic=True)
    assert launch.backward_plan(flags, q, q, q, q, None, 0.0, None, 16384, 16384, atomic).dq == "atomic"
    det = dict(flags, DETERMINISTIC=True)
    assert launch.backward_plan(det, q, q, q, q, None, 0.0, None, 16384, 16384, atomic).dq == "programs"
    no_dq = launch.backward_plan(flags, q, q, q, q, None, 0.0, None, 16384, 16384, opts, dq_programs=False)
    assert no_dq.dq == "from_ds" and not no_dq.tiles.meta["HEAD_MAJOR"]


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_backward_tiles_follow_the_dot_precision(tf32, monkeypatch):
    """fp32 with IEEE dots (allow_tf32 off, PyTorch's default) takes the small tiles whose FMA loops
    build in seconds (configs' "fp32_ieee" rule); with TF32 the tensor cores' 64x64. The dense
    backward and the flex backward (over a band and over the lists) alike."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    q = torch.empty(1, 4, 256, 128, dtype=torch.float32, device=DEVICE)
    opts = KernelOptions(interpret=False, autotune=False, bwd_ws=False)
    flags = launch._bwd_flags(q, q, q, q, dict(CAUSAL=True, WINDOW=False), None, None, False, False, 0.0, False,
                              False, None, 256, 256, opts)
    assert flags["DOT_PRECISION"] == ("tf32" if tf32 else "ieee")
    want = 64 if tf32 else 32
    plan = launch.backward_plan(flags, q, q, q, q, None, 0.0, None, 256, 256, opts)
    assert {plan.tiles.meta[k] for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")} == {want}
    # the autotuner takes TF32's backward; IEEE's keeps the rule (each candidate's build: up to a minute)
    tuned = launch.pick_tiles("bwd", flags, 4, opts.replace(autotune=True))
    assert (tuned is None) == tf32 and (tf32 or tuned.meta["BLOCK_M1"] == 32)
    from attend.flex_attention import create_block_mask

    blocks = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 256, 256, device=DEVICE)
    for lists in (True, False):
        tiles = launch.flex_bwd_tiles(q, q, blocks, opts, lists=lists)
        assert {tiles.meta[k] for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")} == {want}
        # IEEE's 8 warps stay: at 4 ptxas collapsed the registers of such tiles
        assert tiles.warps == (4 if tf32 else 8) == plan.tiles.warps


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_forward_tiles_follow_the_dot_precision(tf32, monkeypatch):
    """fp32's forward with IEEE dots takes the "fp32_ieee" rule's 8-warp tiles (at 4 warps ptxas gave
    the non-causal 64x64 32 registers and a 7.5 KB stack: 24x slower than causal on an H100), and
    the flex forward keeps them; with TF32 the tensor cores' 64x64 at 4 warps."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    q = torch.empty(1, 4, 256, 128, dtype=torch.float32, device=DEVICE)
    opts = KernelOptions(interpret=False, autotune=False, fwd_ws=False)
    flags = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=False, DOT_PRECISION=launch._dot_precision(q.dtype, opts))
    tiles = launch.pick_tiles("fwd", flags, 4, opts)
    want = (64, 64, 4) if tf32 else (64, 32, 8)
    assert (tiles.meta["BLOCK_M"], tiles.meta["BLOCK_N"], tiles.warps) == want
    assert (launch.pick_tiles("fwd", flags, 4, opts.replace(autotune=True)) is None) == tf32  # IEEE: never tuned
    decode = launch.pick_tiles("fwd", flags, 4, opts, l_bucket=1)  # at most 16 queries
    assert (decode.meta["BLOCK_M"], decode.meta["BLOCK_N"], decode.warps) == ((16, 128, 4) if tf32 else (16, 64, 8))
    from attend.flex_attention import create_block_mask

    blocks = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 256, 256, device=DEVICE)
    flex = launch.flex_tiles(q, q, blocks, opts)
    assert (flex.meta["BLOCK_M"], flex.meta["BLOCK_N"], flex.warps) == want


def test_fp32_tf32x3_dots_take_their_rules(monkeypatch):
    """KernelOptions.fp32_dots="tf32x3": fp32 without allow_tf32 runs its dots as three TF32 products,
    with configs' "fp32_tf32x3" tiles (dense, flex, decode); allow_tf32 on still means TF32; a value
    other than "ieee" / "tf32x3" is refused, naming it."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    opts = KernelOptions(interpret=False, autotune=True, fwd_ws=False, bwd_ws=False, fp32_dots="tf32x3")
    q = torch.empty(1, 4, 256, 128, dtype=torch.float32, device=DEVICE)
    assert launch._dot_precision(q.dtype, opts) == "tf32x3"
    assert launch._dot_precision(torch.bfloat16, opts) == "tf32"
    flags = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=False, DOT_PRECISION="tf32x3")
    fwd = launch.pick_tiles("fwd", flags, 4, opts)  # the rule's, not the autotuner's
    assert (fwd.meta["BLOCK_M"], fwd.meta["BLOCK_N"], fwd.warps, fwd.stages) == (64, 32, 4, 2)
    decode = launch.pick_tiles("fwd", flags, 4, opts, l_bucket=1)
    assert (decode.meta["BLOCK_N"], decode.warps) == (64, 4)  # IEEE's decode: 8 warps
    assert configs.rule_for(configs.Key("bwd", 256, elem=4, precision="tf32x3")).name == "fp32_tf32x3"
    from attend.flex_attention import create_block_mask

    blocks = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 256, 256, device=DEVICE)
    # head dim 256 tells the two apart: TF32x3's backward 16x16 at 4 warps, IEEE's at 8; forward 32x16 / 32x32
    q256 = torch.empty(1, 4, 256, 256, dtype=torch.float32, device=DEVICE)
    for dots, bwd_warps, fwd_n in (("tf32x3", 4, 16), ("ieee", 8, 32)):
        o = opts.replace(fp32_dots=dots)
        flex = launch.flex_bwd_tiles(q256, q256, blocks, o)
        assert {flex.meta[k] for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")} == {16}
        assert flex.warps == bwd_warps
        assert launch.flex_tiles(q256, q256, blocks, o).meta["BLOCK_N"] == fwd_n
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert launch._dot_precision(q.dtype, opts) == "tf32"
    with pytest.raises(ValueError, match="fp32_dots must be 'ieee' or 'tf32x3', got 'tf32x2'"):
        KernelOptions(fp32_dots="tf32x2")


def test_blocked_kernel_refuses_a_window():
    from attend.cpu import blocked

    q = rand(1, 1, 8, 16)
    with pytest.raises(ValueError, match="no band or a causal one"):
        blocked.forward(q, q, q, None, 0.0, Band(3, 0, True), 0.25, 0)


def test_explain_backward_names_the_plan():
    q = rand(1, 2, 40, 16)
    plan = launch.explain_backward(q, q, q, band=Band.causal(), options={"dq_atomic": False})
    assert plan.dq == "programs" and "core.attn_bwd" in str(plan)
    bias = rand(1, 2, 40, 40)
    assert launch.explain_backward(q, q, q, bias, mask_grad=True).dq == "from_ds"
    assert launch.explain_backward(q, q, q, bias, mask_grad=True, options={"dq_from_ds": False}).dq != "from_ds"


def test_explain_prints_the_backward_plan():
    import attend

    q = rand(1, 2, 40, 16, dtype=torch.float16 if DEVICE == "cpu" else torch.bfloat16)
    with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
        text = str(attend.explain(q, q, q, is_causal=True))
    assert "backward: core.attn_bwd_preprocess ->" in text and "core tiles" in text, text

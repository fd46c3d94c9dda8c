"""Every shipped tuning config of the core compiles for sm_90 and sm_80 without a GPU, and the
Hopper builds use wgmma (Ampere builds mma.sync).

Exceptions, by design: the decode forward tiles (BLOCK_M=16) are below wgmma's 64-row minimum
and use mma.sync on Hopper too; decode is bound by reading K and V, not by the tensor cores. The
fp32 forward and backward with IEEE dots (allow_tf32 off) run them as FMAs, as PyTorch asks of fp32."""

import json
import os
import subprocess
import sys

import pytest

from attend.kernels.build import (_BWD_FEATURES, _FEATURES, _FWD_FEATURES, FLEX_BAND_VARIANTS, FLEX_VARIANTS,
                                  FLEX_DIAGONAL_VARIANTS, FLEX_VARLEN_VARIANTS, WS_BWD_FEATURES, WS_FEATURES, rule_jobs)
from attend.kernels.configs import BWD_CONFIGS, FWD_CONFIGS, RULES


@pytest.fixture(scope="module")
def builds():
    # A fresh process: compiling needs real JIT functions, not the interpreter's.
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "attend.kernels.build"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


FWD_TMA_BUILDS = {"tma_loads", "tma_varlen", "tma_bias", "bias_grad", "broadcast_bias_grad", "bool_mask_dropout",
                  "varlen_sliding_window", "varlen_work_list", "key_padding_mask", "window_one_loop_tma"}


def test_feature_names_are_unique():
    """build._build_one looks a variant's flags up by name across the three tables: a name in
    two of them would build one kernel with the other's flags."""
    names = [*_FEATURES, *_FWD_FEATURES, *_BWD_FEATURES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_rule_config_is_built():
    """The build check iterates configs.RULES: each rule's every config is a plain build (a listed
    config at D=128 with no flags of its own) or a build of its own."""
    built = {(job[1], job[4].rsplit("_", 1)[1]) for job in rule_jobs()}
    plain = {(k, str(c)) for k, cfgs in (("fwd", FWD_CONFIGS), ("bwd", BWD_CONFIGS)) for c in cfgs}
    for i, rule in enumerate(RULES):
        for bucket, c in rule.tiles.items():
            kind = "fwd" if rule.kind == "fwd" else "bwd"
            assert (i, str(bucket)) in built or (not rule.flags and (kind, str(c)) in plain), (rule.name, bucket)


def test_every_config_builds_for_hopper_and_ampere(builds):
    # + heuristic configs at D=64, 256, the feature variants of each kernel, paged (fwd only) and
    # pointer loads (bwd only), the warp-specialized Gluon forward and dK / dV (sm_90 only), and every
    # fixed-config rule's configs that no plain build covers (sm_90)
    expected = (2 * (len(FWD_CONFIGS) + len(BWD_CONFIGS)) + 4 + 2 * len(_FEATURES) + len(_FWD_FEATURES)
                + len(_BWD_FEATURES) + len(WS_FEATURES) + len(WS_BWD_FEATURES) + len(rule_jobs()) + 1  # the probe
                + 4 * len(FLEX_VARIANTS + FLEX_BAND_VARIANTS)  # the flex forward and backward (generated hooks)
                + 2 * len(FLEX_VARLEN_VARIANTS + FLEX_DIAGONAL_VARIANTS))  # on sm_90 and sm_80, over the lists,
    # a band and packed sequences, and the table gradient's diagonal pass
    assert len(builds) == expected
    assert {b["head_dim"] for b in builds} == {64, 128, 256}
    assert {b["feature"] for b in builds} >= {"varlen_sliding_window", "paged_seqused"}
    assert {(b["kernel"], b["feature"], b["arch"]) for b in builds if b["feature"].startswith("flex_")} == {
        (k, p + v, a) for k, p in (("fwd", "flex_"), ("bwd", "flex_bwd_")) for v in FLEX_VARIANTS + FLEX_BAND_VARIANTS
        for a in (90, 80)} | {("fwd", "flex_" + v, a) for v in FLEX_VARLEN_VARIANTS for a in (90, 80)} | {
        ("bwd", "flex_bwd_" + v, a) for v in FLEX_DIAGONAL_VARIANTS for a in (90, 80)}
    probes = [b for b in builds if b["kernel"] == "probe"]
    assert [b["feature"] for b in probes] == ["tma_add_tile"] and probes[0]["tma_reduce_add"], \
        "versions.tma_atomic_add does not build to a TMA reduce-add (cp.reduce.async.bulk.tensor .add)"
    # the Gluon dK / dV kernel adds dQ's tiles by TMA reduce-adds where it fuses dQ (ws_bwd's FUSED_DQ)
    assert [b["feature"] for b in builds if b["kernel"] == "bwd_ws" and b["tma_reduce_add"]] == [
        f for f in WS_BWD_FEATURES if f.endswith("_fused_dq")]
    for b in builds:
        if b["kernel"] == "probe":
            continue
        decode_tile = b["kernel"] == "fwd" and b["config"].startswith("BLOCK_M: 16,")
        if "_fp32_ieee_" in b["feature"]:  # fp32 with IEEE dots: FMA loops, no tensor-core instruction
            assert not (b["wgmma"] or b["mma_sync"]), f"{b['feature']} {b['config']} uses the tensor cores"
        elif "_fp32_tf32x3_" in b["feature"]:  # three TF32 products per dot: on the tensor cores, by mma.sync
            # where a tile is below wgmma's 64 rows (head dim 256's fit shared memory only so)
            assert b["wgmma"] or b["mma_sync"], f"{b['feature']} {b['config']} misses the tensor cores"
        elif b["arch"] == 90 and decode_tile:
            assert b["mma_sync"], f"{b['config']} decode tile on sm_90"
        elif b["arch"] == 90:
            assert b["wgmma"], f"{b['kernel']} {b['config']} D={b['head_dim']} on sm_90 does not use wgmma"
        else:
            assert b["mma_sync"] and not b["wgmma"], f"{b['kernel']} {b['config']} on sm_80"
        # TMA: the backward's loads on sm_90 unless built with pointer loads; the forward's in its
        # tma_* variants, where the fixed config asks (masks, packed, window; never paged) and in the
        # flex forward (KernelOptions.flex_tma); the warp-specialized Gluon kernels (fwd_ws, bwd_ws;
        # sm_90 only) always
        fwd_tma = (b["feature"] in FWD_TMA_BUILDS or (b["feature"].startswith("rule_") and "TMA: True" in b["config"])
                   or (b["feature"].startswith("flex_") and not b["feature"].startswith("flex_bwd_")))
        bwd_tma = b["feature"] != "pointer_loads" and not b["feature"].startswith("flex_bwd_")  # flex: pointer loads
        want_tma = b["arch"] == 90 and (fwd_tma if b["kernel"] == "fwd" else bwd_tma)
        assert b["tma"] == want_tma, f"{b['kernel']} {b['config']} {b['feature']} sm_{b['arch']}: TMA {b['tma']}"
        if b["arch"] == 90:  # on sm_80 the autotuner's prune drops the configs that need more
            assert b["shared"] <= 227 * 1024, \
                f"{b['kernel']} {b['config']} D={b['head_dim']} needs {b['shared']} B smem"
        if b["stack"] is not None and b["arch"] == 90:  # cuobjdump beside Triton's ptxas
            # ptxas collapsed the allocation: fp32's IEEE forward at 64x64, 4 warps, non-causal got 32
            # registers and a 7.5 KB stack, 24x slower than its causal build (docs/kernels.md,
            # "Tuning: fp32 with IEEE dots"). sm_80's builds are not held to it: five of its
            # backward configs collapse so, and no Ampere card times them (docs/roadmap.md)
            assert not (b["regs"] <= 64 and b["stack"] >= 1024), \
                f"{b['kernel']} {b['config']} {b['feature']}: {b['regs']} registers, {b['stack']} B stack"
            if "_fp32_ieee_" in b["feature"]:  # its rules take the tiles that spill little
                assert b["stack"] <= 256, f"{b['feature']} {b['config']}: {b['stack']} B stack"
            if b["kernel"] == "bwd_ws" and b["feature"].endswith("_fused_dq"):  # 152-360 B, 600-680 with a score hook
                limit = 800 if "score" in b["feature"] else 448
                assert b["stack"] <= limit, f"{b['feature']}: {b['stack']} B stack (spills grew)"
        # the flex builds' softcap (16-bit inputs) takes the hardware's tanh, in the core's flex mode and
        # in the Gluon forward's score hooks; nothing else has a tanh
        with_hooks = b["feature"].startswith("flex_") or b["kernel"] in ("fwd_ws", "bwd_ws")
        assert b["tanh_approx"] == (with_hooks and "score" in b["feature"]), b["feature"]
        if b["feature"].startswith("flex_"):  # fixed configs, no prune: they must fit both GPUs
            assert b["shared"] <= (227 if b["arch"] == 90 else 163) * 1024, \
                f"{b['kernel']} {b['feature']} sm_{b['arch']} needs {b['shared']} B smem"

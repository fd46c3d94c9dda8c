"""Decide between a few tuning choices with interleaved timings: every variant of a case is timed
once per round, for several rounds, through the public API (as ``python -m attend bench`` times
it), and the table gives each variant's median and spread. A single sweep pass ranks configs
from one timing each; on the H100 the same config has read 12% apart within one sweep, more than
the differences being decided (docs/kernels.md, "Tuning: timing spread"), so a ranking that
matters comes from here.

    PYTHONPATH=src python benchmarks/ab.py [--cases varlen-window,bias-grad] [--rounds 5] [--json out.json]

A variant is (kind, config, forward TMA loads): ``KernelOptions.fwd_tma`` for "fwd"; the
backward's TMA choice stays the library's. Each backward variant's row names the plan it ran
(``launch.BackwardPlan``: kernels, dQ strategy, tiles).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from sweep import api_ms, case_base, cases, force_configs  # first: it turns the autotuner off  # isort: skip

import torch  # noqa: E402

from attend.kernels import launch  # noqa: E402
from attend.kernels.configs import bwd_config, fwd_config, heuristic  # noqa: E402
from attend.kernels.options import kernel_options  # noqa: E402

_c, _b = fwd_config, bwd_config

# Per case ("name" or "name@S" for one of its lengths): the shipped fixed config first (marked
# "now"), then the challengers. A variant is (kind, config, forward TMA, mark[, overrides]): the
# overrides are kernel options (KernelOptions' fields) set for that variant only.
# The lists hold the comparisons behind the current rules (docs/kernels.md, "Measurements behind
# the tuning"); tiles tried and dropped (two programs per SM by a register cap, 256-row tiles of
# 16 warps, heads-fastest grids) are in the repository's history.
SPLIT = {"fwd_one_loop": False}  # one loop per band edge (core's ONE_LOOP off)
BSPLIT = {"bwd_one_loop": False}
BONE = {"bwd_one_loop": True}
HM64 = _b(64, 64, 64, 64, 4, 2, head_major=True)
OSTORE = {"o_tma": False}  # the Gluon forward stores its output from registers (gl.store)
CORE = {"fwd_ws": False}  # the tl core (its config) where the warp-specialized Gluon forward serves (ws.py)
BCORE = {"bwd_ws": False}  # the core's one backward launch where the Gluon dK / dV kernel serves (ws_bwd.py)
FUSED = {"bwd_ws_fused_dq": True}  # the Gluon dK / dV kernel adds dQ too (TMA reduce-adds; no dQ programs)
FUSED_SHORT = dict(FUSED, bwd_ws_min_seq_bucket=0)  # ... also below configs.WS_BWD_MIN_SEQ_BUCKET
ROWS_DENSE = {"rows_packed": False}  # a model's row views as dense strided calls of the core, not packed (Gluon)
QROWS = {"rows_q_gluon": True}  # a row-view q beside contiguous K / V through the Gluon kernels' Q_ROWS mode
PLAN = {
    "d128-causal-qviews@4096": [("fwd", _c(64, 64, 4, 3), False, "now"), ("fwd", _c(64, 64, 4, 3), False, "", QROWS),
                                ("bwd", _b(64, 128, 128, 64, 8, 3), None, "now"),
                                ("bwd", _b(64, 128, 128, 64, 8, 3), None, "", QROWS)],
    "d128-noncausal-qviews@16384": [("fwd", _c(128, 128, 8, 3), False, "now"),
                                    ("fwd", _c(128, 128, 8, 3), False, "", QROWS),
                                    ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", QROWS)],
    "d128-causal-views@1024": [("fwd", _c(64, 64, 4, 3), False, "now"),
                               ("fwd", _c(64, 64, 4, 3), False, "", ROWS_DENSE),
                               ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", ROWS_DENSE)],
    "d128-causal-views@4096": [("fwd", _c(64, 64, 4, 3), False, "now"),
                               ("fwd", _c(64, 64, 4, 3), False, "", ROWS_DENSE),
                               ("bwd", _b(64, 128, 128, 64, 8, 3), None, "now"),
                               ("bwd", _b(64, 128, 128, 64, 8, 3), None, "", ROWS_DENSE),
                               ("bwd", _b(64, 128, 128, 64, 8, 3), None, "", FUSED)],
    "d128-noncausal-views@4096": [("fwd", _c(128, 128, 8, 3), False, "now"),
                                  ("fwd", _c(128, 128, 8, 3), False, "", ROWS_DENSE),
                                  ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", ROWS_DENSE)],
    "d128-noncausal@1024": [("fwd", _c(64, 64, 4, 3), False, "now"), ("fwd", _c(64, 64, 4, 3), False, "", OSTORE),
                            ("fwd", _c(64, 64, 4, 3), False, "", CORE),
                            ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", FUSED_SHORT)],
    "d128-noncausal@4096": [("fwd", _c(128, 128, 8, 3), False, "now"), ("fwd", _c(128, 128, 8, 3), False, "", OSTORE),
                            ("fwd", _c(128, 128, 8, 3), False, "", CORE),
                            ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", BCORE),
                            ("bwd", HM64, None, "", FUSED)],
    "d128-noncausal@16384": [("fwd", _c(128, 128, 8, 3), False, "now"), ("fwd", _c(128, 128, 8, 3), False, "", CORE)],
    "d128-noncausal-gqa8": [("fwd", _c(128, 128, 8, 3), False, "now"), ("fwd", _c(128, 128, 8, 3), False, "", CORE)],
    "varlen-window": [
        ("fwd", _c(128, 128, 8, 3), True, "now"), ("fwd", _c(128, 128, 8, 3), True, "", OSTORE),
        ("bwd", _b(32, 64, 64, 32, 4, 3), None, "now"), ("bwd", _b(32, 64, 64, 32, 4, 3), None, "", BCORE),
        ("bwd", _b(32, 64, 64, 32, 4, 3), None, "", FUSED),
    ],
    "varlen-full": [
        ("fwd", _c(128, 128, 8, 3), True, "now"), ("fwd", _c(128, 128, 8, 3), True, "", OSTORE),
        ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", BCORE),
    ],
    "varlen-causal": [
        ("fwd", _c(64, 64, 4, 3), True, "now"), ("fwd", _c(64, 64, 4, 3), True, "", CORE),
        ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", BSPLIT),
    ],
    "d128-causal@16384": [("fwd", _c(128, 128, 8, 3), False, "now"), ("fwd", _c(128, 128, 8, 3), False, "", OSTORE),
                          ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", BCORE),
                          ("bwd", HM64, None, "", FUSED)],
    "d128-causal@4096": [("fwd", _c(64, 64, 4, 3), False, "now"), ("fwd", _c(64, 64, 4, 3), False, "", OSTORE),
                         ("bwd", _b(64, 128, 128, 64, 8, 3), None, "now"),
                         ("bwd", _b(64, 128, 128, 64, 8, 3), None, "", BCORE),
                         ("bwd", _b(64, 128, 128, 64, 8, 3), None, "", FUSED)],
    "d128-causal@2048": [("bwd", _b(64, 128, 128, 64, 8, 3), None, "now"),
                         ("bwd", _b(64, 128, 128, 64, 8, 3), None, "", FUSED_SHORT)],
    "d128-causal@1024": [("fwd", _c(64, 64, 4, 3), False, "now"), ("fwd", _c(64, 64, 4, 3), False, "", CORE),
                         ("bwd", HM64, None, "now"), ("bwd", HM64, None, "", BCORE),
                         ("bwd", HM64, None, "", FUSED_SHORT)],
    "d64-causal@16384": [("bwd", _b(32, 128, 64, 64, 4, 3), None, "now"),
                         ("bwd", _b(32, 128, 64, 64, 4, 3), None, "", BONE)],
    "bias-grad": [
        # "now" is the warp-specialized forward (ws.py); the tiles below are the core's
        ("fwd", _c(128, 64, 8, 3), True, "now"), ("fwd", _c(128, 64, 8, 3), True, "", CORE),
        ("fwd", _c(128, 128, 8, 2), True, "", CORE), ("fwd", _c(128, 64, 8, 4), True, "", CORE),
        ("bwd", _b(64, 64, 64, 64, 4, 2), None, "now"), ("bwd", _b(64, 64, 64, 64, 4, 3), None, ""),
    ],
    "padding": [
        ("fwd", _c(128, 128, 8, 3), True, "now"), ("fwd", _c(128, 64, 8, 3), True, ""),
        ("bwd", HM64, None, "now"), ("bwd", _b(64, 128, 128, 64, 8, 3), None, ""),
    ],
}
# fp32 with IEEE dots (configs' "fp32_ieee" rules; docs/kernels.md, "Tuning: fp32 with IEEE dots"): the
# rules' 8-warp tiles, whose sm_90 builds spill at most 224 bytes, against the tiles they replaced
# (ptxas gave some of those 32-64 registers and a 4-10 KB stack) and a neighbour of each.
# Each case also times KernelOptions.fp32_dots="tf32x3" (three TF32 tensor-core products per dot) at
# configs' "fp32_tf32x3" tiles.
X3 = {"fp32_dots": "tf32x3"}


def _fp32_plan(D: int, fwd: list, bwd: list) -> list:
    """An fp32 case's variants at head dim ``D``: the IEEE rules' forward and backward ("now"), the
    challengers ``fwd`` / ``bwd``, and the TF32x3 rules' tiles with that option."""
    def rule(kind, precision):
        return heuristic(kind, D, flags=dict(DOT_PRECISION=precision), elem=4)

    return ([("fwd", rule("fwd", "ieee"), False, "now")] + [("fwd", c, False, "") for c in fwd]
            + [("fwd", rule("fwd", "tf32x3"), False, "", X3), ("bwd", rule("bwd", "ieee"), None, "now")]
            + [("bwd", c, None, "") for c in bwd] + [("bwd", rule("bwd", "tf32x3"), None, "", X3)])


FP32_ALTERNATIVES = {  # head dim: (forward, backward) challengers
    64: ([_c(64, 64, 8, 2), _c(128, 64, 8, 3)], [_b(32, 32, 32, 32, 4, 2)]),
    128: ([_c(32, 64, 8, 2), _c(64, 64, 4, 3)], [_b(32, 32, 32, 32, 4, 2), _b(16, 32, 32, 16, 8, 2)]),
    256: ([_c(32, 16, 4, 2), _c(64, 32, 4, 2)], [_b(16, 32, 32, 16, 4, 1)]),
}
PLAN.update({f"d{D}-{c}-fp32@{S}": _fp32_plan(D, *FP32_ALTERNATIVES[D]) for D in (64, 128, 256)
             for c in ("causal", "noncausal") for S in ((1024, 4096) if D == 128 else (4096,))})


def _label(kind, cfg, tma, mark, overrides=None) -> str:
    kw = cfg.kwargs
    tiles = (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}" if kind == "fwd" else
             f"{kw['BLOCK_M1']}x{kw['BLOCK_N1']}/{kw['BLOCK_M2']}x{kw['BLOCK_N2']}" + (" HM" if kw.get("HEAD_MAJOR") else ""))
    extra = (" noEVEN" if kw.get("EVEN") is False else "") + (" tma" if tma else "")
    extra += f" r{kw['MAXNREG']}" if kw.get("MAXNREG") else ""
    extra += "".join(f" {k}={v}" for k, v in (overrides or {}).items())
    return f"{kind} {tiles} w{cfg.num_warps} s{cfg.num_stages}{extra}" + (" (now)" if mark else "")


def _recording_plans(plans: list):
    """``launch.backward_plan`` that also appends each plan to ``plans`` (to print what ran)."""
    real = launch.backward_plan

    def plan(*a, **kw):
        p = real(*a, **kw)
        plans.append(p)
        return p

    return plan


def run(case: str, rounds: int, kinds=("fwd", "bwd")) -> dict:
    base, _, length = case.partition("@")
    (name, S, make), = [c for c in cases(base) if not length or c[1] == int(length)]
    fwd, bwd, flops, api = make()
    variants = [v if len(v) == 5 else (*v, {}) for v in PLAN[case] if v[0] in kinds]
    times = {i: [] for i in range(len(variants))}
    plans = {i: [] for i in range(len(variants))}
    real_plan = launch.backward_plan
    for r in range(rounds + 1):  # round 0 compiles and warms up; not recorded
        for i, (kind, cfg, tma, _, overrides) in enumerate(variants):
            base = case_base(case, overrides.get("fp32_dots", "ieee"))  # a backward variant's forward
            chosen = dict(force_configs(dict(base, **{kind: cfg})), fwd_tma=bool(tma) if kind == "fwd" else False,
                          **overrides)
            if r == 0:
                launch.backward_plan = _recording_plans(plans[i])
            try:
                with kernel_options(**chosen):
                    ms = api_ms(kind, api)
            except Exception as e:  # out of resources: recorded, not fatal
                times[i] = f"{type(e).__name__}: {str(e)[:100]}"
                continue
            finally:
                launch.backward_plan = real_plan
            if r and isinstance(times[i], list):
                times[i].append(ms)
    out = {}
    for i, (kind, cfg, tma, mark, overrides) in enumerate(variants):
        t = times[i]
        label = _label(kind, cfg, tma, mark, overrides)
        if kind == "bwd" and plans[i]:
            label += f" [{plans[i][-1]}]"
        if isinstance(t, str):
            out[label] = dict(error=t)
            continue
        med = statistics.median(t)
        work = flops if kind == "fwd" else 2.5 * flops
        out[label] = dict(ms=med, tflops=work / med * 1e-9, lo=min(t), hi=max(t), n=len(t))
    return {f"{name} S={S}": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(PLAN))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="fwd,bwd", help="fwd, bwd or both: which variants of each case run")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    for case in args.cases.split(","):
        res = run(case, args.rounds, tuple(args.kinds.split(",")))
        results.update(res)
        for key, rows in res.items():
            print(f"== {key} ({torch.cuda.get_device_name()})")
            for label, r in rows.items():
                if "error" in r:
                    print(f"  {label:44s} {r['error']}")
                else:
                    print(f"  {label:44s} {r['tflops']:6.1f} TFLOP/s  {r['ms']:.3f} ms  [{r['lo']:.3f}, {r['hi']:.3f}]")
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

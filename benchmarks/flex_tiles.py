"""Choose the flex kernels' tiles: ``attend.flex_attention`` timed through the API with each
candidate ``kernel_options`` (forward: BLOCK_M / BLOCK_N / num_warps / num_stages; backward:
BLOCK_M1 / BLOCK_N1 / BLOCK_M2 / BLOCK_N2 / num_warps / num_stages) on the flex benchmark's cases,
in interleaved rounds as ``ab.py`` times the dense kernels. The first row of each kind is the
library's default (no kernel_options); a candidate that does not build (out of shared memory)
prints its error. The causal case also times attend's dense ``is_causal`` FLASH, on the Gluon
forward and on the core (``KernelOptions.fwd_ws=False``): what the flex forward's block lists and
hooks cost against the same core without them.

    PYTHONPATH=src python benchmarks/flex_tiles.py [--cases causal,alibi_causal] [--rounds 5] [--json out.json]
        [--kinds fwd,bwd] [--set tiles|loop|bands|order]

The shapes are ``attend.bench_flex``'s ``full`` preset (B=2, H=16, S=8192, D=128, bf16) on CUDA,
its ``tiny`` preset elsewhere (a smoke test under TRITON_INTERPRET=1). The winners go into
``kernels.configs.flex_tile`` / ``flex_bwd_tile``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import attend
import attend.flex_attention as af
from attend.kernels.options import kernel_options
from attend.bench_flex import PRESETS, case_mods, make_inputs, median_ms, sync

# Candidate kernel_options; None is the library's own choice. The backward rows time forward + backward.
# Keys that are KernelOptions fields (flex_one_loop, flex_tma) apply through ``kernel_options(...)``.
FWD = [None] + [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in (
    (128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
    (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 1))]
# The single loop over partial and full blocks and the TMA reads (``--set loop``).
FWD_LOOP = [None, dict(flex_tma=False), dict(flex_one_loop=True, flex_tma=False), dict(flex_one_loop=True, flex_tma=True)] + [
    dict(flex_one_loop=True, flex_tma=t, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for t, m, n, w, s in (
        (True, 128, 128, 8, 3), (False, 128, 128, 8, 3), (True, 128, 64, 8, 3), (True, 128, 64, 4, 4),
        (True, 64, 64, 4, 3), (True, 128, 128, 8, 2))]
BWD_LOOP = [None, dict(flex_one_loop=True, flex_tma=True, flex_bwd_one_loop=True)] + [
    dict(flex_one_loop=True, flex_tma=True, flex_bwd_one_loop=True, BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2,
         BLOCK_N2=n2, num_warps=w, num_stages=s) for m1, n1, m2, n2, w, s in (
        (64, 64, 64, 64, 4, 3), (64, 128, 128, 64, 8, 2), (64, 128, 128, 64, 8, 3), (32, 128, 128, 32, 4, 3))]
# The band hooks against the lists, and the list loops' forms (``--set bands``): a score_mod over a
# band mask (alibi_causal, softcap_causal) or over no mask (alibi_no_mask) walks the band by
# arithmetic unless flex_bands is off; the other masks (document, prefix_lm) walk the lists.
FWD_BANDS = [None, dict(flex_bands=False), dict(flex_ragged_in_full=True), dict(flex_one_loop=True)]
BWD_BANDS = [None, dict(flex_bands=False)]
# The backward's program order (``--set order``): every head's dK / dV programs first (default), or
# each KV head's dK / dV programs, then its dQ programs (KernelOptions.head_major, Inductor's order);
# and the forward's hardware tanh against the exact one.
FWD_ORDER = [None, dict(flex_fast_tanh=False)]
BWD_ORDER = [None, dict(head_major=True)]
_OPTION_KEYS = ("flex_one_loop", "flex_tma", "flex_bwd_one_loop", "flex_bands", "flex_ragged_in_full", "head_major",
                "flex_fast_tanh")


def _split(ko):
    """(flex_attention's kernel_options or None, KernelOptions changes) of a candidate."""
    if ko is None:
        return None, {}
    changes = {key: val for key, val in ko.items() if key in _OPTION_KEYS}
    rest = {key: val for key, val in ko.items() if key not in _OPTION_KEYS}
    return (rest or None), changes
BWD = [None] + [dict(BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2, num_warps=w, num_stages=s)
                for m1, n1, m2, n2, w, s in (
    (64, 128, 128, 64, 8, 2), (64, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 2), (32, 128, 128, 32, 4, 2), (32, 64, 64, 32, 4, 2),
    (64, 128, 128, 64, 8, 1), (64, 64, 64, 64, 4, 1))]


def _label(ko) -> str:
    if ko == {}:
        return "attend FLASH (Gluon forward on sm_90)"
    if ko == {"fwd_ws": False}:
        return "attend FLASH on the core"
    return "default" if ko is None else " ".join(f"{k}={v}" for k, v in ko.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="causal,alibi_causal")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="fwd,bwd")
    ap.add_argument("--set", choices=("tiles", "loop", "bands", "order"), default="tiles",
                    help="the candidates: tiles of the kernels with a loop per kind of block, the single loop / TMA "
                         "ones, the band hooks against the lists (with the lists' loop forms), or the backward's "
                         "program order and the forward's tanh")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = PRESETS["full" if device == "cuda" else "tiny"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kinds = args.kinds.split(",")
    rows = []
    for case in args.cases.split(","):
        score_mod, mask_mod, caps = case_mods(case, p, device)
        bm = None if mask_mod is None else af.create_block_mask(mask_mod, None, None, p["S"], p["S"], device=device)
        q, k, v = make_inputs(p, device, dtype)
        dout = torch.randn_like(q)
        leaves = [q, k, v, *caps]

        def fwd(ko):
            ko, changes = _split(ko)
            with torch.no_grad(), kernel_options(**changes):
                af.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=ko)

        def bwd(ko):
            ko, changes = _split(ko)
            for t in leaves:
                t.grad = None
            with kernel_options(**changes):
                af.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=ko).backward(dout)

        def dense(opts):
            with torch.no_grad(), kernel_options(**opts):
                attend.scaled_dot_product_attention(q, k, v, is_causal=True)

        variants = [("dense causal", o, dense) for o in ({}, {"fwd_ws": False}) if case == "causal"]
        fwd_set, bwd_set = dict(tiles=(FWD, BWD), loop=(FWD_LOOP, BWD_LOOP), bands=(FWD_BANDS, BWD_BANDS),
                               order=(FWD_ORDER, BWD_ORDER))[args.set]
        variants += [("fwd", ko, fwd) for ko in fwd_set if "fwd" in kinds]
        variants += [("fwd+bwd", ko, bwd) for ko in bwd_set if "bwd" in kinds]
        live, times = [], {}
        for kind, ko, fn in variants:  # compile each outside the timing; a failure is a result
            try:
                fn(ko)
                sync(device)
                live.append((kind, ko, fn))
                times[(kind, _label(ko))] = []
            except Exception as e:  # noqa: BLE001 - out of resources is a row, not a crash
                rows.append(dict(case=case, kind=kind, variant=_label(ko), error=f"{type(e).__name__}: {str(e)[:200]}"))
        for _ in range(args.rounds):
            for kind, ko, fn in live:
                times[(kind, _label(ko))].append(median_ms(lambda: fn(ko), device, p["reps"]))
        for (kind, label), ts in times.items():
            rows.append(dict(case=case, kind=kind, variant=label, median_ms=statistics.median(ts),
                             spread=(max(ts) - min(ts)) / statistics.median(ts)))
    print("| case | kind | kernel_options | ms (median) | spread |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['kind']} | {r['variant']} | {r['error']} | |")
        else:
            print(f"| {r['case']} | {r['kind']} | {r['variant']} | {r['median_ms']:.3f} | {100 * r['spread']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

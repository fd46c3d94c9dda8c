"""Sweep the Triton core's tuning configs on the GPU: every candidate config of each kernel,
timed directly on the shapes the benchmarks use (no autotuner), to choose configs.heuristic.

    python benchmarks/sweep.py --compile-only --case d128-causal   # warm Triton's disk cache
    python benchmarks/sweep.py --json out.json                     # time every case

Compiling dominates a cold sweep (about 2.5 s per config and feature set), so run one
``--compile-only`` process per case in parallel first; the timing pass then loads from the cache.
Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs); TFLOP/s uses
DESIGN.md §4's FLOP count (backward = 2.5x forward).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ["ATTEND_AUTOTUNE"] = "0"  # configs are forced below, never autotuned

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import attend  # noqa: E402
from attend._layout import Band, Packed  # noqa: E402
from attend.bench import time_ms, backward_ms  # noqa: E402
from attend.bench_masks import VARLEN_LENGTHS, WINDOW, WINDOW_S  # noqa: E402
from attend.varlen import varlen_attn  # noqa: E402
from attend.kernels import configs, launch  # noqa: E402
from attend.kernels import options  # noqa: E402
from attend.kernels.options import kernel_options  # noqa: E402

_c, _b = configs.fwd_config, configs.bwd_config
# Candidates beyond the shipped lists: more pipeline stages and flex's symmetric backward tiles.
EXTRA_FWD = [_c(128, 128, 8, 4), _c(128, 64, 8, 4), _c(128, 64, 4, 4), _c(64, 128, 4, 4)]
EXTRA_BWD = [_b(64, 128, 128, 64, 8, 4), _b(32, 128, 128, 32, 4, 3), _b(32, 128, 128, 32, 4, 4),
             _b(64, 128, 128, 32, 8, 3), _b(64, 64, 64, 64, 4, 4), _b(32, 64, 64, 32, 4, 3),
             _b(64, 128, 64, 64, 8, 4, dq_atomic=True), _b(64, 64, 64, 64, 4, 3, dq_atomic=True)]
# The backward's head-major program order (core.attn_bwd HEAD_MAJOR), for the configs that won somewhere.
HEAD_MAJOR_BWD = [_b(64, 128, 128, 64, 8, 3, head_major=True), _b(64, 64, 64, 64, 4, 2, head_major=True),
                  _b(32, 64, 64, 32, 4, 3, head_major=True), _b(32, 128, 128, 32, 4, 3, head_major=True),
                  _b(32, 128, 64, 64, 4, 3, head_major=True), _b(64, 64, 64, 64, 4, 3, head_major=True)]
EXTRA_BWD += HEAD_MAJOR_BWD
FWD = configs.FWD_CONFIGS + EXTRA_FWD
BWD = configs.BWD_CONFIGS + EXTRA_BWD
# --short: the backward configs that won somewhere in the full sweep (docs/kernels.md, "Tuning: dense tiles").
SHORT_BWD = [_b(64, 128, 128, 64, 8, 3), _b(64, 128, 128, 64, 8, 4), _b(64, 128, 64, 64, 8, 3, dq_atomic=True),
             _b(64, 64, 64, 64, 4, 2), _b(32, 64, 64, 32, 4, 3), _b(32, 128, 64, 64, 4, 3),
             _b(32, 128, 128, 32, 4, 3), _b(64, 64, 64, 64, 4, 3, dq_atomic=True)] + HEAD_MAJOR_BWD
# dQ by atomics: with TMA (the default on sm_90) the copy engine adds each dQ tile (a bulk reduce).
# All five atomic configs of BWD_CONFIGS lost every --short cell on the H100 (best 414 vs 450;
# docs/kernels.md, "Tuning: the backward's program order and row statistics"), so --short keeps
# only the two above; --atomic adds the other three back.
ATOMIC_BWD = [c for c in configs.BWD_CONFIGS if c.kwargs["DQ_ATOMIC"] and c not in SHORT_BWD]
# Base configs for the forward that feeds a backward sweep (and vice versa): fit every case.
BASE = {"fwd": _c(64, 64, 4, 3), "bwd": _b(64, 64, 64, 64, 4, 2)}


def case_base(case: str, fp32_dots: str = "ieee") -> dict:
    """BASE for ``case``; an fp32 case's ("d<D>-...-fp32") forward is the config its rule gives
    with ``fp32_dots`` (KernelOptions.fp32_dots): BASE's 64x64 at 3 stages does not fit sm_90's
    shared memory at head dim 256, nor with TF32x3's operand splits."""
    if not case.split("@")[0].endswith("-fp32"):
        return BASE
    from attend.kernels.configs import heuristic

    D = int(case.split("-")[0][1:])
    return dict(BASE, fwd=heuristic("fwd", D, flags=dict(DOT_PRECISION=fp32_dots), elem=4))


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype, device="cuda")


def _leaves(*ts):
    """Leaves that require grad, sharing the tensors' storage, for timing through the public API
    (--api): no copy, so cases that never use them cost nothing."""
    return [t.detach().requires_grad_() for t in ts]


def _dense(D, causal, S, mask=None, mask_grad=False, B=None, H=None, gqa=1, views=False, dtype=torch.bfloat16):
    """``views``: (B, H, S, D) views of (B, S, H, D) tensors, the layout models pass; "q": only q
    (and dout) so, K / V contiguous as a KV cache holds them. fp32 runs on attend's EFFICIENT
    backend (FLASH takes 16-bit inputs), its dots as ``allow_tf32`` says."""
    H = H or 2048 // D
    B = B or max(1, 16384 // S)
    rows = lambda B, H, S, D: _randn(B, S, H, D, dtype=dtype).transpose(1, 2)  # noqa: E731
    make = rows if views else functools.partial(_randn, dtype=dtype)
    make_kv = _randn if views == "q" else make
    q, k, v = make(B, H, S, D), make_kv(B, H // gqa, S, D), make_kv(B, H // gqa, S, D)
    dout = make(B, H, S, D)
    scale = D ** -0.5
    band = Band.causal() if causal else Band()
    flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)

    def fwd():
        return launch.forward(q, k, v, mask, 0.0, band, scale, 0)

    def bwd(saved):
        out, lse = saved
        return launch.backward(dout, q, k, v, out, lse, mask, 0.0, band, scale, 0, mask_grad)

    # The same call through the public API, timed as `python -m attend bench` times it.
    qa, ka, va = _leaves(q, k, v)
    ma = None if mask is None else (_leaves(mask)[0] if mask_grad else mask)
    flash = mask is None and dtype != torch.float32
    backend = attend.SDPBackend.FLASH_ATTENTION if flash else attend.SDPBackend.EFFICIENT_ATTENTION

    def api():
        with attend.sdpa_kernel(backend):
            return attend.scaled_dot_product_attention(qa, ka, va, attn_mask=ma, is_causal=causal, enable_gqa=gqa > 1)
    return fwd, bwd, flops, (api, [qa, ka, va] + ([ma] if mask_grad else []), dout)


def _packed(lens, band, D=128, H=16):
    T = sum(lens)
    q, k, v = (_randn(T, H, D) for _ in range(3))
    dout = _randn(T, H, D)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lens, device="cuda").cumsum(0)
    packed = Packed(cu, cu)
    top = max(lens)
    if band.left >= 0:
        flops = 4.0 * H * D * sum(sum(min(i, band.left) + 1 for i in range(n)) for n in lens)
    else:
        flops = sum(4.0 * H * n * n * D * 0.5 for n in lens)

    def fwd():
        return launch.varlen_forward(q, k, v, packed, top, top, D ** -0.5, band)

    def bwd(saved):
        out, lse = saved
        return launch.varlen_backward(dout, q, k, v, out, lse, packed, top, top, D ** -0.5, band)

    qa, ka, va = _leaves(q, k, v)
    window = (band.left if band.left >= 0 else -1, 0)

    def api():
        return varlen_attn(qa, ka, va, cu, cu, top, top, window_size=window)
    return fwd, bwd, flops, (api, [qa, ka, va], dout)


def _padding_mask(B=4, S=4096):
    pad = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
    for b in range(B):
        pad[b, ..., S - b * S // 8:] = False  # as attend.bench_masks
    return pad


def cases(name: str):
    """(case, S, fwd, bwd, flops) for ``name`` ('all' or one case)."""
    seqs = (1024, 4096, 16384)
    table = {}
    for D in (64, 128):
        for causal in (False, True):
            key = f"d{D}-{'causal' if causal else 'noncausal'}"
            # (2048: the backward's last bucket below configs.WS_BWD_MIN_SEQ_BUCKET, ab.py's fused-dQ case)
            lengths = (1024, 2048, 4096, 16384) if (D, causal) == (128, True) else seqs
            table[key] = [(S, lambda D=D, c=causal, S=S: _dense(D, c, S)) for S in lengths]
        table[f"d{D}-causal-gqa8"] = [(4096, lambda D=D: _dense(D, True, 4096, gqa=8))]
        table[f"d{D}-noncausal-gqa8"] = [(4096, lambda D=D: _dense(D, False, 4096, gqa=8))]
        for causal in (False, True):
            key = f"d{D}-{'causal' if causal else 'noncausal'}-views"
            table[key] = [(S, lambda D=D, c=causal, S=S: _dense(D, c, S, views=True)) for S in seqs]
            table[key.replace("-views", "-qviews")] = [(S, lambda D=D, c=causal, S=S: _dense(D, c, S, views="q"))
                                                       for S in seqs]
    for causal in (False, True):  # fp32 with IEEE dots (allow_tf32 off): configs' "fp32_ieee" rules
        for D, seqs_fp32 in ((64, (4096,)), (128, (1024, 4096)), (256, (4096,))):
            table[f"d{D}-{'causal' if causal else 'noncausal'}-fp32"] = [
                (S, lambda D=D, c=causal, S=S: _dense(D, c, S, dtype=torch.float32)) for S in seqs_fp32]
    table["bias-grad"] = [(4096, lambda: _dense(128, False, 4096, mask=_randn(4, 16, 4096, 4096), mask_grad=True,
                                                B=4, H=16))]
    table["padding"] = [(4096, lambda: _dense(128, False, 4096, mask=_padding_mask(), B=4, H=16))]
    table["varlen-causal"] = [(max(VARLEN_LENGTHS), lambda: _packed(VARLEN_LENGTHS, Band(-1, 0, True)))]
    table["varlen-window"] = [(WINDOW_S, lambda: _packed([WINDOW_S], Band(WINDOW, 0, True)))]
    # the window benchmark's baseline: the same single sequence, full causal
    table["varlen-full"] = [(WINDOW_S, lambda: _packed([WINDOW_S], Band(-1, 0, True)))]
    names = list(table) if name == "all" else [name]
    for n in names:
        for S, make in table[n]:
            yield n, S, make


def force_configs(kind_cfg: dict) -> dict:
    """Kernel options (``kernel_options``) under which every launch takes ``kind_cfg[kind]`` as its
    fixed config."""
    return dict(fwd_config=kind_cfg["fwd"], bwd_config=kind_cfg["bwd"])


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def api_ms(kind: str, api) -> float:
    """Time through the public API: the forward without grad, the backward as (forward with graph +
    backward) - forward with graph, exactly as attend.bench does."""
    run, inputs, dout = api
    if kind == "fwd":
        with torch.no_grad():
            return time_ms(run)
    return backward_ms(run, inputs, dout)


def sweep(name: str, compile_only: bool, out: dict, json_path: str | None, kinds=("fwd", "bwd"), short=False,
          tma=(None,), even_both=False, api_mode=False, atomic=False, fwd_tma=(None,)) -> None:
    """``tma``: KernelOptions.tma values to time each backward config with (None: the default);
    ``fwd_tma``: KernelOptions.fwd_tma values to time each forward config with (None: as the config asks);
    ``even_both``: also time each forward config with its EVEN path turned off (a config can opt out);
    ``api_mode``: time through the public API (autograd, dispatch) instead of the launchers: the
    bench's own measure, which has ranked some backward tiles differently (docs/kernels.md, "Tuning: timing spread");
    ``atomic``: with ``short``, also the dQ-by-atomics configs that --short leaves out."""
    for case, S, make in cases(name):
        fwd, bwd, flops, api = make()
        row = out.setdefault(case, {}).setdefault(str(S), {"fwd": {}, "bwd": {}})
        base = case_base(case)
        with kernel_options(**force_configs(base)):
            saved = fwd()
        fwd_cfgs = [c for c in FWD if c.kwargs["BLOCK_M"] != 16]  # no decode tiles
        if even_both:
            fwd_cfgs += [triton.Config(dict(c.kwargs, EVEN=False), num_warps=c.num_warps, num_stages=c.num_stages)
                         for c in fwd_cfgs]
        jobs = [("fwd", c, t) for c in fwd_cfgs for t in fwd_tma if "fwd" in kinds]
        bwd_cfgs = (SHORT_BWD + (ATOMIC_BWD if atomic else [])) if short else BWD
        if options.current().dq_from_ds and case == "bias-grad":  # no dQ programs: head-major forced off, a duplicate
            bwd_cfgs = [c for c in bwd_cfgs if not c.kwargs.get("HEAD_MAJOR")]
        jobs += [("bwd", c, t) for c in bwd_cfgs for t in tma if "bwd" in kinds]
        for kind, cfg, use_tma in jobs:
            forced = dict(force_configs(dict(base, **{kind: cfg})), **{"fwd_tma" if kind == "fwd" else "tma": use_tma})
            label = str(cfg) + ("" if use_tma is None else f", {'fwd_tma' if kind == 'fwd' else 'tma'}: {use_tma}")
            run = fwd if kind == "fwd" else (lambda: bwd(saved))
            t0 = time.time()
            with kernel_options(**forced):
                try:
                    if api_mode:  # compile through the public path
                        res = api[0]()
                        if kind == "bwd":
                            res.backward(api[2])
                    else:
                        run()
                    torch.cuda.synchronize()
                    if compile_only:
                        continue
                    ms = api_ms(kind, api) if api_mode else _ms(run)
                    row[kind][label] = dict(ms=ms, tflops=(flops if kind == "fwd" else 2.5 * flops) / ms * 1e-9)
                except Exception as e:  # out of resources, etc.: recorded, not fatal
                    row[kind][label] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
            print(f"{case} S={S} {kind} {label}: {row[kind].get(label)} ({time.time() - t0:.1f}s)", flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(out, f, indent=1)


def best(out: dict) -> str:
    lines = []
    for case, by_s in out.items():
        for S, kinds in by_s.items():
            for kind, res in kinds.items():
                ok = {c: r for c, r in res.items() if "tflops" in r}
                if ok:
                    top = sorted(ok.items(), key=lambda cr: -cr[1]["tflops"])[:3]
                    lines.append(f"{case} S={S} {kind}: " + " | ".join(f"{r['tflops']:.0f} {c}" for c, r in top))
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="all")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--kinds", default="fwd,bwd")
    ap.add_argument("--short", action="store_true", help="only the backward configs in SHORT_BWD")
    ap.add_argument("--tma", default="default", choices=["default", "both", "on", "off"],
                    help="both: time each backward config with and without TMA descriptors; on/off: force one")
    ap.add_argument("--dq-from-ds", choices=["on", "off"],
                    help="force KernelOptions.dq_from_ds (default: the library's, on): a full-size mask gradient's dQ "
                         "by a GEMM on dS (case bias-grad)")
    ap.add_argument("--even", default="default", choices=["default", "both"],
                    help="both: time each forward config with and without its EVEN path")
    ap.add_argument("--worklist", action="store_true",
                    help="KernelOptions.varlen_worklist on: packed calls launch from host-built block lists, heaviest first")
    ap.add_argument("--fwd-tma", default="default", choices=["default", "both", "on"],
                    help="both: time each forward config with and without TMA loads (KernelOptions.fwd_tma); on: with")
    ap.add_argument("--atomic", action="store_true",
                    help="with --short: also every other dQ-by-atomics config of BWD_CONFIGS")
    ap.add_argument("--api", action="store_true",
                    help="time through the public API (autograd + dispatch), as python -m attend bench does")
    args = ap.parse_args()
    chosen = dict(varlen_worklist=args.worklist)
    if args.dq_from_ds:
        chosen["dq_from_ds"] = args.dq_from_ds == "on"
    results: dict = {}
    with kernel_options(**chosen):
            sweep(args.case, args.compile_only, results, args.json, kinds=tuple(args.kinds.split(",")), short=args.short,
              tma={"both": (True, False), "on": (True,), "off": (False,)}.get(args.tma, (None,)),
              even_both=args.even == "both", api_mode=args.api, atomic=args.atomic,
              fwd_tma={"both": (True, False), "on": (True,)}.get(args.fwd_tma, (None,)))
    if not args.compile_only:
        print(best(results))
    sys.stdout.flush()

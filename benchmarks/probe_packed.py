"""Where does the packed (varlen) path lose to the dense kernel? Three parts, each a table of
TFLOP/s from kernels launched through ``attend.kernels.launch`` at fixed configs:

- ``layout``: one causal 16k sequence (B=1, H=16, D=128) read by the dense kernel three ways and
  as a packed call, then the mixed-length benchmark, and a kernel breakdown of the varlen API
  call (torch.profiler). Variants: ``dense`` (B, H, S, D) contiguous, EVEN on; ``dense-uneven``
  the same with the EVEN path off; ``dense-bshd`` (B, S, H, D) storage viewed as (B, H, S, D),
  the packed layout's strides; ``packed-1`` the same sequence through varlen; ``packed-mixed``
  the varlen benchmark's lengths.
- ``window``: sliding windows of 1k-8k keys and full causal on one 16k sequence, all with one
  backward config, timing the whole backward and its dK/dV programs alone (the dQ programs are
  the difference): which half loses when the window's efficiency falls behind full causal's.
- ``mix``: the varlen benchmark's 11 sequences packed (as given, shuffled, and as 16 equal
  sequences of 1024), against the sum of one dense launch per sequence: the cost of packing
  mixed lengths into one launch.

    PYTHONPATH=src python benchmarks/probe_packed.py [--parts layout,window,mix] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["ATTEND_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton.testing  # noqa: E402

from attend._layout import Band, Packed  # noqa: E402
from attend.bench_masks import VARLEN_LENGTHS  # noqa: E402
from attend.kernels import configs, launch, options  # noqa: E402
from attend.kernels.options import kernel_options  # noqa: E402
from attend.varlen import varlen_attn  # noqa: E402

_c, _b = configs.fwd_config, configs.bwd_config
# The shipped configs of a sliding window over packed sequences (configs.RULES "window").
_WINDOW_FLAGS = {"CAUSAL": True, "WINDOW": True, "VARLEN": True}
WINDOW_CFG = {kind: configs.heuristic(kind, 128, flags=_WINDOW_FLAGS) for kind in ("fwd", "bwd")}
FWD = [_c(128, 64, 8, 3), _c(64, 64, 4, 3)]
BWD = [_b(64, 128, 128, 64, 8, 3, head_major=True), _b(64, 64, 64, 64, 4, 2),
       _b(64, 64, 64, 64, 4, 2, head_major=True)]
H, D, S = 16, 128, 16384


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _dense(layout: str):
    if layout == "bshd":
        q, k, v, do = (torch.randn(1, S, H, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(4))
    else:
        q, k, v, do = (torch.randn(1, H, S, D, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    scale = D ** -0.5

    def fwd():
        return launch.forward(q, k, v, None, 0.0, Band.causal(), scale, 0)

    def bwd(saved):
        return launch.backward(do, q, k, v, *saved, None, 0.0, Band.causal(), scale, 0, False)
    return fwd, bwd, 4.0 * H * S * S * D * 0.5


def _packed(lens):
    T = sum(lens)
    q, k, v, do = (torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lens, device="cuda").cumsum(0)
    packed, top, band = Packed(cu, cu), max(lens), Band(-1, 0, True)

    def fwd():
        return launch.varlen_forward(q, k, v, packed, top, top, D ** -0.5, band)

    def bwd(saved):
        return launch.varlen_backward(do, q, k, v, *saved, packed, top, top, D ** -0.5, band)
    return fwd, bwd, sum(4.0 * H * n * n * D * 0.5 for n in lens)


def main(json_path=None, parts=("layout", "window", "mix")):
    out = {}
    if "window" in parts:
        out["window"] = window_part()
    if "overhead" in parts:
        out["overhead"] = overhead_part()
    if "mix" in parts:
        out["mix"] = mix_part()
    if "layout" in parts:
        out.update(layout_part())
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)


def _bwd_split(do, q, k, v, saved, packed, top, band, dq_programs):
    """The packed backward through launch._backward, with or without its dQ programs."""
    T = q.shape[0]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    p4 = launch.packed4
    return launch._backward(p4(do), p4(q), p4(k), p4(v), p4(saved[0]), saved[1], None, (0, T), p4(dk), p4(dv),
                            packed.cu_q.numel() - 1, top, top, None, q, (0, 0, 0, 0), False, False, 0.0, band,
                            D ** -0.5, 0, packed, options.current(), dq_programs=dq_programs)


def _visited_blocks(T: int, window: int, bm: int, bn: int) -> int:
    """(query block, key block) pairs the forward visits on one causal sequence of T, per head,
    with a left window of ``window`` keys (-1: full causal)."""
    return sum((min(m + bm, T) - 1) // bn + 1 - (max(m - window, 0) // bn if window >= 0 else 0)
               for m in range(0, T, bm))


def _fit(xs: list, ys_ms: list, programs: int) -> dict:
    """Least squares ms = intercept + slope * blocks: the per-block cost (us of one SM) and the
    intercept, also per program (us of one SM)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    mx, my = sum(xs) / len(xs), sum(ys_ms) / len(ys_ms)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys_ms)) / sum((x - mx) ** 2 for x in xs)
    return dict(us_per_block_per_sm=slope * 1e3 * sms, intercept_ms=my - slope * mx,
                us_per_program=(my - slope * mx) * 1e3 * sms / programs, programs=programs)


def window_part():
    """Window widths against full causal, one 16k sequence, the shipped window configs for all
    (one launch config per kernel across widths, so the time's slope over the visited blocks is
    the per-block cost and its intercept the per-program cost: ``fit`` in the output)."""
    cfg = WINDOW_CFG
    # the dK/dV-only launch has no head-major numbering
    with kernel_options(fwd_config=cfg["fwd"], bwd_config=cfg["bwd"], head_major=False):
        return _window_rows(cfg)


def _window_rows(cfg: dict) -> dict:
    T = S
    q, k, v, do = (torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    packed, rows = Packed(cu, cu), {}
    for w in (256, 1024, 2048, 4096, 8192, -1):
        band = Band(w, 0, True)
        flops = 4.0 * H * D * (sum(min(i, w) + 1 for i in range(T)) if w >= 0 else T * T * 0.5)
        saved = launch.varlen_forward(q, k, v, packed, T, T, D ** -0.5, band)
        fwd_ms = _ms(lambda: launch.varlen_forward(q, k, v, packed, T, T, D ** -0.5, band))
        bwd_ms = _ms(lambda: _bwd_split(do, q, k, v, saved, packed, T, band, True))
        kv_ms = _ms(lambda: _bwd_split(do, q, k, v, saved, packed, T, band, False))
        # dK/dV programs do 4 of the backward's 7 products, the dQ programs 3
        row = dict(fwd=flops / fwd_ms * 1e-9, bwd=2.5 * flops / bwd_ms * 1e-9,
                   dkdv=2.5 * flops * 4 / 7 / kv_ms * 1e-9, dq=2.5 * flops * 3 / 7 / max(bwd_ms - kv_ms, 1e-6) * 1e-9,
                   fwd_ms=fwd_ms, bwd_ms=bwd_ms, dkdv_ms=kv_ms)
        row["fwd_blocks"] = H * _visited_blocks(T, w, cfg["fwd"].kwargs["BLOCK_M"], cfg["fwd"].kwargs["BLOCK_N"])
        rows["full" if w < 0 else f"window {w}"] = row
        print(f"{'full causal' if w < 0 else f'window {w}':12s} " + "  ".join(
            f"{key} {val:7.1f}" if not key.endswith("ms") else f"{key} {val:.3f}" for key, val in row.items()), flush=True)
    rows["fit"] = _fit([r["fwd_blocks"] for r in rows.values()], [r["fwd_ms"] for r in rows.values()],
                       H * -(-T // cfg["fwd"].kwargs["BLOCK_M"]))
    print("forward fit: time = intercept + slope * blocks:", rows["fit"], flush=True)
    return rows


def overhead_part():
    """The forward's per-program cost: windows of 0 to 4096 keys and full causal on one 16k
    sequence at the shipped window tile, with K and V read through TMA descriptors (made on the
    device per program) and through pointers; the fit's intercept over the visited blocks is
    the time every program pays besides its blocks."""
    cfg = WINDOW_CFG["fwd"]
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    T = S
    q, k, v = (torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    packed, out = Packed(cu, cu), {}
    for tma in (True, False):
        xs, ys = [], []
        for w in (0, 256, 1024, 4096, -1):
            band = Band(w, 0, True)
            blocks = H * _visited_blocks(T, w, bm, bn)
            with kernel_options(fwd_config=cfg, fwd_tma=tma):
                ms = _ms(lambda: launch.varlen_forward(q, k, v, packed, T, T, D ** -0.5, band))
            xs.append(blocks)
            ys.append(ms)
            out[f"tma={tma} window={w}"] = dict(ms=ms, blocks=blocks)
            print(f"tma={tma} window={w:5d} blocks {blocks:7d} {ms:.3f} ms", flush=True)
        fit = _fit(xs, ys, H * -(-T // bm))
        out[f"fit tma={tma}"] = fit
        print(f"tma={tma} fit", fit, flush=True)
    return out


def mix_part():
    """Packed mixed lengths against one dense launch per sequence, shipped configs."""
    import random

    rows = {}
    orders = {"packed as given": list(VARLEN_LENGTHS), "packed shuffled": random.Random(0).sample(VARLEN_LENGTHS, 11),
              "packed 16 x 1024": [1024] * 16}
    for name, lens in orders.items():
        fwd, bwd, flops = _packed(lens)
        saved = fwd()
        rows[name] = dict(fwd=flops / _ms(fwd) * 1e-9, bwd=2.5 * flops / _ms(lambda: bwd(saved)) * 1e-9)
    fwd_ms = bwd_ms = flops = 0.0
    for n in VARLEN_LENGTHS:  # one dense (1, H, n, D) causal launch per sequence
        q, k, v, do = (torch.randn(1, H, n, D, dtype=torch.bfloat16, device="cuda") for _ in range(4))
        saved = launch.forward(q, k, v, None, 0.0, Band.causal(), D ** -0.5, 0)
        fwd_ms += _ms(lambda: launch.forward(q, k, v, None, 0.0, Band.causal(), D ** -0.5, 0))
        bwd_ms += _ms(lambda: launch.backward(do, q, k, v, *saved, None, 0.0, Band.causal(), D ** -0.5, 0, False))
        flops += 4.0 * H * n * n * D * 0.5
    rows["one dense launch per sequence (sum)"] = dict(fwd=flops / fwd_ms * 1e-9, bwd=2.5 * flops / bwd_ms * 1e-9)
    for name, row in rows.items():
        print(f"{name:36s} fwd {row['fwd']:6.1f}  bwd {row['bwd']:6.1f}", flush=True)
    return rows


def layout_part():
    out = {}
    real_even = launch._even
    variants = [("dense", lambda: _dense("bhsd"), False), ("dense-uneven", lambda: _dense("bhsd"), True),
                ("dense-bshd", lambda: _dense("bshd"), False), ("packed-1", lambda: _packed([S]), False),
                ("packed-mixed", lambda: _packed(VARLEN_LENGTHS), False)]
    for name, make, uneven in variants:
        launch._even = (lambda *a: False) if uneven else real_even
        fwd, bwd, flops = make()
        row = out[name] = {}
        for f in FWD:
            with kernel_options(fwd_config=f, bwd_config=BWD[0]):
                ms = _ms(fwd)
            row[f"fwd {f}"] = round(flops / ms * 1e-9, 1)
        with kernel_options(fwd_config=FWD[0], bwd_config=BWD[0]):
            saved = fwd()
        for c in BWD:
            with kernel_options(fwd_config=FWD[0], bwd_config=c):
                ms = _ms(lambda: bwd(saved))
            row[f"bwd {c}"] = round(2.5 * flops / ms * 1e-9, 1)
        for key, val in row.items():
            print(f"{name:13s} {val:6.1f}  {key}", flush=True)
    launch._even = real_even

    # kernel breakdown of the varlen benchmark through the API (default configs)
    T = sum(VARLEN_LENGTHS)
    q, k, v = (torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    cu = torch.zeros(len(VARLEN_LENGTHS) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(VARLEN_LENGTHS, device="cuda").cumsum(0)
    top = max(VARLEN_LENGTHS)
    do = torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        varlen_attn(q, k, v, cu, cu, top, top, window_size=(-1, 0)).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            varlen_attn(q, k, v, cu, cu, top, top, window_size=(-1, 0)).backward(do)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(table)
    out["profile"] = table
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--parts", default="layout,window,mix")
    args = ap.parse_args()
    main(args.json, tuple(args.parts.split(",")))

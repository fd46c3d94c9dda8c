"""Where does the packed (varlen) path lose to the dense kernel? Times one causal 16k sequence
(B=1, H=16, D=128) as the dense kernel reads it in three ways and as a packed call, at the same
fixed configs, then the mixed-length benchmark, and prints a kernel-time breakdown of the
varlen API call (torch.profiler).

    PYTHONPATH=src python benchmarks/probe_packed.py [--json out.json]

Variants: ``dense`` (B, H, S, D) contiguous, EVEN on; ``dense-uneven`` the same with the EVEN
path off; ``dense-bshd`` (B, S, H, D) storage viewed as (B, H, S, D), the packed layout's
strides; ``packed-1`` the same sequence through varlen; ``packed-mixed`` the varlen benchmark's
lengths.
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
from attend.kernels import configs, launch  # noqa: E402
from attend.varlen import varlen_attn  # noqa: E402

_c, _b = configs._c, configs._b
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
        return launch.forward(q, k, v, None, 0.0, 1, scale, 0)

    def bwd(saved):
        return launch.backward(do, q, k, v, *saved, None, 0.0, 1, scale, 0, False)
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


def main(json_path=None):
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
            launch.heuristic = lambda kind, *a, f=f, **k: f if kind == "fwd" else BWD[0]
            ms = _ms(fwd)
            row[f"fwd {f}"] = round(flops / ms * 1e-9, 1)
        launch.heuristic = lambda kind, *a, **k: FWD[0] if kind == "fwd" else BWD[0]
        saved = fwd()
        for c in BWD:
            launch.heuristic = lambda kind, *a, c=c, **k: FWD[0] if kind == "fwd" else c
            ms = _ms(lambda: bwd(saved))
            row[f"bwd {c}"] = round(2.5 * flops / ms * 1e-9, 1)
        for key, val in row.items():
            print(f"{name:13s} {val:6.1f}  {key}", flush=True)
    launch._even = real_even
    launch.heuristic = configs.heuristic

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
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    main(ap.parse_args().json)

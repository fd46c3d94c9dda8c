"""Each kernel's GPU time in a flex forward + backward (torch.profiler): which of the forward, the
dK / dV kernel and the dQ programs holds a case's difference from attend's own ``is_causal``, and
attend's kernels against compiled flex's on the same case. The flex bench's cases and sizes
(``attend.bench_flex``: B=2, H=16, S=8192, D=128, bf16); ms per forward + backward, each kernel's
total over 5 iterations divided by 5 (the gradient accumulation of the leaves included, as an
elementwise add).

    PYTHONPATH=src python benchmarks/flex_kernels.py [--cases softcap_causal,document] [--compiled document]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import attend
from attend import bench_flex


def kernel_ms(fn, q, k, v, iters: int = 5) -> dict[str, float]:
    """{kernel name: ms per iteration} of ``fn(q, k, v)`` forward and backward, largest first."""
    dout = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v).backward(dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(q, k, v).backward(dout)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            out[e.key[:70]] = t / iters / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="causal,alibi_causal,softcap_causal,document")
    ap.add_argument("--compiled", default="document", help="cases also run through compiled flex")
    args = ap.parse_args()
    p = dict(bench_flex.PRESETS["full"])
    sizes = " ".join(f"{n}={p[n]}" for n in ("B", "H", "S", "D"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {sizes} bf16")
    runs = [("attend", c) for c in args.cases.split(",") if c] + [
        ("flex-compiled", c) for c in args.compiled.split(",") if c]
    for impl, case in runs:
        flex, cbm = bench_flex._impl(impl)
        score, mask, _ = bench_flex.case_mods(case, p, "cuda")
        bm = cbm(mask, None, None, p["S"], p["S"], device="cuda") if mask is not None else None
        q, k, v = bench_flex.make_inputs(p, "cuda", torch.bfloat16)
        table = kernel_ms(lambda q, k, v: flex(q, k, v, score_mod=score, block_mask=bm), q, k, v)
        print(f"{impl} {case}: " + ", ".join(f"{n} {ms:.3f}" for n, ms in table.items()), flush=True)
    q, k, v = bench_flex.make_inputs(p, "cuda", torch.bfloat16)
    with attend.sdpa_kernel([attend.SDPBackend.FLASH_ATTENTION]):
        table = kernel_ms(lambda q, k, v: attend.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    print("attend is_causal FLASH: " + ", ".join(f"{n} {ms:.3f}" for n, ms in table.items()), flush=True)


if __name__ == "__main__":
    main()

"""Where a benchmark row's time goes: each implementation's forward+backward under
``torch.profiler``, as a table of the GPU kernels it launched (count and mean time per
iteration) next to the iteration's wall time. A row that the bench times slower than its
kernels add up to is bounded by host time or by work outside the attention kernels.

``--flex`` does the same for cases of the flex bench (``attend.bench_flex``: B=2, H=16, S=8192,
D=128): which of the forward, the dK / dV kernel and the dQ programs holds a case's difference
from the dense row ``128:8192:causal`` (the same sizes), and attend's kernels against compiled
flex's.

    PYTHONPATH=src python benchmarks/profile_rows.py --rows 128:1024:causal,64:1024:causal
    PYTHONPATH=src python benchmarks/profile_rows.py --rows 128:8192:causal --impls attend \
        --flex softcap_causal,document
"""

from __future__ import annotations

import argparse
import collections

import torch
import triton.testing

from attend import bench
from attend._child import row_toolchain


def _row(spec: str) -> bench.Row:
    """``D:S[:causal][:gqaN]`` with the bench's shapes (hidden 2048, 16384 tokens)."""
    parts = spec.split(":")
    D, S = int(parts[0]), int(parts[1])
    causal = "causal" in parts[2:]
    gqa = next((int(p[3:]) for p in parts[2:] if p.startswith("gqa")), 1)
    return bench.Row("prefill", D, S, causal, gqa, max(1, 16384 // S), 2048 // D, S)


def profile(impl: str, row: bench.Row, iters: int = 20) -> tuple[dict, float, float]:
    """({kernel: (calls per iteration, us per call)}, wall ms per fwd+bwd, bench's bwd ms)."""
    fn = bench.IMPLS[impl]
    hkv = row.H // row.gqa
    q, k, v = (torch.randn(row.B, h, row.S, row.D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for h in (row.H, hkv, hkv))
    dout = torch.randn(row.B, row.H, row.L, row.D, dtype=torch.bfloat16, device="cuda")

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, row.causal, row.gqa).backward(dout)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall_ms = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
    bwd_ms = bench.backward_ms(lambda: fn(q, k, v, row.causal, row.gqa), [q, k, v], dout)
    return kernel_table(step, iters), wall_ms, bwd_ms


def kernel_table(step, iters: int = 20) -> dict:
    """{kernel: (calls per iteration, us per call)} of ``iters`` runs of ``step`` (warmed up)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels: dict = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:70]][0] += 1
            kernels[ev.name[:70]][1] += ev.device_time
    return {n: (c / iters, t / c) for n, (c, t) in kernels.items()}


def profile_flex(impl: str, case: str, iters: int = 20) -> tuple[dict, float]:
    """(kernel table, wall ms per fwd+bwd) of the flex bench's ``case`` through ``impl``."""
    from attend import bench_flex

    p = dict(bench_flex.PRESETS["full"])
    flex, cbm = bench_flex._impl(impl)
    score, mask, _ = bench_flex.case_mods(case, p, "cuda")
    bm = cbm(mask, None, None, p["S"], p["S"], device="cuda") if mask is not None else None
    q, k, v = bench_flex.make_inputs(p, "cuda", torch.bfloat16)
    dout = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        flex(q, k, v, score_mod=score, block_mask=bm).backward(dout)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    return kernel_table(step, iters), triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")


def _print_kernels(kernels: dict) -> None:
    for name, (calls, us) in sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        print(f"  {calls:5.1f} x {us:8.1f} us  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="128:1024:causal,64:1024:causal,128:1024")
    ap.add_argument("--impls", default="attend,flex-compiled")
    ap.add_argument("--flex", default="", help="flex bench cases, each through attend and compiled flex")
    args = ap.parse_args()
    for spec in filter(None, args.rows.split(",")):
        row = _row(spec)
        flops = 4.0 * row.B * row.H * row.L * row.S * row.D * (0.5 if row.causal else 1.0)
        for impl in args.impls.split(","):
            with row_toolchain(impl):  # attend's kernels built by the ptxas it started with (attend/_child.py)
                kernels, wall_ms, bwd_ms = profile(impl, row)
            busy = sum(c * t for c, t in kernels.values()) / 1e3
            print(f"\n## {spec} {impl}: fwd+bwd wall {wall_ms:.3f} ms ({3.5 * flops / wall_ms / 1e9:.0f} TFLOP/s), "
                  f"kernels {busy:.3f} ms, bench bwd {bwd_ms:.3f} ms ({2.5 * flops / bwd_ms / 1e9:.0f} TFLOP/s)")
            _print_kernels(kernels)
    for case in filter(None, args.flex.split(",")):
        for impl in ("attend", "flex-compiled"):
            with row_toolchain(impl):
                kernels, wall_ms = profile_flex(impl, case)
            busy = sum(c * t for c, t in kernels.values()) / 1e3
            print(f"\n## flex {case} {impl}: fwd+bwd wall {wall_ms:.3f} ms, kernels {busy:.3f} ms")
            _print_kernels(kernels)


if __name__ == "__main__":
    main()

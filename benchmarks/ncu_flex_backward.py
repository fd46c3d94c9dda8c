"""One flex backward of a bench case under Nsight Compute: attend's kernels beside compiled
FlexAttention's (Inductor's), each inside ``cudaProfilerStart`` / ``Stop``, so that ncu collects
only those kernels (the warmup, the compiles and the forward stay outside).

    ncu --clock-control none --profile-from-start off \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        -o doc_bwd python benchmarks/ncu_flex_backward.py --case document

The shapes are the flex suite's (``python -m attend bench --suite flex``: B=2, H=16, S=8192,
D=128, bf16); ``--case`` is any of its cases (``attend.bench_flex.CASES``). Without ncu it prints
each backward's time (median of ``--reps``) as a check that both ran.
"""

from __future__ import annotations

import argparse
import time

import torch

from attend import bench_flex
from attend._child import row_toolchain


def backward_once(impl: str, case: str, p: dict, dtype) -> float:
    """Warm ``impl``'s forward and backward of ``case`` up, then run one more backward inside the
    profiler's range; its milliseconds."""
    flex, create_block_mask = bench_flex._impl(impl)
    score_mod, mask_mod, caps = bench_flex.case_mods(case, p, "cuda")
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, p["B"], None, p["S"], p["S"],
                                                                   device="cuda")
    q, k, v = bench_flex.make_inputs(p, "cuda", dtype)
    dout = torch.randn_like(q)

    def forward():
        for t in (q, k, v, *caps):
            t.grad = None
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

    for _ in range(3):  # compiles, warmups, the allocator's pools
        forward().backward(dout)
    out = forward()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    t = time.perf_counter()
    out.backward(dout)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    torch.cuda.cudart().cudaProfilerStop()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="document", choices=bench_flex.CASES)
    ap.add_argument("--impls", default=",".join(bench_flex.IMPLS), help="comma-separated: attend, flex-compiled")
    args = ap.parse_args()
    p = dict(bench_flex.PRESETS["full"])
    for impl in args.impls.split(","):
        with row_toolchain(impl):
            ms = backward_once(impl, args.case, p, torch.bfloat16)
        print(f"{impl}: {args.case} backward {ms:.3f} ms (one call, host-timed, under the profiler's range)",
              flush=True)


if __name__ == "__main__":
    main()

"""The first call of a never-seen score_mod, forward + backward, with the backward's warmup on and
off (``KernelOptions.flex_bwd_precompile``) and with the backward split in two kernels warmed up
side by side (``flex_bwd_split``), interleaved: the issue's "first call of a new mod"
(target: a third of compiled flex's 3.2-4.8 s). Each call's mod has a structure of its own (a
constant would not do: constants are runtime data of the traced graph), and Triton compiles from an
empty on-disk cache, so every call compiles its forward and backward kernels.

    PYTHONPATH=src python benchmarks/flex_first_call.py [--rounds 3] [--S 8192] [--D 128] [--json out.json]
        [--profile]

``--profile`` then runs one more new mod, warmup off (every compile on the calling thread), under
cProfile and Triton's compilation listener, and prints where its first forward + backward went:
tracing the mod, generating and loading the hooks, and each kernel's compile by stage (AST to IR,
TTIR, TTGIR, LLVM IR, PTX, ptxas to a cubin), summed over the kernels too.

Prints, per variant, the median and spread of the forward alone (its compile included) and of
forward + backward; B=2, H=16, bf16, causal BlockMask, loss ``out.sum()`` (as ``python -m attend
bench --suite flex`` times ``first_call_new_mod``).
"""

from __future__ import annotations

import os
import tempfile

# before triton is imported: an empty cache, so each new structure really compiles
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attend-first-call-triton-")
os.environ["ATTEND_CACHE_DIR"] = tempfile.mkdtemp(prefix="attend-first-call-")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import attend.flex_attention as flex  # noqa: E402
from attend.kernels.options import kernel_options  # noqa: E402


def _mod(depth: int):
    """A softcap-like score_mod whose structure is new for each ``depth`` (``depth`` more additions
    after one tanh: every call's kernels cost about the same to build and run, where nesting the
    tanh made later calls' builds slower and the variants' medians incomparable)."""
    def score_mod(s, b, h, q_idx, kv_idx):
        x = torch.tanh(s / 30.0)
        for _ in range(depth):
            x = x + 0.25
        return s * 0.5 + x
    return score_mod


VARIANTS = {  # name -> KernelOptions changes
    "warmup on": dict(flex_bwd_precompile=True),  # its compiles in forked processes (compile_fork)
    "warmup on threads": dict(flex_bwd_precompile=True, compile_fork=False),
    "warmup off": dict(flex_bwd_precompile=False),
    "split backward": dict(flex_bwd_precompile=True, flex_bwd_split=True),  # two kernels, warmed up side by side
}


def _first_call(q, k, v, bm, depth: int, options: dict) -> tuple[float, float]:
    torch.cuda.synchronize()
    with kernel_options(**options):
        t = time.perf_counter()
        out = flex.flex_attention(q, k, v, score_mod=_mod(depth), block_mask=bm)
        torch.cuda.synchronize()
        fwd = time.perf_counter() - t
        out.sum().backward()
        torch.cuda.synchronize()
    return fwd, time.perf_counter() - t


# (label, file suffix, function names): where a first call's Python time goes, from cProfile's
# cumulative times; Triton's compiles are read from its compilation listener (every stage, each
# kernel: cProfile saw only the stages that run Python frames of their own)
PHASES = [
    ("trace the mod (torch.fx)", "attend/_flex/trace.py", None),
    ("generate + load the hooks", "attend/_flex/codegen.py", ("hooks",)),
]


def _profile(q, k, v, bm, depth: int) -> None:
    import triton

    builds = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        builds.append((name, cache_hit, times))

    prof = cProfile.Profile()
    triton.knobs.compilation.listener = listener
    prof.enable()
    try:
        fwd, total = _first_call(q, k, v, bm, depth, VARIANTS["warmup off"])
    finally:
        prof.disable()
        triton.knobs.compilation.listener = None
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)
    print(f"profile of one new mod, warmup off: forward {fwd:.2f} s, forward + backward {total:.2f} s")
    for label, suffix, names in PHASES:
        hits = [(fn, st) for fn, st in stats.items() if fn[0].endswith(suffix) and (names is None or fn[2] in names)]
        if names is None:  # a module: its top-level entry points (called from outside it)
            hits = [(fn, st) for fn, st in hits if not any(c[0].endswith(suffix) for c in st[4])]
        print(f"  {label:30s} {sum(st[3] for _, st in hits):7.2f} s  ({sum(st[1] for _, st in hits)} calls)")
    stages: dict = {}
    for name, hit, t in builds:
        parts = [("AST -> IR", t.ir_initialization), *t.lowering_stages, ("store", t.store_results)]
        print(f"  Triton {'load' if hit else 'build'} {name:24s} {t.total / 1e6:7.2f} s  "
              + ", ".join(f"{n} {us / 1e6:.2f}" for n, us in parts))
        for n, us in parts if not hit else [("load from the disk cache", t.total)]:
            stages[n] = stages.get(n, 0) + us
    print("  Triton, every kernel by stage: " + ", ".join(f"{n} {us / 1e6:.2f} s" for n, us in stages.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="then profile one more new mod's first call")
    args = ap.parse_args()
    B, H, S, D = 2, 16, args.S, args.D
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bm = flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S, device="cuda")
    _first_call(q, k, v, bm, 0, VARIANTS["warmup on"])  # all but the mods' kernels: CUDA, the block mask, imports
    times = {name: [] for name in VARIANTS}
    depth = 1
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            times[name].append(_first_call(q, k, v, bm, depth, VARIANTS[name]))
            depth += 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} S={S} D={D} bf16, causal, "
          f"{args.rounds} rounds, seconds (median, min-max)")
    for name, rows in times.items():
        fwd, total = [r[0] for r in rows], [r[1] for r in rows]
        print(f"  {name:14s}  forward {statistics.median(fwd):6.2f} ({min(fwd):.2f}-{max(fwd):.2f})   "
              f"forward + backward {statistics.median(total):6.2f} ({min(total):.2f}-{max(total):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), B=B, H=H, S=S, D=D, times=times), f, indent=1)
    if args.profile:
        _profile(q, k, v, bm, depth)


if __name__ == "__main__":
    main()

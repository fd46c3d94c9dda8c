"""create_block_mask and the generated hooks on the GPU: time, peak memory, generations, compiles.

For each length, a causal and a document-id mask are built by attend's create_block_mask (the
Triton classifier built from the generated mask hook) and by PyTorch's (which holds L x S);
median time over the repeats and peak CUDA memory above the baseline. Then the counts that must
not grow: hook generations (codegen.GENERATIONS) and classifier compiles (the JIT cache) over
new lengths, batches and captured values. Also the first call of a new mod (trace + generate +
compile). One JSON object per line.

    PYTHONPATH=src python benchmarks/flex_block_mask.py [--lengths 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.attention.flex_attention as tflex

import attend.flex_attention as flex
from attend._flex import codegen, kernels
from attend._flex import trace as trace_mod


def timed(fn, reps: int = 5) -> tuple[float, float]:
    """(median ms, peak MiB above the memory in use before) of ``fn()``."""
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def compiles() -> int:
    return sum(len(c[0]) for c in kernels.classify_blocks.device_caches.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = "cuda"
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    for n in args.lengths:
        doc = torch.randint(0, 8, (2, n), device=dev).sort(-1).values
        document = lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx]
        for name, mod, bsz in (("causal", causal, None), ("document", document, 2)):
            flex.create_block_mask(mod, bsz, None, n, n, device=dev)  # first call: generate + compile
            row = dict(case=name, length=n)
            row["attend_ms"], row["attend_peak_mib"] = timed(lambda: flex.create_block_mask(mod, bsz, None, n, n,
                                                                                            device=dev), args.reps)
            try:
                row["torch_ms"], row["torch_peak_mib"] = timed(lambda: tflex.create_block_mask(mod, bsz, None, n, n,
                                                                                               device=dev), args.reps)
            except torch.OutOfMemoryError as e:
                row["torch_error"] = str(e).splitlines()[0]
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)

    # nothing regenerates or recompiles for a new length, batch or captured value
    gens, comp = codegen.GENERATIONS["count"], compiles()
    for n, bsz in ((4000, 3), (5000, 1), (6144, 2)):
        doc = torch.randint(0, 8, (bsz, n), device=dev).sort(-1).values
        flex.create_block_mask(lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx], bsz, None, n, n,
                               device=dev)
    print(json.dumps(dict(case="new lengths / batches / values", generations=codegen.GENERATIONS["count"] - gens,
                          classifier_compiles=compiles() - comp)), flush=True)

    # the first call of a new mod: trace + generate + compile + run
    window = 333
    t = time.perf_counter()
    flex.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() * 3 // 2 <= window, None, None, 8192,
                           8192, device=dev)
    torch.cuda.synchronize()
    first = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    trace_mod.trace(lambda s, b, h, q_idx, kv_idx: s + (q_idx - kv_idx) * 0.5, "score")
    trace_ms = (time.perf_counter() - t) * 1e3
    print(json.dumps(dict(case="first call of a new mask_mod", create_block_mask_ms=first, trace_ms=trace_ms)))


if __name__ == "__main__":
    main()

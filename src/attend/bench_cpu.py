"""CPU benchmark: attend's blocked FLASH path vs attend MATH vs PyTorch's CPU SDPA.

Times come from one process; peak memory from a fresh process per implementation, since a
process's peak RSS only grows.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

from ._child import child_env

IMPLS = ("attend FLASH (blocked)", "attend MATH", "torch SDPA (CPU)")


def _call(impl: str, q, k, v, causal: bool):
    import attend

    if impl == "torch SDPA (CPU)":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    backend = attend.SDPBackend.FLASH_ATTENTION if impl.startswith("attend FLASH") else attend.SDPBackend.MATH
    with attend.sdpa_kernel(backend):
        return attend.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _inputs(shape, dtype, grad):
    torch.manual_seed(0)
    return [torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in range(3)]


def _step(impl, shape, dtype, causal, backward):
    q, k, v = _inputs(shape, dtype, backward)

    def run():
        out = _call(impl, q, k, v, causal)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def _median_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``reps`` calls of ``fn``, after ``warmup`` untimed calls (the first calls
    pay one-off costs: allocator growth, thread-pool start, page faults)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(impl, shape, dtype, causal, backward) -> float:
    code = (
        "import json,sys,torch; from attend.bench_cpu import _step; from attend._memory import peak_rss_increase_mib;"
        f"fn=_step({impl!r},{tuple(shape)!r},torch.{str(dtype).removeprefix('torch.')},{causal},{backward});"
        "print(json.dumps(peak_rss_increase_mib(fn)))"
    )
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(shape=(1, 8, 4096, 64), dtype=torch.float32, causal=True, reps=5, out=sys.stdout, warmup=1) -> list[dict]:
    rows = []
    for impl in IMPLS:
        row = {"impl": impl}
        for backward, tag in ((False, "fwd"), (True, "fwd+bwd")):
            print(f"  timing {impl} {tag} ...", file=sys.stderr, flush=True)
            row[f"{tag} ms"] = _median_ms(_step(impl, shape, dtype, causal, backward), reps, warmup)
            row[f"{tag} peak MiB"] = _peak_mib(impl, shape, dtype, causal, backward)
        rows.append(row)
    ref = rows[2]
    title = f"CPU, {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}, causal={causal}, " \
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {reps} after {warmup} warm-up"
    print(title, file=out)
    print("| impl | fwd ms | fwd+bwd ms | vs torch (fwd / fwd+bwd) | fwd peak MiB | fwd+bwd peak MiB |", file=out)
    print("|---|---|---|---|---|---|", file=out)
    for r in rows:
        print(f"| {r['impl']} | {r['fwd ms']:.1f} | {r['fwd+bwd ms']:.1f} | "
              f"{r['fwd ms'] / ref['fwd ms']:.2f}x / {r['fwd+bwd ms'] / ref['fwd+bwd ms']:.2f}x | "
              f"{r['fwd peak MiB']:.0f} | {r['fwd+bwd peak MiB']:.0f} |", file=out)
    return rows

"""Tuning data for the Triton core: candidate configs per kernel and the prune function.

The autotuner benchmarks the candidates that survive ``prune`` once per key (head dim, causal,
mask, dropout, and for the forward a query-length bucket). Candidates come from the H100 sweep
recorded in benchmarks/RESULTS.md; keep the lists short, since every candidate is compiled on a
key's first call and checked to build for sm_90/sm_80 in CI.
"""

from __future__ import annotations

import triton

# Tile used under TRITON_INTERPRET=1 (tests on the CPU): small, so the interpreter stays fast.
INTERPRET_TILE = 16


def _c(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


FWD_CONFIGS = [
    _c(128, 128, 8, 3), _c(128, 64, 8, 3), _c(128, 64, 4, 3), _c(64, 64, 4, 3),
    _c(128, 64, 8, 2), _c(64, 32, 4, 2), _c(16, 64, 4, 3), _c(16, 128, 4, 3),
]
BWD_DKDV_CONFIGS = [_c(64, 128, 8, 2), _c(32, 128, 4, 2), _c(64, 64, 4, 2), _c(32, 64, 4, 2), _c(16, 64, 4, 2)]
BWD_DQ_CONFIGS = [_c(128, 64, 8, 2), _c(64, 64, 4, 2), _c(64, 32, 4, 2), _c(16, 64, 4, 2)]

# Shared-memory budget per block on sm_90 / sm_80 (227 / 163 KiB); configs over it are pruned.
_SMEM_BYTES = 160 * 1024


def smem_estimate(bm: int, bn: int, block_d: int, stages: int, elem: int = 2) -> int:
    """Rough shared memory of one program: the resident tile plus `stages` buffers of K and V."""
    return (bm * block_d + stages * 2 * bn * block_d) * elem


def prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or make no sense for this call; never returns an empty list."""
    d = named_args.get("BLOCK_D") or kwargs.get("BLOCK_D")
    lb = named_args.get("L_BUCKET", kwargs.get("L_BUCKET"))
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if d is not None and smem_estimate(bm, bn, d, c.num_stages) > _SMEM_BYTES:
            continue
        if d is not None and d >= 256 and bm * bn > 128 * 64:
            continue  # register pressure: the accumulator and p tile spill
        if lb is not None and (lb == 1) != (bm == 16):
            continue  # decode-sized queries get 16-row tiles, prefill never does
        kept.append(c)
    return kept or configs[-1:]


# Used when autotuning is off (ATTEND_AUTOTUNE=0): one config per kernel and head-dim class.
# Chosen from the H100 sweep in benchmarks/RESULTS.md (the autotuner's most frequent winners).
_HEURISTIC = {
    ("fwd", 64): _c(128, 64, 4, 3), ("fwd", 128): _c(128, 64, 8, 3), ("fwd", 256): _c(64, 32, 4, 2),
    ("bwd_dkdv", 64): _c(64, 128, 8, 2), ("bwd_dkdv", 128): _c(64, 128, 8, 2), ("bwd_dkdv", 256): _c(32, 64, 4, 2),
    ("bwd_dq", 64): _c(128, 64, 8, 2), ("bwd_dq", 128): _c(128, 64, 8, 2), ("bwd_dq", 256): _c(64, 32, 4, 2),
}
_DECODE = _c(16, 128, 4, 3)


def heuristic(kind: str, block_d: int, l_bucket: int | None = None) -> triton.Config:
    """The fixed config for ``kind`` ("fwd", "bwd_dkdv", "bwd_dq") at padded head dim ``block_d``."""
    if kind == "fwd" and l_bucket == 1:
        return _DECODE
    return _HEURISTIC[(kind, 64 if block_d <= 64 else (128 if block_d <= 128 else 256))]

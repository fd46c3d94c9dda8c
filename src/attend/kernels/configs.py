"""Tuning data for the Triton core: the fixed config table (``heuristic``, the default), and the
candidate lists and prune function of the opt-in autotuner (ATTEND_AUTOTUNE=1).

The table comes from timing every candidate on the H100 (benchmarks/sweep.py; RESULTS.md). The
autotuner benchmarks the candidates that survive ``prune`` once per key (head dim, causal, mask,
dropout, a sequence-length bucket, and for the forward a query-length bucket), which costs about
a minute per new key. Keep the lists short: CI compiles every candidate for sm_90 and sm_80.
"""

from __future__ import annotations

import triton

# Tile used under TRITON_INTERPRET=1 (tests on the CPU): small, so the interpreter stays fast.
INTERPRET_TILE = 16


def _c(bm: int, bn: int, warps: int, stages: int, lazy: bool = False, even: bool = True,
       tma: bool = False, one_loop: bool = True) -> triton.Config:
    """Forward: a (BLOCK_M, BLOCK_N) tile; ``lazy``: rescale the accumulator only when a row's
    max grows by more than 2^8 (core.RESCALE_SLACK); ``even=False``: never take the kernel's
    EVEN path, even where the shape allows it (it is slower for some tiles: the sweep decides);
    ``tma``: read K, V and a float mask's tiles through TMA descriptors where the copy engine can
    (launch.FWD_TMA; a request the launcher drops on other GPUs or misaligned tensors);
    ``one_loop``: a band's edge blocks run in the inner loop (core's ONE_LOOP; the H100, session 8,
    ab.py: causal 1k 337 against 320 TFLOP/s, packed causal 393 / 387 against 381 / 383, dense
    causal 16k 490 against 478 over two runs; off where it did not pay, below)."""
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "LAZY_RESCALE": lazy, "ONE_LOOP": one_loop}
    if not even:  # overrides the launch's EVEN flag (a config can only opt out of it)
        kw["EVEN"] = False
    if tma:
        kw["TMA"] = True
    return triton.Config(kw, num_warps=warps, num_stages=stages)


FWD_CONFIGS = [
    _c(128, 128, 8, 3), _c(128, 128, 8, 2), _c(128, 64, 8, 3), _c(128, 64, 8, 4), _c(128, 64, 4, 3),
    _c(64, 64, 4, 3), _c(64, 128, 4, 3), _c(128, 64, 8, 2), _c(64, 32, 4, 2), _c(16, 64, 4, 3), _c(16, 128, 4, 3),
    _c(128, 128, 8, 3, True), _c(128, 64, 8, 3, True), _c(64, 64, 4, 3, True),
]


def _b(m1: int, n1: int, m2: int, n2: int, warps: int, stages: int, dq_atomic: bool = False,
       head_major: bool = False, one_loop: bool | None = None) -> triton.Config:
    """Backward: (BLOCK_M1, BLOCK_N1) tile the dK/dV programs, (BLOCK_M2, BLOCK_N2) the dQ ones;
    ``dq_atomic``: no dQ programs, the dK/dV programs add dQ by atomics; ``head_major``: number
    the programs KV head by KV head (core.attn_bwd); ``one_loop``: a band's edge blocks run in
    the inner loops (core's ONE_LOOP). By default on for 64-row dK/dV tiles and off for 32-row
    ones, as the H100 measured them (session 8, benchmarks/ab.py, medians of 5 rounds): one loop
    made 64-row tiles 2-8% faster on causal and window bands (window 64x128 388 against 330
    TFLOP/s, head-major 64x64 376 against 355; causal 4k 373 against 358) and 32-row tiles 4-8%
    slower (window 32x64 341-349 against 368-375; D=64 causal 16k 369 against 383)."""
    kw = {"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2, "DQ_ATOMIC": dq_atomic,
          "ONE_LOOP": m1 >= 64 if one_loop is None else one_loop}
    if head_major:
        kw["HEAD_MAJOR"] = True
    return triton.Config(kw, num_warps=warps, num_stages=stages)


BWD_CONFIGS = [
    _b(64, 128, 128, 64, 8, 3), _b(64, 128, 128, 64, 8, 2), _b(64, 128, 128, 64, 8, 4), _b(64, 64, 64, 64, 4, 2),
    _b(64, 64, 64, 64, 4, 3), _b(32, 128, 64, 64, 4, 3), _b(32, 128, 128, 32, 4, 3), _b(32, 64, 64, 32, 4, 3),
    _b(16, 64, 64, 16, 4, 2), _b(64, 64, 64, 64, 4, 2, head_major=True),
    # dQ by atomics: 5 dots per tile pair instead of 7; dropped in deterministic mode.
    _b(64, 128, 64, 64, 8, 2, True), _b(64, 128, 64, 64, 8, 3, True), _b(32, 128, 64, 64, 4, 3, True),
    _b(64, 64, 64, 64, 4, 2, True), _b(64, 64, 64, 64, 4, 3, True),
]

# Estimated shared-memory budget per program by compute capability major version: the
# estimate assumes every stage of K and V is buffered, which Triton often does not (measured:
# 64 KiB for fwd 128x128, 3 stages, where this says 229 KiB), so it only drops clear misfits.
_SMEM_BUDGET = {9: 232 * 1024, 8: 164 * 1024}


def smem_estimate(kind: str, c: triton.Config, block_d: int, elem: int = 2) -> int:
    """Resident tiles plus ``num_stages`` buffers of the streamed tiles, in bytes."""
    kw, st = c.kwargs, c.num_stages
    if kind == "fwd":  # q resident; k, v streamed
        return (kw["BLOCK_M"] * block_d + st * 2 * kw["BLOCK_N"] * block_d) * elem
    # backward: the larger of its dK/dV programs (k, v resident; q, dO streamed) and dQ programs
    dkdv = 2 * kw["BLOCK_N1"] * block_d + st * 2 * kw["BLOCK_M1"] * block_d
    dq = 2 * kw["BLOCK_M2"] * block_d + st * 2 * kw["BLOCK_N2"] * block_d
    return max(dkdv, dq) * elem


def _capability_major() -> int:
    import torch

    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9


def pruner(kind: str):
    """The autotuner's prune function for ``kind``: drops configs that cannot fit or make no
    sense for the call; never returns an empty list."""

    def prune(configs, named_args, **kwargs):
        d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        lb = named_args.get("L_BUCKET", kwargs.get("L_BUCKET"))
        deterministic = kwargs.get("DETERMINISTIC", named_args.get("DETERMINISTIC", False))
        budget = _SMEM_BUDGET.get(_capability_major(), _SMEM_BUDGET[8])
        kept = []
        for c in configs:
            kw = c.kwargs
            if d is not None and smem_estimate(kind, c, d) > budget:
                continue
            tiles = [(kw["BLOCK_M"], kw["BLOCK_N"])] if kind == "fwd" else [
                (kw["BLOCK_M1"], kw["BLOCK_N1"]), (kw["BLOCK_M2"], kw["BLOCK_N2"])]
            if d is not None and d >= 256 and any(bm * bn > 64 * 64 for bm, bn in tiles):
                continue  # register pressure: the accumulators and score tiles spill
            if kind == "fwd" and lb is not None and (lb == 1) != (kw["BLOCK_M"] == 16):
                continue  # decode-sized queries get 16-row tiles, prefill never does
            if deterministic and kw.get("DQ_ATOMIC"):
                continue
            kept.append(c)
        return kept or [c for c in configs if not c.kwargs.get("DQ_ATOMIC")][-1:]

    return prune


# The fixed configs (used unless ATTEND_AUTOTUNE=1): per (kernel, head-dim class, causal), the
# best config of the H100 sweep per sequence-length bucket (benchmarks/sweep.py, RESULTS.md
# "session 3" and "session 4"; bf16, hidden 2048, 16k tokens). A bucket not listed takes the next
# larger one listed, else the largest. D=256 is untuned (it fits the register file; nothing more).
_TABLE = {
    # Forward, session 4 sweep with and without the EVEN path (sweep.py --even both).
    ("fwd", 64, False): {16384: _c(128, 64, 8, 3)},  # 399 / 438 / 437 TFLOP/s at S = 1k / 4k / 16k
    ("fwd", 64, True): {16384: _c(128, 64, 8, 3, even=False)},  # 270 / 381 / 427 (EVEN: < 270 / 377 / 416)
    ("fwd", 128, False): {1024: _c(64, 64, 4, 3), 16384: _c(128, 128, 8, 3)},  # 436; 525 / 524
    ("fwd", 128, True): {4096: _c(64, 64, 4, 3), 16384: _c(128, 128, 8, 3)},  # 333 / 436; 494
    ("fwd", 256, False): {16384: _c(64, 32, 4, 2)},
    ("fwd", 256, True): {16384: _c(64, 32, 4, 2)},
    # Backward: TMA descriptors on (launch._use_tma), sweep of run 12.
    ("bwd", 64, False): {16384: _b(32, 128, 64, 64, 4, 3)},  # 336 at 4k, 361 at 16k
    # D=64 causal: re-swept in session 4 with the fast launcher (the old 1024 pick, dQ by atomics,
    # timed 197 then and lost to 223 here once its fp32 dQ conversion counted).
    ("bwd", 64, True): {1024: _b(32, 64, 64, 32, 4, 3), 4096: _b(32, 128, 128, 32, 4, 3),
                        16384: _b(32, 128, 64, 64, 4, 3)},  # 223, 325, 354
    # D=128: session 5 sweep with the head-major program order (HM), kept where the public API
    # bench agreed (run 18). Non-causal: HM 64x64, sweep 369 / 459 at 1k / 4k (non-HM 344 / 421),
    # API 376 / 403 (old pick 333 / 394); 443 at 16k. Causal: HM 64x64 at 16k, sweep 418 (old pick
    # 392), API 426 (424). At 1k / 4k the sweep's picks (HM 64x64 272, 64x64 376) lost through
    # the API (210 / 359 against 256 / 381 for the old picks), so those stay at 4k. Session 6: at
    # 1k the API sweep (sweep.py --api) and the kernel sweep both put HM 64x64 first (266 / 271;
    # the old 32x64 pick at most 250 / 252).
    ("bwd", 128, False): {4096: _b(64, 64, 64, 64, 4, 2, head_major=True), 16384: _b(64, 128, 128, 64, 8, 3)},
    ("bwd", 128, True): {1024: _b(64, 64, 64, 64, 4, 2, head_major=True), 4096: _b(64, 128, 128, 64, 8, 3),
                         16384: _b(64, 64, 64, 64, 4, 2, head_major=True)},
    ("bwd", 256, False): {16384: _b(16, 64, 64, 16, 4, 2)},
    ("bwd", 256, True): {16384: _b(16, 64, 64, 16, 4, 2)},
}
# Full-size masks: a 128x128 forward tile with its bf16 bias tile pipelined in shared memory needs
# 288 KiB, over the H100's 227 KiB; 128x64 is the sweep's best (208 vs 126 TFLOP/s for 64x64,
# run 13), with the EVEN path 391 vs 339 without (session 5, bias (4, 16, 4096, 4096)). Session 7
# (benchmarks/ab.py, medians of 5 interleaved rounds through the API): with TMA loads 370.5 against
# 360.9. Backward with dQ from the stored dS (launch.DQ_FROM_DS): 64x64 272, next 266 (32x64);
# session 7: 323 against 312 (32x64). fp32: tiles take twice the space, so 64x64.
_MASK_TILES = {("fwd", 128): _c(128, 64, 8, 3, tma=True), ("bwd", 128): _b(64, 64, 64, 64, 4, 2)}
# Key-padding masks (one mask row for all queries): since session 7 a mask that keeps one run of
# keys is read on the run's edge blocks only, so the forward is the plain one inside the run.
# ab.py, (4, 1, 1, 4096) padding: 128x128 with TMA 568, 128x64 554, the old non-EVEN 128x64 546.
_KEY_MASK_TILES = {("fwd", 128): _c(128, 128, 8, 3, tma=True)}
_SMALL_TILES = {("fwd", 128): _c(64, 64, 4, 3), ("bwd", 128): _b(64, 64, 64, 64, 4, 2)}
# Packed causal sequences (session 5: forward 379; backward through TMA descriptors, head-major
# 64x64 304, against 271 for the old pointer-load pick). Forward by longest sequence (session 7,
# ab.py): mixed lengths up to 4096, 64x64 with TMA 382 against 364 for 128x64; one sequence of
# 16384, 128x128 with TMA 504 against 482 (64x64 with TMA 475).
# Session 8: the one-sequence tile keeps one loop per band edge (one loop: 473 / 466 / 503 against
# 502 / 490 / 487 in three runs).
_VARLEN = {("fwd", 128): {4096: _c(64, 64, 4, 3, tma=True), 16384: _c(128, 128, 8, 3, tma=True, one_loop=False)},
           ("bwd", 128): {16384: _b(64, 64, 64, 64, 4, 2, head_major=True)}}
# Sliding windows (varlen-window, 4096 of 16384): backward 64x64 in key order 363, head-major 349
# (session 5). Session 6, with the padded row stats: 32x64 392, head-major 64x64 372. Session 7
# (ab.py): 32x64 378, head-major 64x64 350; forward 128x128 with TMA 443 against 416 (128x64).
# Session 8: one loop over the window's edges left the forward where it was (448 / 443 / 438
# against 447 / 441 / 444 in three runs), so it keeps its three loops; the backward's 32-row tile
# too (configs._b). Backward candidates in one loop: 64x128 373-388, head-major 64x64 373-381,
# against 368-375 for this pick, within the runs' spread.
_WINDOW = {("fwd", 128): _c(128, 128, 8, 3, tma=True, one_loop=False), ("bwd", 128): _b(32, 64, 64, 32, 4, 3)}
# The Gluon dK / dV kernel (ws_bwd.py), then the core's dQ programs alone (DQ_ONLY): H100 kernel
# times (torch.profiler, session 10), Gluon + dQ programs against the core's one launch, us:
# window 4096 of 16k 2461 / 2793, one packed 16k causal sequence 5270 / 5749, dense causal 16k
# 5079 / 5801, 4k 1605 / 1730, non-causal 16k 11209 / 12606, 4k 2829 / 2864; at S=1024 the core
# (607 against 652 causal: tiles of 8 query blocks pay the Gluon kernel's per-tile cost). The dQ
# programs alone: 128x64 tiles, 8 warps, 3 stages (window 1112 us, against 1237 for 64x32 and 1288
# for 128x128; full causal 2421 against 2758 for 64x64).
WS_BWD_MIN_SEQ_BUCKET = 4096
_DQ_ONLY = {128: _b(64, 128, 128, 64, 8, 3)}


def ws_backward(block_d: int, seq_bucket: int) -> triton.Config | None:
    """The dQ programs' config when a backward at padded head dim ``block_d`` and sequence bucket
    (launch._seq_bucket of the longer length) should take the Gluon dK / dV kernel, else None."""
    return _DQ_ONLY.get(block_d) if seq_bucket >= WS_BWD_MIN_SEQ_BUCKET else None


_DECODE = _c(16, 128, 4, 3)
# Grouped-query heads (G > 1) at S=4096, 8:1, where the winner differs from the table's. D=64
# causal: forward 387 TFLOP/s with 4 stages vs at most 348 with the 3-stage table pick; backward
# 64x64 3 stages, 324 through the API (run 16; the 2-stage variant the session 5 sweep preferred
# took 305 there, run 18). D=128 causal backward: 32x64, 340 through the API (304 for the table's
# 64x128 pick). D=128 non-causal backward: head-major orders lose with groups (a KV head's G dQ
# heads crowd in behind its dK/dV programs: 374 against 419), so the 64x128 key-order pick.
_GQA = {("fwd", 64, True): _c(128, 64, 8, 4, even=False), ("bwd", 64, True): _b(64, 64, 64, 64, 4, 3),
        ("bwd", 128, True): _b(32, 64, 64, 32, 4, 3), ("bwd", 128, False): _b(64, 128, 128, 64, 8, 3)}


def forward_tma(asked: bool, flags: dict) -> tuple[bool, bool]:
    """Whether the forward reads (K and V, a float mask's) tiles through TMA descriptors, before
    the copy-engine check: as ``asked`` (a config's ``tma``, or launch.FWD_TMA), never for a paged
    pool; the mask's tiles only for a float mask with rows (not bool, not one row of keys)."""
    kv = asked and not flags.get("PAGED", False)
    return kv, kv and flags.get("HAS_MASK", False) and not flags.get("MASK_BOOL") and not flags.get("MASK_KEYS")


def heuristic(kind: str, block_d: int, l_bucket: int | None = None, flags: dict | None = None,
              elem: int = 2, seq_bucket: int = 16384, group: int = 1) -> triton.Config:
    """The fixed config for ``kind`` ("fwd" or "bwd") at padded head dim ``block_d``, given the
    launch's feature ``flags`` (CAUSAL, VARLEN, HAS_MASK, MASK_KEYS), the input element size,
    the sequence-length bucket (launch._seq_bucket) and the query heads per KV head."""
    flags = flags or {}
    if kind == "fwd" and l_bucket == 1:
        return _DECODE
    d = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    if elem > 2 and (kind, d) in _SMALL_TILES:
        return _SMALL_TILES[(kind, d)]
    if flags.get("HAS_MASK") and flags.get("MASK_KEYS") and (kind, d) in _KEY_MASK_TILES:
        return _KEY_MASK_TILES[(kind, d)]
    if flags.get("HAS_MASK") and not flags.get("MASK_KEYS") and (kind, d) in _MASK_TILES:
        return _MASK_TILES[(kind, d)]
    if flags.get("WINDOW") and (kind, d) in _WINDOW:
        return _WINDOW[(kind, d)]
    if flags.get("VARLEN") and (kind, d) in _VARLEN:
        return _by_bucket(_VARLEN[(kind, d)], seq_bucket)
    key = (kind, d, bool(flags.get("CAUSAL")))
    if group > 1 and seq_bucket >= 4096 and key in _GQA:
        return _GQA[key]
    return _by_bucket(_TABLE[key], seq_bucket)


def _by_bucket(by_bucket: dict, seq_bucket: int) -> triton.Config:
    """The entry for the smallest listed bucket >= ``seq_bucket``, else the largest one."""
    fits = [b for b in sorted(by_bucket) if b >= seq_bucket]
    return by_bucket[fits[0] if fits else max(by_bucket)]


# Every block size divides EVEN_TILE, so L and S that are multiples of it need no bounds masks
# in the backward's loops (core.attn_bwd's EVEN), and every query block of the backward reads
# whole blocks of its padded NLSE2 / Delta rows (core.STAT_PAD, the same 128).
EVEN_TILE = 128
assert all(EVEN_TILE % c.kwargs[k] == 0
           for c in BWD_CONFIGS + [c for t in _TABLE.values() for c in t.values()] + list(_SMALL_TILES.values()) + list(_MASK_TILES.values())
           + [c for t in _VARLEN.values() for c in t.values()] + list(_WINDOW.values()) + list(_GQA.values())
           + list(_DQ_ONLY.values())
           if "BLOCK_M1" in c.kwargs
           for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"))
assert all(EVEN_TILE % c.kwargs[k] == 0 for c in FWD_CONFIGS for k in ("BLOCK_M", "BLOCK_N"))

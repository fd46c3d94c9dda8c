"""Tuning data for the Triton core: the fixed config table (``heuristic``, the default), and the
candidate lists and prune function of the opt-in autotuner (ATTEND_AUTOTUNE=1).

The table comes from timing the candidates on the H100 (benchmarks/sweep.py, then benchmarks/ab.py;
the figures behind each rule: docs/kernels.md, "Measurements behind the tuning"). The
autotuner benchmarks the candidates that survive ``prune`` once per key (head dim, causal, mask,
dropout, a sequence-length bucket, and for the forward a query-length bucket), which costs about
a minute per new key. Keep the lists short: CI compiles every candidate for sm_90 and sm_80.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import triton

# Tile used under TRITON_INTERPRET=1 (tests on the CPU): small, so the interpreter stays fast.
INTERPRET_TILE = 16


def fwd_config(bm: int, bn: int, warps: int, stages: int, *, lazy: bool = False, even: bool = True,
               tma: bool = False, one_loop: bool = True) -> triton.Config:
    """Forward: a (BLOCK_M, BLOCK_N) tile; ``lazy``: rescale the accumulator only when a row's
    max grows by more than 2^8 (core.RESCALE_SLACK); ``even=False``: never take the kernel's
    EVEN path, even where the shape allows it (it is slower for some tiles: the sweep decides);
    ``tma``: read K, V and a float mask's tiles through TMA descriptors where the copy engine can
    (KernelOptions.fwd_tma; a request the launcher drops on other GPUs or misaligned tensors);
    ``one_loop``: a band's edge blocks run in the inner loop (core's ONE_LOOP; the H100, ab.py:
    causal 1k 337 against 320 TFLOP/s, packed causal 393 / 387 against 381 / 383, dense causal 16k
    490 against 478 over two passes; off where it did not pay, below; docs/kernels.md, "Tuning: one
    loop over a band's edges")."""
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "LAZY_RESCALE": lazy, "ONE_LOOP": one_loop}
    if not even:  # overrides the launch's EVEN flag (a config can only opt out of it)
        kw["EVEN"] = False
    if tma:
        kw["TMA"] = True
    return triton.Config(kw, num_warps=warps, num_stages=stages)


_c = fwd_config  # short name for the tables below

FWD_CONFIGS = [
    _c(128, 128, 8, 3), _c(128, 128, 8, 2), _c(128, 64, 8, 3), _c(128, 64, 8, 4), _c(128, 64, 4, 3),
    _c(64, 64, 4, 3), _c(64, 128, 4, 3), _c(128, 64, 8, 2), _c(64, 32, 4, 2), _c(16, 64, 4, 3), _c(16, 128, 4, 3),
    _c(128, 128, 8, 3, lazy=True), _c(128, 64, 8, 3, lazy=True), _c(64, 64, 4, 3, lazy=True),
]


def bwd_config(m1: int, n1: int, m2: int, n2: int, warps: int, stages: int, *, dq_atomic: bool = False,
               head_major: bool = False, one_loop: bool | None = None) -> triton.Config:
    """Backward: (BLOCK_M1, BLOCK_N1) tile the dK/dV programs, (BLOCK_M2, BLOCK_N2) the dQ ones;
    ``dq_atomic``: no dQ programs, the dK/dV programs add dQ by atomics; ``head_major``: number
    the programs KV head by KV head (core.attn_bwd); ``one_loop``: a band's edge blocks run in
    the inner loops (core's ONE_LOOP). By default on for 64-row dK/dV tiles and off for 32-row
    ones, as the H100 measured them (benchmarks/ab.py, medians of 5 rounds; docs/kernels.md, "Tuning:
    one loop over a band's edges"): one loop
    made 64-row tiles 2-8% faster on causal and window bands (window 64x128 388 against 330
    TFLOP/s, head-major 64x64 376 against 355; causal 4k 373 against 358) and 32-row tiles 4-8%
    slower (window 32x64 341-349 against 368-375; D=64 causal 16k 369 against 383)."""
    kw = {"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2, "DQ_ATOMIC": dq_atomic,
          "ONE_LOOP": m1 >= 64 if one_loop is None else one_loop}
    if head_major:
        kw["HEAD_MAJOR"] = True
    return triton.Config(kw, num_warps=warps, num_stages=stages)


_b = bwd_config

BWD_CONFIGS = [
    _b(64, 128, 128, 64, 8, 3), _b(64, 128, 128, 64, 8, 2), _b(64, 128, 128, 64, 8, 4), _b(64, 64, 64, 64, 4, 2),
    _b(64, 64, 64, 64, 4, 3), _b(32, 128, 64, 64, 4, 3), _b(32, 128, 128, 32, 4, 3), _b(32, 64, 64, 32, 4, 3),
    _b(16, 64, 64, 16, 4, 2), _b(64, 64, 64, 64, 4, 2, head_major=True),
    # dQ by atomics: 5 dots per tile pair instead of 7; dropped in deterministic mode.
    _b(64, 128, 64, 64, 8, 2, dq_atomic=True), _b(64, 128, 64, 64, 8, 3, dq_atomic=True),
    _b(32, 128, 64, 64, 4, 3, dq_atomic=True), _b(64, 64, 64, 64, 4, 2, dq_atomic=True),
    _b(64, 64, 64, 64, 4, 3, dq_atomic=True),
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


@dataclass(frozen=True)
class Key:
    """What the fixed config of a launch depends on: the kernel ("fwd", "bwd", or "dq_only": the
    core's dQ programs after the Gluon dK / dV kernel), the head-dim class (64, 128 or 256: the
    padded head dim rounded up to one of them), the launch's feature flags, the query-length bucket
    (forward; 1 for decode), the input element size, the sequence-length bucket
    (launch.seq_bucket), the query heads per KV head and the dots' precision."""

    kind: str
    d: int
    causal: bool = False
    window: bool = False
    varlen: bool = False
    has_mask: bool = False
    mask_keys: bool = False
    l_bucket: int | None = None
    elem: int = 2
    seq_bucket: int = 16384
    group: int = 1
    # The dots' DOT_PRECISION: "tf32" (what 16-bit inputs ignore), or for fp32 without allow_tf32 "ieee"
    # (FMA loops, no tensor cores) or "tf32x3" (three TF32 products each: KernelOptions.fp32_dots)
    precision: str = "tf32"


def _any(key: Key) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """Where ``kind`` and head-dim class ``d`` (None: any) match and ``when(key)`` holds, the
    config of ``tiles``' smallest sequence bucket >= the call's, else of its largest. ``name``
    says which measurement chose it (the comments above each rule); ``flags``: launch flags that
    select the rule, and ``elem`` the input element size, for the build check (``build.py``
    compiles every rule's configs with them)."""

    name: str
    kind: str
    d: int | None
    tiles: dict
    when: Callable[[Key], bool] = _any
    flags: dict = field(default_factory=dict)
    elem: int = 2

    def matches(self, key: Key) -> bool:
        return self.kind == key.kind and self.d in (None, key.d) and self.when(key)

    def config(self, seq_bucket: int) -> triton.Config:
        """The entry for the smallest listed bucket >= ``seq_bucket``, else the largest one."""
        fits = [b for b in sorted(self.tiles) if b >= seq_bucket]
        return self.tiles[fits[0] if fits else max(self.tiles)]

    def configs(self) -> list[triton.Config]:
        return list(self.tiles.values())


ANY = 16384  # the one bucket of a rule whose tile does not depend on the length


def _causal(c: bool) -> Callable[[Key], bool]:
    return lambda key: key.causal == c


def _fp32(kind: str, d: int | None, config: triton.Config, precision: str, decode: bool = False,
          when: Callable[[Key], bool] = _any) -> Rule:
    """A rule of fp32 with ``precision`` dots ("ieee" / "tf32x3"): named "fp32_<precision>" (with a
    "decode_" prefix where it serves at most 16 queries), built with that DOT_PRECISION."""
    return Rule(("decode_" if decode else "") + f"fp32_{precision}", kind, d, {ANY: config},
                lambda key: key.precision == precision and (not decode or key.l_bucket == 1) and when(key),
                dict(DOT_PRECISION=precision), elem=4)


# The fixed configs (used unless ATTEND_AUTOTUNE=1), first matching rule wins: special cases first
# (decode, fp32, masks, windows, packed sequences, grouped heads), then per (kernel, head-dim class,
# causal) the best config of the H100 sweep per sequence-length bucket. A bucket not listed takes
# the next larger one listed, else the largest. D=256 is untuned (it fits the register file).
RULES: list[Rule] = [
    # Decode (at most 16 queries). fp32 with IEEE dots: 16x128 at 4 warps built to 32 registers and
    # an 8 KB stack for sm_90 (the "fp32_ieee" rules below); at 8 warps and 16x64 it spills nothing.
    # Head dim 256: 16x128 at 3 stages asked for 274432 bytes of shared memory in bf16 (sm_90 has
    # 232448), 16x64 at 2 stages for 151808 in fp32.
    _fp32("fwd", None, _c(16, 64, 8, 2), "ieee", decode=True),
    # TF32x3 (KernelOptions.fp32_dots): 16x64 at 2 stages fits at every head dim (the "fp32_tf32x3" rules)
    _fp32("fwd", None, _c(16, 64, 4, 2), "tf32x3", decode=True),
    Rule("decode", "fwd", 256, {ANY: _c(16, 128, 4, 2)}, lambda key: key.l_bucket == 1 and key.elem == 2),
    Rule("decode", "fwd", 256, {ANY: _c(16, 64, 4, 2)}, lambda key: key.l_bucket == 1, elem=4),
    Rule("decode", "fwd", None, {ANY: _c(16, 128, 4, 3)}, lambda key: key.l_bucket == 1),
    # fp32 with IEEE dots (torch.backends.cuda.matmul.allow_tf32 off, PyTorch's default): Triton
    # unrolls each dot into FMAs, and the build's time grows with the tile's area. The backward at
    # head dim 128 for sm_90 on a 2-core CPU (Triton 3.6): 64x64 60.4 s, 32x64 37.4 s, 32x32 11.3 s;
    # with a flex score_mod's hooks 62.9 s at 64x64, 10.0 s at 32x32 (docs/kernels.md, "Tuning: fp32
    # with IEEE dots"). PyTorch's compiled flex takes 16x16 here.
    # ptxas then gives some tiles at 4 warps a collapsed allocation: the non-causal forward at 64x64
    # (head dim 128) and 64x32 (256) 32 registers and a 7.5 / 10 KB stack, the backward at 32x32 64
    # registers and 4.3 KB (causal); 24x slower than the causal forward on an H100. At 8 warps these
    # tiles spill at most 224 bytes (the build check asserts it, causal and not).
    _fp32("fwd", 64, _c(32, 64, 8, 2), "ieee"),
    _fp32("fwd", 128, _c(64, 32, 8, 2), "ieee"),
    _fp32("fwd", 256, _c(32, 32, 8, 2), "ieee"),
    _fp32("bwd", None, _b(32, 32, 32, 32, 8, 2), "ieee", when=lambda key: key.d <= 128),
    _fp32("bwd", 256, _b(16, 16, 16, 16, 8, 2), "ieee"),
    # fp32 as three TF32 products per dot (KernelOptions.fp32_dots "tf32x3"): each operand tile is
    # split into two, so the dense tiles' shared memory triples (the 64x64 forward at 3 stages asked
    # for 262144 bytes on sm_90). These tiles fit, with at most 728 bytes of stack; not yet timed.
    _fp32("fwd", 64, _c(128, 64, 8, 2), "tf32x3"),
    _fp32("fwd", 128, _c(64, 32, 4, 2), "tf32x3"),
    _fp32("fwd", 256, _c(32, 16, 4, 2), "tf32x3"),
    _fp32("bwd", None, _b(32, 32, 32, 32, 8, 2), "tf32x3", when=lambda key: key.d <= 128),
    _fp32("bwd", 256, _b(16, 16, 16, 16, 4, 2), "tf32x3"),
    # fp32 inputs: tiles take twice the space, so 64x64.
    Rule("fp32", "fwd", 128, {ANY: _c(64, 64, 4, 3)}, lambda key: key.elem > 2, elem=4),
    Rule("fp32", "bwd", 128, {ANY: _b(64, 64, 64, 64, 4, 2)}, lambda key: key.elem > 2, elem=4),
    # Key-padding masks (one mask row for all queries): a mask that keeps one run of keys is read on
    # the run's edge blocks only, so the forward is the plain one inside the run. ab.py, (4, 1, 1,
    # 4096) padding: 128x128 with TMA 568, 128x64 554, a non-EVEN 128x64 546 (docs/kernels.md,
    # "Tuning: masks").
    Rule("key_mask", "fwd", 128, {ANY: _c(128, 128, 8, 3, tma=True)}, lambda key: key.has_mask and key.mask_keys,
         dict(CAUSAL=False, HAS_MASK=True, MASK_BOOL=True, MASK_KEYS=True, KEY_RANGE=True)),
    # Full-size masks: a 128x128 forward tile with its bf16 bias tile pipelined in shared memory needs
    # 288 KiB, over the H100's 227 KiB; 128x64 is the sweep's best (208 vs 126 TFLOP/s for 64x64),
    # with the EVEN path 391 vs 339 without (bias (4, 16, 4096, 4096)); benchmarks/ab.py (medians of
    # 5 interleaved rounds through the API): with TMA loads 370.5 against 360.9. Backward with dQ
    # from the stored dS (KernelOptions.dq_from_ds): 64x64 323 against 312 for 32x64
    # (docs/kernels.md, "Tuning: masks").
    Rule("mask", "fwd", 128, {ANY: _c(128, 64, 8, 3, tma=True)}, lambda key: key.has_mask and not key.mask_keys,
         dict(CAUSAL=False, HAS_MASK=True)),
    Rule("mask", "bwd", 128, {ANY: _b(64, 64, 64, 64, 4, 2)}, lambda key: key.has_mask and not key.mask_keys,
         dict(CAUSAL=False, HAS_MASK=True, MASK_GRAD=True)),
    # Sliding windows (varlen-window, 4096 of 16384; docs/kernels.md, "Tuning: windows and packed
    # sequences"), ab.py: backward 32x64 378, head-major 64x64 350; forward 128x128 with TMA 443
    # against 416 (128x64). One loop over the window's edges left the forward where it was (448 / 443
    # / 438 against 447 / 441 / 444 in three passes), so it keeps its three loops; the backward's
    # 32-row tile too (bwd_config). Backward candidates in one loop: 64x128 373-388, head-major 64x64
    # 373-381, against 368-375 for this pick, within the passes' spread.
    Rule("window", "fwd", 128, {ANY: _c(128, 128, 8, 3, tma=True, one_loop=False)}, lambda key: key.window,
         dict(VARLEN=True, WINDOW=True, EVEN=False)),
    Rule("window", "bwd", 128, {ANY: _b(32, 64, 64, 32, 4, 3)}, lambda key: key.window,
         dict(VARLEN=True, WINDOW=True, EVEN=False)),
    # Packed causal sequences (docs/kernels.md, "Tuning: windows and packed sequences"): backward
    # through TMA descriptors, head-major 64x64 304, against 271 with pointer loads. Forward by
    # longest sequence (ab.py): mixed lengths up to 4096, 64x64 with TMA 382 against 364 for 128x64;
    # one sequence of 16384, 128x128 with TMA 504 against 482 (64x64 with TMA 475). The one-sequence
    # tile keeps one loop per band edge (one loop: 473 / 466 / 503 against 502 / 490 / 487 in three
    # passes).
    Rule("varlen", "fwd", 128, {4096: _c(64, 64, 4, 3, tma=True), 16384: _c(128, 128, 8, 3, tma=True, one_loop=False)},
         lambda key: key.varlen, dict(VARLEN=True, EVEN=False)),
    Rule("varlen", "bwd", 128, {ANY: _b(64, 64, 64, 64, 4, 2, head_major=True)}, lambda key: key.varlen,
         dict(VARLEN=True, EVEN=False)),
    # Grouped-query heads (G > 1) at S=4096, 8:1, where the winner differs from the table's
    # (docs/kernels.md, "Tuning: grouped-query heads"). D=64 causal: forward 387 TFLOP/s with 4
    # stages vs at most 348 with the 3-stage table pick; backward 64x64 3 stages, 324 through the API
    # (the 2-stage variant a kernel-only sweep preferred took 305 there). D=128 causal backward:
    # 32x64, 340 through the API (304 for the table's
    # 64x128 pick). D=128 non-causal backward: head-major orders lose with groups (a KV head's G dQ
    # heads crowd in behind its dK/dV programs: 374 against 419), so the 64x128 key-order pick.
    Rule("gqa", "fwd", 64, {ANY: _c(128, 64, 8, 4, even=False)},
         lambda key: key.group > 1 and key.seq_bucket >= 4096 and key.causal),
    Rule("gqa", "bwd", 64, {ANY: _b(64, 64, 64, 64, 4, 3)},
         lambda key: key.group > 1 and key.seq_bucket >= 4096 and key.causal),
    Rule("gqa", "bwd", 128, {ANY: _b(32, 64, 64, 32, 4, 3)},
         lambda key: key.group > 1 and key.seq_bucket >= 4096 and key.causal),
    Rule("gqa", "bwd", 128, {ANY: _b(64, 128, 128, 64, 8, 3)},
         lambda key: key.group > 1 and key.seq_bucket >= 4096 and not key.causal, dict(CAUSAL=False)),
    # The table: the best config of the H100 sweep per (kernel, head-dim class, causal) and bucket
    # (benchmarks/sweep.py; docs/kernels.md, "Tuning: dense tiles"; bf16, hidden 2048, 16k tokens).
    # Forward: a sweep with and without the EVEN path (sweep.py --even both).
    # D=64: 399 / 438 / 437 TFLOP/s at S = 1k / 4k / 16k; causal 270 / 381 / 427 (EVEN: < 270 / 377 / 416)
    Rule("table", "fwd", 64, {ANY: _c(128, 64, 8, 3)}, _causal(False), dict(CAUSAL=False)),
    Rule("table", "fwd", 64, {ANY: _c(128, 64, 8, 3, even=False)}, _causal(True)),
    Rule("table", "fwd", 128, {1024: _c(64, 64, 4, 3), 16384: _c(128, 128, 8, 3)}, _causal(False),
         dict(CAUSAL=False)),  # 436; 525 / 524
    Rule("table", "fwd", 128, {4096: _c(64, 64, 4, 3), 16384: _c(128, 128, 8, 3)}, _causal(True)),  # 333 / 436; 494
    Rule("table", "fwd", 256, {ANY: _c(64, 32, 4, 2)}),
    # Backward: TMA descriptors on (launch.use_tma).
    Rule("table", "bwd", 64, {ANY: _b(32, 128, 64, 64, 4, 3)}, _causal(False),
         dict(CAUSAL=False)),  # 336 at 4k, 361 at 16k
    # D=64 causal: swept with the direct launcher (at 1024 a dQ-by-atomics pick timed 197 and lost to
    # 223 once its fp32 dQ conversion counted).
    Rule("table", "bwd", 64, {1024: _b(32, 64, 64, 32, 4, 3), 4096: _b(32, 128, 128, 32, 4, 3),
                              16384: _b(32, 128, 64, 64, 4, 3)}, _causal(True)),  # 223, 325, 354
    # D=128: a sweep with the head-major program order (HM), kept where the public API bench
    # agreed. Non-causal: HM 64x64, sweep 369 / 459 at 1k / 4k (non-HM 344 / 421),
    # API 376 / 403 (old pick 333 / 394); 443 at 16k. Causal: HM 64x64 at 16k, sweep 418 (old pick
    # 392), API 426 (424). At 1k / 4k the sweep's picks (HM 64x64 272, 64x64 376) lost through
    # the API (210 / 359 against 256 / 381 for the old picks), so those stay at 4k. At 1k the API
    # sweep (sweep.py --api) and the kernel sweep both put HM 64x64 first (266 / 271; 32x64 at most
    # 250 / 252).
    Rule("table", "bwd", 128, {4096: _b(64, 64, 64, 64, 4, 2, head_major=True), 16384: _b(64, 128, 128, 64, 8, 3)},
         _causal(False), dict(CAUSAL=False)),
    Rule("table", "bwd", 128, {1024: _b(64, 64, 64, 64, 4, 2, head_major=True), 4096: _b(64, 128, 128, 64, 8, 3),
                               16384: _b(64, 64, 64, 64, 4, 2, head_major=True)}, _causal(True)),
    Rule("table", "bwd", 256, {ANY: _b(16, 64, 64, 16, 4, 2)}),
    # The Gluon dK / dV kernel (ws_bwd.py), then the core's dQ programs alone (DQ_ONLY): H100 kernel
    # times (torch.profiler; docs/kernels.md, "Tuning: the Gluon dK / dV kernel"), Gluon + dQ
    # programs against the core's one launch, us:
    # window 4096 of 16k 2461 / 2793, one packed 16k causal sequence 5270 / 5749, dense causal 16k
    # 5079 / 5801, 4k 1605 / 1730, non-causal 16k 11209 / 12606, 4k 2829 / 2864; at S=1024 the core
    # (607 against 652 causal: tiles of 8 query blocks pay the Gluon kernel's per-tile cost). The dQ
    # programs alone: 128x64 tiles, 8 warps, 3 stages (window 1112 us, against 1237 for 64x32 and 1288
    # for 128x128; full causal 2421 against 2758 for 64x64). Sequence buckets below
    # KernelOptions.bwd_ws_min_seq_bucket (default WS_BWD_MIN_SEQ_BUCKET) stay on the core.
    Rule("dq_only", "dq_only", 128, {ANY: _b(64, 128, 128, 64, 8, 3)}, flags=dict(DQ_ONLY=True, HEAD_MAJOR=False)),
]
WS_BWD_MIN_SEQ_BUCKET = 4096
# A model's (B, L, H, D) row views run as B packed sequences on the Gluon kernels (launch._rows_packed),
# except a causal forward of fewer queries than this, which the core's strided dense call serves:
# H100, D=128, B=2, H=16, S=1024 causal (benchmarks/ab.py d128-causal-views@1024, 2026-12-05):
# 343 TFLOP/s strided against 225 packed; at 4096 packed leads, 534 against 431. The backward
# stays packed (1024: 160 against 147).
ROWS_PACKED_CAUSAL_FWD_MIN_L = 2048


def rule_for(key: Key) -> Rule | None:
    """The first rule of RULES that matches ``key``."""
    return next((r for r in RULES if r.matches(key)), None)


def head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def ws_backward(block_d: int, seq_bucket: int, min_seq_bucket: int = WS_BWD_MIN_SEQ_BUCKET) -> triton.Config | None:
    """The dQ programs' config when a backward at padded head dim ``block_d`` and sequence bucket
    (launch.seq_bucket of the longer length) should take the Gluon dK / dV kernel, else None."""
    if seq_bucket < min_seq_bucket:
        return None
    rule = rule_for(Key("dq_only", head_dim_class(block_d), seq_bucket=seq_bucket))
    return rule.config(seq_bucket) if rule is not None else None


def forward_tma(asked: bool, flags: dict) -> tuple[bool, bool]:
    """Whether the forward reads (K and V, a float mask's) tiles through TMA descriptors, before
    the copy-engine check: as ``asked`` (a config's ``tma``, or KernelOptions.fwd_tma), never for a
    paged pool; the mask's tiles only for a float mask with rows (not bool, not one row of keys)."""
    kv = asked and not flags.get("PAGED", False)
    return kv, kv and flags.get("HAS_MASK", False) and not flags.get("MASK_BOOL") and not flags.get("MASK_KEYS")


def heuristic(kind: str, block_d: int, l_bucket: int | None = None, flags: dict | None = None,
              elem: int = 2, seq_bucket: int = 16384, group: int = 1) -> triton.Config:
    """The fixed config for ``kind`` ("fwd" or "bwd") at padded head dim ``block_d``, given the
    launch's feature ``flags`` (CAUSAL, WINDOW, VARLEN, HAS_MASK, MASK_KEYS, DOT_PRECISION), the
    input element size, the sequence-length bucket (launch.seq_bucket) and the query heads per KV
    head: the first rule of RULES that matches."""
    f = flags or {}
    return _first_rule(kind, head_dim_class(block_d), bool(f.get("CAUSAL")), bool(f.get("WINDOW")),
                       bool(f.get("VARLEN")), bool(f.get("HAS_MASK")), bool(f.get("MASK_KEYS")), l_bucket, elem,
                       seq_bucket, group, f.get("DOT_PRECISION", "tf32"))


@functools.lru_cache(maxsize=4096)
def _first_rule(*fields) -> triton.Config:
    """heuristic's answer per Key (cached: the launchers ask once per call, and RULES is fixed)."""
    key = Key(*fields)
    rule = rule_for(key)
    if rule is None:
        raise ValueError(f"no fixed config for {key}")
    return rule.config(key.seq_bucket)


# Every block size divides EVEN_TILE, so L and S that are multiples of it need no bounds masks
# in the backward's loops (core.attn_bwd's EVEN), and every query block of the backward reads
# whole blocks of its padded NLSE2 / Delta rows (core.STAT_PAD, the same 128).
EVEN_TILE = 128
_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
assert all(EVEN_TILE % c.kwargs[k] == 0 for c in FWD_CONFIGS + BWD_CONFIGS + [c for r in RULES for c in r.configs()]
           for k in _BLOCKS if k in c.kwargs)


def flex_tile(block_n: int, stages: int, warps: int, block_d: int, one_loop: bool = False,
              precision: str = "tf32") -> tuple[int, int, int]:
    """(BLOCK_N, stages, warps) of the flex forward (core.attn_fwd FLEX) from a dense forward
    config's: its three key loops (partial, full, ragged full block) each hold pipeline buffers, so
    at most 2 stages (the dense config's with ``one_loop``: KernelOptions.flex_one_loop), and
    BLOCK_N <= 64 from head dim 128 up. The sm_90 build at 128x128, 3 stages
    asked for 360448 bytes of shared memory (a score_mod and a mask_mod); 128x64 at 2 stages for
    131584. From head dim 128 up, 4 warps: on an H100 (B=2, H=16, S=8192, D=128, bf16;
    benchmarks/flex_tiles.py, docs/flex.md "Tiles") 128x64 with 4 warps against 8 timed causal
    1.651 against 1.962 ms, ALiBi + causal 1.854 against 2.151, a document mask 0.669 against 0.753.
    ``precision`` (the launch's DOT_PRECISION) "ieee" or "tf32x3" (fp32 without allow_tf32): the
    "fp32_ieee" / "fp32_tf32x3" rule's tile as it is, at most 2 stages: at 4 warps ptxas collapses some
    IEEE builds' registers (the rules' comments)."""
    if fp32_rule(precision):
        return block_n, min(stages, 2), warps
    if block_d >= 128:
        block_n, warps = min(block_n, 64), 4
    return block_n, (stages if one_loop else min(stages, 2)), warps


def fp32_rule(precision: str) -> bool:
    """Whether a launch's DOT_PRECISION takes one of the fp32 precision rules' tiles as they are
    ("ieee", "tf32x3"), in the flex kernels too, and never the autotuner's."""
    return precision in ("ieee", "tf32x3")


def flex_bwd_tile(meta: dict, stages: int, warps: int, block_d: int, one_loop: bool = False,
                  precision: str = "tf32") -> tuple[dict, int, int]:
    """(tiles, stages, warps) of the flex backward (core.attn_bwd FLEX) from a dense backward
    config's: its dQ programs run three key loops and its dK/dV programs two (partial and full
    blocks), each holding pipeline buffers, so at most 2 stages (the dense config's with
    ``one_loop``: KernelOptions.flex_bwd_one_loop). From head dim 128 up, tiles at
    most 64 on both sides with 4 warps: at head dim 128 (64x64) on an H100 (as ``flex_tile``'s)
    forward + backward timed causal 6.110 against 6.604 ms with 64x128 / 128x64 and 8 warps, ALiBi
    + causal 7.048 against 7.325. Never larger than the dense config's tiles: head dim 256 keeps
    its 16 / 64 / 64 / 16 (with a score_mod, 64x64 there built to 163844 bytes of shared memory on
    sm_80 and 216064 on sm_90, against 90116 and 104452: past the 99 KiB of sm_86 / sm_89).
    ``precision``: fp32's precision rules' tiles and warps as they are (``flex_tile``)."""
    meta = dict(meta)
    if fp32_rule(precision):
        return meta, min(stages, 2), warps
    if block_d >= 128:
        meta = {key: min(val, 64) for key, val in meta.items()}
        warps = 4
    return meta, (stages if one_loop else min(stages, 2)), warps

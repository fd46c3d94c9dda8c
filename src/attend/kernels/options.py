"""The launch layer's tuning choices, as one frozen value per call instead of module globals.

``KernelOptions`` holds every choice the launchers make beyond the fixed configs of
``configs.RULES``: a field left at None means "as the fixed config (or the device) says". The
options in force come from a ``ContextVar`` (``kernel_options``, the same pattern as
``sdpa_kernel``'s state: per thread and per asyncio task, restored on exit), or per call: the
launchers take ``options=`` (flex passes its ``kernel_options`` that way). A backward runs with the
options its forward ran with (the ops layer carries them across; autograd may run the backward on
another thread).

The environment (``ATTEND_AUTOTUNE``, ``TRITON_INTERPRET``) is read when options are built, not
when attend is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no triton import here: the ops layer reads these options without it
    import triton


def _env_autotune() -> bool:
    return os.environ.get("ATTEND_AUTOTUNE", "0") == "1"


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelOptions:
    """Every tuning choice of the Triton launchers. None: as the fixed config (``configs.RULES``)
    or the device decides."""

    # The fixed configs (configs.heuristic, from the H100 sweep) unless ATTEND_AUTOTUNE=1, which
    # benchmarks the candidate configs once per key instead (about a minute per new key).
    autotune: bool = dataclasses.field(default_factory=_env_autotune)
    # Under TRITON_INTERPRET=1 the launchers use configs.INTERPRET_TILE (tests on the CPU).
    interpret: bool = dataclasses.field(default_factory=_env_interpret)
    # A config that replaces the fixed one of every forward / backward launch (benchmarks/sweep.py
    # and ab.py time candidates through it). Its flags still pass through the overrides below.
    fwd_config: triton.Config | None = None
    bwd_config: triton.Config | None = None
    # True/False overrides the fixed configs' dQ strategy (dQ added by atomics in the dK/dV
    # programs, or dQ programs). Deterministic mode always wins: no atomics then.
    dq_atomic: bool | None = None
    # True/False overrides whether the backward reads through TMA tensor descriptors (tests run the
    # descriptor path under the interpreter with it; the H100 sweep times both). Only the unit last
    # stride, which the kernels' descriptors assume, is checked then.
    tma: bool | None = None
    # True/False overrides the backward's program order (core.attn_bwd's HEAD_MAJOR); the flex
    # backward is head-major where it walks a BlockMask's lists and key-block major on a band's
    # loops unless this says otherwise.
    head_major: bool | None = None
    # A full-size float mask's gradient is dS itself; with this on, the backward launches no dQ
    # programs for it and computes dQ = scale * dS @ K as one batched GEMM on the stored dS (one
    # product instead of the dQ programs' three, and no second read of the mask). H100, bias
    # (4, 16, 4096, 4096) with grad: 272 TFLOP/s against 227 with dQ programs (docs/kernels.md,
    # "Tuning: masks").
    dq_from_ds: bool = True
    # Packed calls launch one program per block that exists, from host-built lists ordered heaviest
    # first (worklist.py; core's WORKLIST), instead of cdiv(max length, block) slots per sequence,
    # most of which exit at once when lengths are mixed (60% of the varlen benchmark's grid), and in
    # whatever order the caller packed its sequences. Off: on the H100 it timed 351 / 283 TFLOP/s
    # against 373 / 288 without (docs/kernels.md, "Tuning: windows and packed sequences";
    # benchmarks/sweep.py --worklist re-times it).
    varlen_worklist: bool = False
    # The forward reads K and V (and the tiles of a float mask with rows) through TMA tensor
    # descriptors where the copy engine can read them (launch.use_tma; never paged), instead of
    # pointer loads: fewer address computations per iteration (one copy per tile, issued by one
    # thread) and no bounds masks. None: as the fixed config asks (configs.fwd_config's ``tma``: the
    # masks, varlen and window tiles, where the H100 measured it faster; dense tiles lose with it,
    # 492 vs 515 TFLOP/s at D=128, S=16k); True / False force it.
    fwd_tma: bool | None = None
    # The kernels run a band's edge blocks (causal diagonal, window edges) in the same loop as its
    # inner blocks, masking them under a branch (core's ONE_LOOP), instead of one loop per edge (each
    # loop pays its own pipeline fill and drain), where the fixed config says so (configs'
    # ``one_loop``); True / False override it. The forward takes it only where its loads need no
    # bounds masks (TMA or EVEN).
    fwd_one_loop: bool | None = None
    bwd_one_loop: bool | None = None
    # Most sm_90 D = 128 forwards (any band and length, no mask or a full-size float bias, packed
    # sequences of one query length; ws.eligible says which) take the persistent warp-specialized
    # Gluon kernel (ws.py, which cites its measurements). False: the core serves every call.
    fwd_ws: bool = True
    # Their backwards without a mask (ws_bwd.eligible) take the Gluon dK / dV kernel (ws_bwd.py), then
    # the core's dQ programs alone (core's DQ_ONLY), from this sequence bucket up (None:
    # configs.WS_BWD_MIN_SEQ_BUCKET). False: the core's one launch serves every backward.
    bwd_ws: bool = True
    bwd_ws_min_seq_bucket: int | None = None
    # There, the Gluon kernel also adds dQ, FlashAttention 3's way (ws_bwd.py's FUSED_DQ: each step's
    # dS through shared memory, dQ's partial tile by a TMA reduce-add into fp32), and no dQ programs
    # run: 5 products per tile pair instead of 7. Never in deterministic mode (the adds' order varies).
    # On an H100 (2026-12-08; RESULTS.md): the causal backward 1.621 against 1.660 ms at S=4096, D=128,
    # 2.794 against 3.007 at 8192; non-causal 4096 even.
    bwd_ws_fused_dq: bool = True
    # Flex over a BlockMask's lists of 128 x 128 blocks (a document or prefix-LM mask) runs its forward
    # on the Gluon kernel, walking the key-side lists (ws's LISTS; launch.flex_lists_gluon_refusal), the
    # mask_mod on partial blocks: on an H100, the 8-document forward at S=8192 0.257 against the core's
    # 0.386 ms.
    flex_gluon_lists: bool = True
    # ... and its backward's dK / dV (and, with bwd_ws_fused_dq, dQ) on the Gluon kernel, walking the
    # query-side lists (ws_bwd's LISTS; launch.flex_dkdv_refusal). Off: on that H100, 1.213 ms (1.412
    # with the fused dQ) against the core's 1.157.
    flex_gluon_lists_bwd: bool = False
    # A model's (B, H, L, D) views of its (B, L, H, D) projections (``_layout.rows_call``) run as B
    # packed sequences of one length, whose (T, H * D) rows the Gluon kernels read through TMA as
    # they do varlen calls', where the Gluon forward (the dK / dV kernel, for the backward) serves
    # them; elsewhere they run as dense strided calls of the core. True: always packed (the core's
    # packed mode where Gluon does not serve: tests run it under the interpreter); False: never.
    rows_packed: bool | None = None
    # Where rows_packed is None, a causal forward of fewer queries than this runs strided on the core
    # instead (None: configs.ROWS_PACKED_CAUSAL_FWD_MIN_L, from an H100 measurement; 0: always packed).
    rows_packed_causal_fwd_min_l: int | None = None
    # A row-view q (``_layout.rows_call``) with contiguous K / V (a KV cache's: what a transformers
    # model passes with its DynamicCache) takes the Gluon forward and dK / dV kernels reading Q, O and
    # dO as (B * L, H * D) rows (their Q_ROWS mode), where they serve, instead of the core's strided
    # dense call. H100, D=128, B=2, H=16 (benchmarks/ab.py, 2026-12-05), TFLOP/s Q_ROWS against
    # strided: causal 4k forward 526 / 431, backward 405 / 374; non-causal 16k 589 / 539, 471 / 417.
    rows_q_gluon: bool = True
    # The Gluon forward stores whole 64-row output blocks by one TMA store through the consumer's
    # finished Q buffer (ws.py); False: gl.store from registers.
    o_tma: bool = True
    # The Gluon forward's consumers issue the next key block's QK product before this block's PV
    # product, so it runs during this block's softmax (ws.py's PIPE). H100, bf16, D=128 (2026-12-07,
    # docs/kernels.md, "Tuning: the Gluon forward"): causal 16k 1.840 ms against 2.075, no mask 4k
    # 0.948 against 1.033, a float bias 1.194 against 1.301. With a score hook, in alternating
    # processes (RESULTS.md, "H100, 2026-12-07 (late)"): softcap + causal 1.175 against 1.221, ALiBi
    # 1.150 against 1.157. Its build takes longer (a softcap hook's 1.6 -> 2.8 s on a 2-core CPU),
    # which a flex mod's first call waits for, so None: on without a score hook, off with one;
    # True / False: always.
    fwd_ws_pipeline: bool | None = None
    # A flex forward that autograd will differentiate, on CUDA, first starts compiling its backward's
    # kernel on a worker thread (``_flex.dispatch._backward_warmup``), so a new mod's compiles
    # overlap (in forked processes: ``compile_fork``) instead of running one after the other, sm_90
    # target: 2.0 s forward and 4.5 s backward one after the other, 4.5 s for both side by side
    # (docs/flex.md, Not yet). False: the backward compiles when it first runs.
    flex_bwd_precompile: bool = True
    # The warmup's compiles run in processes forked from its thread (kernels/forkcompile.py), which
    # hand each kernel back through Triton's disk cache, so they build beside the forward's compile
    # instead of taking turns with it on the GIL. False: on the warmup threads themselves.
    compile_fork: bool = True
    # The flex forward walks a BlockMask's partial and full key blocks in one loop, the mask_mod and
    # bounds masks under per-block branches (core's FULL_LIST), instead of three loops (partial,
    # full, a ragged full block), which leaves the shared memory of one pipeline and so room for
    # more stages (configs.flex_tile). Off: on an H100 (benchmarks/flex_tiles.py --set bands, 2026-12-05,
    # the default tiles) the document forward took 1.34 ms against 0.485 with three loops, prefix-LM
    # 1.87 against 1.34 (with its best tiles it had been within the spread of three loops).
    flex_one_loop: bool = False
    # The same for the flex backward: its dQ programs' three key loops and its dK / dV programs' two
    # query loops become one each (configs.flex_bwd_tile then keeps the dense config's stages). Off:
    # forward + backward on an H100 (as above) 7.08 ms at best against 6.33 (causal), 7.66 / 7.21
    # (ALiBi + causal), 2.59 / 2.35 (document).
    flex_bwd_one_loop: bool = False
    # The flex backward as two launches, the dK / dV programs then the dQ programs (core's
    # DKDV_ONLY / DQ_ONLY), each kernel built with only its programs' code, so a new mod's two
    # halves compile side by side on the warmup threads. Off: on an H100 (benchmarks/RESULTS.md,
    # "Decisions timed the same evening") a new mod's first forward + backward took 7.57 s against
    # 8.94, but the steady backward's medians were 1-4% slower in four of five flex cases; turn it
    # on where first-call latency matters more than step time.
    flex_bwd_split: bool = False
    # The flex forward with TMA reads runs two key loops instead of three: the full block that
    # reaches past S (a ragged end) joins the full blocks' loop, its keys past S dropped under a
    # per-step branch (core._flex_lists' RAGGED_IN_FULL; TMA zero-fills them), so the kernel holds
    # one loop body fewer. sm_90 build of the forward with a softcap + ALiBi + table score_mod and a
    # document + causal mask_mod (2-core CPU, empty caches, two rounds): 2.48 / 2.55 s against
    # 3.27 / 3.39, PTX 9407 lines against 12614, spill stores 660 bytes against 788 (ptxas -v).
    # Off: the steady forward was 2-3% slower on an H100 (document 0.498 against 0.485 ms, prefix-LM
    # 1.364 against 1.340; benchmarks/RESULTS.md, "Band hooks against the lists"): the branch sits
    # in every full-block step.
    flex_ragged_in_full: bool = False
    # The flex forward reads K and V through TMA tensor descriptors at each listed key block, where
    # the copy engine can read them (launch.use_tma: sm_90 and up), instead of pointer loads.
    # flex_attention's kernel_options key USE_TMA (PyTorch's) overrides it per call, and ``tma``
    # above, where set, both. H100, B=2,
    # H=16, S=8192, D=128 (benchmarks/flex_tiles.py --set loop, 2026-12-05), ms with / without:
    # causal 1.523 / 1.727, ALiBi + causal 1.835 / 1.983, document 0.687 / 0.683.
    flex_tma: bool = True
    # A flex call whose only mod is a band mask_mod (causal, a sliding window: a function of
    # q_idx - kv_idx keeping one interval of it around the diagonal; _flex/band.py), with a
    # BlockMask create_block_mask built from it, no kernel_options and no max_scores asked, runs
    # attend's dense fused path over that band (on Hopper the Gluon kernels) instead of the core's
    # flex mode (docs/flex.md, "Band masks"); with a score_mod, the core's kernels walk the band with
    # the score hooks instead of the lists. False: the lists, as for any other mask. On an H100
    # (benchmarks/RESULTS.md, 2026-12-05 late; B=2, H=16, S=8192, D=128, ms forward / backward):
    # causal 0.963 / 2.934 against 1.312 / 4.440 on the lists, a 1024 window 0.286 / 1.011 against
    # 0.554 / 1.630, ALiBi + causal 1.34 / 4.30 against 1.65 / 5.19.
    flex_bands: bool = True
    # fp16 / bf16 flex calls on a GPU compute a score_mod's tanh (a softcap) with the hardware's
    # tanh.approx.f32 (relative error about 2^-11, inside a 16-bit input's rounding) instead of an
    # exp and a division (_flex/codegen.py). fp32 calls and the interpreter always take the exact form.
    flex_fast_tanh: bool = True
    # The gradient of a score_mod's relative-position table (one captured tensor indexed by
    # q_idx - kv_idx, over a band) from programs that each own one block diagonal
    # (core._diagonal_pass: two products per tile, the tiles added, one skew per diagonal of blocks)
    # instead of the dQ programs' skew and atomics per tile (codegen._diagonals). Off: on an H100
    # (benchmarks/RESULTS.md, "The relative-position table's backward: the diagonal pass against the
    # dQ programs' scatter"; B=2, H=16, S=8192, D=128, causal) 11.50 / 11.40 ms against the
    # scatter's 10.76 / 11.58, alternating: the recomputed products cost what the skew saved.
    flex_diagonal_pass: bool = False
    # The score hooks over a band (flex_bands) run on the Gluon forward (ws.py) where it serves the
    # call (sm_90, D = 128, fp16 / bf16, ws.eligible's layouts; no max_scores or kernel_options
    # asked), and the backward's dK / dV on the Gluon kernel (ws_bwd.py; contiguous tensors, no
    # capture that needs a gradient), else on the core's. False: always the core's (docs/flex.md,
    # "Band masks"). H100, B=2, H=16, S=8192, D=128, ms forward / backward against the core's:
    # ALiBi + causal 1.266 / 3.602 against 1.361 / 4.119, softcap + causal 1.263 / 4.503 against
    # 1.392 / 4.549; a new mod's first call 5.7-6.6 s against 3.8-4.9 (benchmarks/RESULTS.md, "The
    # score hooks on the Gluon kernels").
    flex_gluon: bool = True
    # A flex call of a class a decode plan was made for (_flex/plan.py: a score_mod, no block_mask, no
    # kernel_options, nothing that needs a gradient, the core's band hooks) launches that plan: its
    # path, hooks, tiles and constexprs decided once per class, not per call. A Gemma 2 decode call
    # on the 2-core CPU with the launch stubbed: 64-70 us of host time against 95-97 without.
    flex_plans: bool = True
    # fp32 dots where ``torch.backends.cuda.matmul.allow_tf32`` is off (PyTorch's default): "ieee",
    # exact, as PyTorch computes them (Triton's FMA loops on the CUDA cores: 4-9 TFLOP/s at D=128 on
    # an H100, where PyTorch's efficient kernel runs 44-46 on an H200; benchmarks/RESULTS.md,
    # "H100 and H200, 2026-12-07 (evening)"), or "tf32x3": each product as three TF32 tensor-core
    # products (hi * hi + hi * lo + lo * hi of each operand's split; about 22 of fp32's 24 bits per
    # product), configs' "fp32_tf32x3" tiles. Not yet timed or checked for accuracy on a GPU.
    fp32_dots: str = "ieee"

    def __post_init__(self):
        if self.fp32_dots not in ("ieee", "tf32x3"):
            raise ValueError(f"KernelOptions.fp32_dots must be 'ieee' or 'tf32x3', got {self.fp32_dots!r}")

    def replace(self, **changes) -> "KernelOptions":
        """A copy with ``changes`` (field names of this class)."""
        unknown = sorted(set(changes) - _FIELDS)
        if unknown:
            raise TypeError(f"unknown kernel option(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
        return dataclasses.replace(self, **changes)


_FIELDS = frozenset(f.name for f in dataclasses.fields(KernelOptions))
_OPTIONS: contextvars.ContextVar[KernelOptions | None] = contextvars.ContextVar("attend_kernel_options", default=None)
_DEFAULTS: dict[tuple, KernelOptions] = {}


def current() -> KernelOptions:
    """The options in force: those of the innermost ``kernel_options`` block, else the defaults
    under the environment as it is now."""
    opts = _OPTIONS.get()
    if opts is not None:
        return opts
    env = (os.environ.get("ATTEND_AUTOTUNE"), os.environ.get("TRITON_INTERPRET"))
    opts = _DEFAULTS.get(env)
    if opts is None:
        opts = _DEFAULTS[env] = KernelOptions()
    return opts


def hold() -> contextvars.Token | None:
    """Fix the options in force until ``release(token)``: ``current()`` then returns them without
    reading the environment again (a call that asks for them several times; a flex decode call did
    six times). None where a ``kernel_options`` / ``use`` block already fixes them."""
    if _OPTIONS.get() is not None:
        return None
    return _OPTIONS.set(current())


def release(token: contextvars.Token | None) -> None:
    """End a ``hold``."""
    if token is not None:
        _OPTIONS.reset(token)


def resolve(options: KernelOptions | dict | None) -> KernelOptions:
    """A launcher's ``options=`` argument: None (the options in force), a ``KernelOptions``, or a
    dict of overrides applied to the options in force (flex's ``kernel_options``)."""
    if options is None:
        return current()
    if isinstance(options, KernelOptions):
        return options
    if isinstance(options, dict):
        return current().replace(**options)
    raise TypeError(f"options must be a KernelOptions, a dict of its fields or None, got "
                    f"{type(options).__name__}: {options!r}")


@contextlib.contextmanager
def use(options: KernelOptions | None) -> Iterator[KernelOptions]:
    """Run the block with exactly ``options`` (None: the defaults), e.g. a backward with its
    forward's options."""
    token = _OPTIONS.set(options)
    try:
        yield current()
    finally:
        _OPTIONS.reset(token)


@contextlib.contextmanager
def kernel_options(**changes) -> Iterator[KernelOptions]:
    """Change kernel options (``KernelOptions``' fields) inside the ``with`` block; blocks nest, and
    the previous options come back on exit, also when the block raises. Per thread and per asyncio
    task (a ``ContextVar``).

    Example::

        with kernel_options(fwd_ws=False, bwd_one_loop=True):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()
    """
    with use(current().replace(**changes)) as opts:
        yield opts

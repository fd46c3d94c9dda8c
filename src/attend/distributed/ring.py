"""Ring attention over ``torch.distributed``: the communication, the autograd function and
``context_parallel_attention``.

Forward, on each of the ``N`` ranks: step ``t`` attends the local queries to the K/V shard of
rank ``rank - t`` while that shard is already being passed on to rank ``rank + 1`` (and the next
one received from ``rank - 1``); each block's ``(out, lse)`` is merged into float32 accumulators
by ``blocks.merge_``. Backward: the same ring, each block recomputed from the GLOBAL ``out`` and
``lse`` (so ``delta = rowsum(dO * O)`` is the whole row's); dQ stays local, and each visiting
shard's dK/dV travels with it, gathering every rank's contribution, until a last hop returns it
to its owner. With FlexAttention mods the blocks are ``flex.FlexBlocks``; the gradients of a
score_mod's trained captures are summed over blocks and steps, then all-reduced over the group.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import flex
from .blocks import FusedBlocks, Mask, BlockAttention, merge_, plan
from .layout import LAYOUTS, check_layout, chunks_per_rank, padded_length


def _dist():
    import torch.distributed as dist

    return dist


def group_rank_and_size(group, caller: str) -> tuple[int, int]:
    """This process's rank in ``group`` (the default group when None) and the group's size; an error
    when there is no initialized process group or this process is not in ``group``."""
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError(f"{caller}: this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(f"{caller}: no process group is initialized; call "
                           "torch.distributed.init_process_group() first (torchrun sets up its environment), "
                           "or pass rank= and world_size= to shard and pad_for_sharding")
    rank = dist.get_rank(group)
    if rank < 0:
        ranks = dist.get_process_group_ranks(group)
        raise ValueError(f"{caller}: this process (global rank {dist.get_rank()}) is not a member of group, "
                         f"whose global ranks are {ranks}")
    return rank, dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# Communication


class _Pending:
    """Tensors in flight from the previous rank; ``wait`` returns them, usable on the current stream."""

    def __init__(self, works, received, stream):
        self.works, self.received, self.stream = works, received, stream

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        if self.stream is not None:  # the compute stream waits for the side stream, the host does not
            torch.cuda.current_stream(self.received[0].device).wait_stream(self.stream)
        return self.received


class Ring:
    """P2P between ring neighbours of ``group``: ``pass_on`` sends tensors to ``rank + 1`` and
    receives as many of the same shapes from ``rank - 1``, asynchronously.

    On CUDA the operations are issued from a side stream that first waits for the compute stream
    (so what is sent is ready) and that the compute stream waits for only in ``_Pending.wait``:
    the transfer of the next block runs while the current one is attended. NCCL runs them on
    its own stream either way; the side stream keeps the compute stream free of their waits.
    A peer that never answers fails the wait after the process group's ``timeout``.
    """

    _streams: dict = {}

    def __init__(self, group, rank: int, size: int, device: torch.device):
        dist = _dist()
        self.group, self.rank, self.size = group, rank, size
        self.next = dist.get_global_rank(group, (rank + 1) % size) if group is not None else (rank + 1) % size
        self.prev = dist.get_global_rank(group, (rank - 1) % size) if group is not None else (rank - 1) % size
        self.stream = None
        if device.type == "cuda":
            key = (device.index, id(group))
            if key not in Ring._streams:
                Ring._streams[key] = torch.cuda.Stream(device=device)
            self.stream = Ring._streams[key]

    def pass_on(self, tensors: list[torch.Tensor]) -> _Pending:
        dist = _dist()
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        if self.stream is None:
            return _Pending(dist.batch_isend_irecv(ops), received, None)
        self.stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
        for t in (*tensors, *received):  # used on the side stream: not reused before it is done
            t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            works = dist.batch_isend_irecv(ops)
        return _Pending(works, received, self.stream)


# ---------------------------------------------------------------------------------------------
# Statistics (a debug hook)


@dataclass(frozen=True)
class RingStats:
    """One pass of one call on this rank: ``steps`` ring steps, ``blocks`` attention calls made,
    ``pairs`` (query chunk, key chunk) pairs met and ``empty_pairs`` of them that the mask left
    empty, skipped without a kernel call."""

    direction: str
    steps: int
    blocks: int
    pairs: int
    empty_pairs: int


_STATS: contextvars.ContextVar[list | None] = contextvars.ContextVar("attend_ring_stats", default=None)


@contextlib.contextmanager
def record_ring_stats() -> Iterator[list[RingStats]]:
    """Collect a ``RingStats`` for the forward and the backward pass of every call made inside the
    block (a call's backward reports to the list wherever and whenever autograd runs it)::

        with record_ring_stats() as stats:
            out = context_parallel_attention(q, k, v, is_causal=True)
        stats[0].empty_pairs  # 2N - 1 per rank for causal zigzag
    """
    stats: list[RingStats] = []
    token = _STATS.set(stats)
    try:
        yield stats
    finally:
        _STATS.reset(token)


def _record(sink: list | None, direction: str, steps) -> None:
    if sink is not None:
        sink.append(RingStats(direction, len(steps), sum(len(s.blocks) for s in steps),
                              sum(s.pairs for s in steps), sum(s.empty_pairs for s in steps)))


# ---------------------------------------------------------------------------------------------
# The ring passes


@dataclass(frozen=True)
class _Config:
    ring: Ring | None  # None: one rank, no communication
    steps: tuple
    blocks: BlockAttention
    scale: float
    stats: list | None = None  # record_ring_stats' list at the call (the backward may run on another thread)
    captures: tuple = ()  # tensors the blocks read that receive gradients (a score_mod's trained captures)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t.narrow(2, a, b - a)


def ring_forward(q, k, v, cfg: _Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the local queries against every rank's K/V: out ``(B, Hq, L, Ev)`` in q's
    dtype, lse ``(B, Hq, L)`` float32 (float64 for float64 inputs)."""
    B, H, L, _ = q.shape
    acc = torch.zeros((B, H, L, v.shape[-1]), dtype=_acc_dtype(q.dtype), device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=acc.dtype, device=q.device)
    kv = [k, v]
    for t, step in enumerate(cfg.steps):
        pending = cfg.ring.pass_on(kv) if cfg.ring is not None and t < len(cfg.steps) - 1 else None
        for blk in step.blocks:
            o, l = cfg.blocks.forward(_rows(q, blk.q0, blk.q1), _rows(kv[0], blk.k0, blk.k1),
                                      _rows(kv[1], blk.k0, blk.k1), blk, cfg.scale)
            merge_(_rows(acc, blk.q0, blk.q1), lse[..., blk.q0:blk.q1], o, l)
        if pending is not None:
            kv = pending.wait()
    _record(cfg.stats, "forward", cfg.steps)
    return acc.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, cfg: _Config):
    """``(dq, dk, dv)`` for this rank's shards."""
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [k, v]
    travelling = None  # dK/dV of the visiting shard, from the ranks it visited before
    n = len(cfg.steps)
    for t, step in enumerate(cfg.steps):
        pending = cfg.ring.pass_on(kv) if cfg.ring is not None and t < n - 1 else None
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for blk in step.blocks:
            qr = slice(blk.q0, blk.q1)
            g = cfg.blocks.backward(_rows(dout, blk.q0, blk.q1), _rows(q, blk.q0, blk.q1),
                                    _rows(kv[0], blk.k0, blk.k1), _rows(kv[1], blk.k0, blk.k1),
                                    _rows(out, blk.q0, blk.q1), lse[..., qr], blk, cfg.scale)
            _rows(dq, blk.q0, blk.q1).add_(g[0])
            _rows(dk, blk.k0, blk.k1).add_(g[1])
            _rows(dv, blk.k0, blk.k1).add_(g[2])
        if travelling is not None:
            dk_in, dv_in = travelling.wait()
            dk.add_(dk_in)
            dv.add_(dv_in)
        # To the next rank, which holds this shard next step; after the last step, to its owner.
        travelling = cfg.ring.pass_on([dk, dv]) if cfg.ring is not None else None
        if pending is not None:
            kv = pending.wait()
    if travelling is not None:
        dk, dv = travelling.wait()
    _record(cfg.stats, "backward", cfg.steps)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def capture_gradients(cfg: _Config) -> list[torch.Tensor]:
    """The gradients of ``cfg.captures`` after ``ring_backward``: this rank's blocks' sum, all-reduced
    (summed) over the group, since every rank's blocks read the same (replicated) tensors."""
    grads = list(cfg.blocks.capture_grads)
    if cfg.ring is not None:
        for g in grads:
            _dist().all_reduce(g, group=cfg.ring.group)
    return [g.to(t.dtype) for g, t in zip(grads, cfg.captures)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config, *captures):
        from ..kernels import options as kernel_options

        out, lse = ring_forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        ctx.kernel_options = kernel_options.current()
        return out

    @staticmethod
    def backward(ctx, dout):
        from ..kernels import options as kernel_options

        q, k, v, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        if cfg.captures:
            cfg.blocks.begin_backward()
        with kernel_options.use(ctx.kernel_options):  # the forward's (autograd may run this on another thread)
            dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, cfg)
        caps = capture_gradients(cfg) if cfg.captures else []
        return (dq, dk, dv, None, *(g if need else None for g, need in zip(caps, ctx.needs_input_grad[4:])))


# ---------------------------------------------------------------------------------------------
# The public function


def _check_tensors(q, k, v, enable_gqa: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must be (..., H, L, E) with at least 3 dims, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, but q is {q.dtype} on {q.device}")
        if t.shape[:-3] != q.shape[:-3] or t.shape[-2] != q.shape[-2]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, q {tuple(q.shape)}: batch dims and this rank's "
                             "sequence length (dim -2) must match (context parallelism shards one sequence of "
                             "queries and keys the same way)")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on every dim but the last, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv and not enable_gqa:
        raise ValueError(f"q has {hq} heads and k/v {hkv}; pass enable_gqa=True for grouped-query attention")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads and k/v {hkv}; {hq} is not a multiple of {hkv}")


def _check_options(is_causal, scale, enable_gqa, window_size, seq_len) -> tuple[int, int]:
    """The mask's (left, right) bounds (-1 = unbounded)."""
    for name, value in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}: {value!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}: {scale!r}")
    left, right = -1, -1
    if window_size is not None:
        ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
              and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size))
        if not ok:
            raise ValueError(f"window_size must be None or two ints (left, right), each >= -1 (-1 = unbounded); "
                             f"got {window_size!r}")
        left, right = window_size
    if is_causal:
        if right > 0:
            raise ValueError(f"window_size={tuple(window_size)} lets queries see {right} keys ahead, which "
                             "is_causal=True forbids; pass right 0 or -1, or is_causal=False")
        right = 0
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
        raise ValueError(f"seq_len must be None or an int >= 0 (the unpadded sequence length), got {seq_len!r}")
    return left, right


def _check_cu_seqlens(cu_seqlens, seq_len) -> tuple[int, ...] | None:
    """``cu_seqlens`` as a tuple of ints (read to the host once), or None."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor or a sequence of ints, got a "
                             f"{cu_seqlens.dtype} tensor of shape {tuple(cu_seqlens.shape)}")
        cu = tuple(int(x) for x in cu_seqlens.tolist())
    else:
        cu = tuple(cu_seqlens)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu):
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor or a sequence of ints, got {cu_seqlens!r}")
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, with at least 2 entries (document i is "
                         f"positions cu_seqlens[i] to cu_seqlens[i + 1]); got {list(cu)}")
    if seq_len is not None and seq_len != cu[-1]:
        raise ValueError(f"seq_len={seq_len} but cu_seqlens ends at {cu[-1]}; they are the same length (pass one)")
    return cu


def _check_mods(score_mod, mask_mod, q, left: int, right: int) -> "flex.Mods":
    """The traced mods (flex's own FlexTraceError for a mod it cannot generate, unchanged)."""
    if q.dim() != 4:
        raise ValueError(f"score_mod / mask_mod take q, k, v as (B, H, L, E), FlexAttention's layout (the mods "
                         f"see b and h); got q of shape {tuple(q.shape)}")
    mods = flex.trace_mods(score_mod, mask_mod, left, right)
    for kind, graph in (("score_mod", mods.score), ("mask_mod", mods.mask)):
        for c in (graph.captures if graph is not None else []):
            if c.tensor.device != q.device:
                raise ValueError(f"{kind} captures a tensor of shape {tuple(c.tensor.shape)} on {c.tensor.device}; "
                                 f"q is on {q.device} (captured tensors must be on the shards' device)")
    return mods


_META = ("argument checks", "batch", "q heads", "k/v heads", "head dim", "value head dim", "tokens per rank (dim -2)",
         "dtype", "layout", "window left", "window right (0: is_causal)", "seq_len", "scale (x1e6)",
         "cu_seqlens (entries)", "cu_seqlens (checksum)", "score_mod (structure checksum, 0: none)",
         "mask_mod (structure checksum, 0: none)", "score_mod's trained captures (elements)")


def _check_ranks_agree(meta: list[int], group, device: torch.device, rank: int, size: int) -> None:
    """All-gather ``meta`` (one small int64 tensor; a host sync) and name the first field on which
    two ranks differ. Every rank raises the same error, so none is left waiting in the ring."""
    dist = _dist()
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    rows = [p.tolist() for p in parts]
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        if meta[0]:
            return  # this rank raises its own error
        raise ValueError(f"context_parallel_attention: rank(s) {failed} of the group rejected their arguments "
                         "(their own errors say why); every rank must pass valid shards of the same shape")
    for f, name in enumerate(_META):
        values = [row[f] for row in rows]
        if len(set(values)) > 1:
            shown = {r: _show(name, x) for r, x in enumerate(values)}
            raise ValueError(f"context_parallel_attention: the ranks of the group disagree on {name}: "
                             f"{', '.join(f'rank {r}: {x}' for r, x in shown.items())}; every rank must pass "
                             "shards of the same shape and the same options (unequal shards: pad the sequence "
                             "with pad_for_sharding and pass seq_len)")


def _meta_device(q) -> torch.device:
    return q.device if isinstance(q, torch.Tensor) else torch.device("cpu")


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _show(name: str, x: int):
    if name == "dtype":
        return str(_DTYPES[x]) if 0 <= x < len(_DTYPES) else x
    if name == "layout":
        return repr(LAYOUTS[x])
    return x


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                               window_size: tuple[int, int] | None = None, layout: str = "zigzag",
                               seq_len: int | None = None,
                               cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                               score_mod: Callable | None = None, mask_mod: Callable | None = None) -> torch.Tensor:
    """Attention over a sequence sharded across the ranks of ``group``; returns this rank's shard
    of the output, with the backward.

    Each rank passes its own shards (``shard(x, dim=-2, layout=layout)`` of the whole sequence):
    q ``(..., Hq, L, E)``, k ``(..., Hkv, L, E)``, v ``(..., Hkv, L, Ev)``, with ``L`` the same on
    every rank. The result equals ``shard(attend.scaled_dot_product_attention(Q, K, V,
    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa), dim=-2)`` of the gathered ``Q, K, V``
    (within a same-precision tolerance: partial results are merged in float32 by their LSE).

    - ``group``: the process group whose ranks share the sequence (None: the default group).
      NCCL on GPUs, gloo on the CPU; the P2P waits are bounded by its ``timeout``.
    - ``is_causal``: query ``p`` sees keys ``r <= p`` (positions in the whole sequence).
    - ``window_size``: ``(left, right)`` as in ``attend.varlen.varlen_attn``: query ``p`` sees key
      ``r`` iff ``p - left <= r <= p + right``, -1 = unbounded; ``(W, 0)`` is a causal sliding
      window of ``W + 1`` keys. With ``is_causal=True``, right must be 0 or -1.
    - ``layout``: how the sequence was sharded, "zigzag" (rank ``r`` holds chunks ``r`` and
      ``2N-1-r`` of ``2N``; balanced under a causal mask) or "contiguous".
    - ``seq_len``: the unpadded length of a sequence padded with ``pad_for_sharding``: keys at
      positions >= seq_len are masked, and query rows there return 0 (and pass no gradient).
    - ``cu_seqlens``: packed documents (varlen): document ``i`` is global positions
      ``cu_seqlens[i]`` to ``cu_seqlens[i+1]``, and a query sees only keys of its own document
      (the mask above applies within it, top-left aligned per document as in ``varlen_attn``'s
      square sequences). Ints or a 1-D integer tensor, the same on every rank and for every
      batch element; ``cu_seqlens[-1]`` is the real length (what ``seq_len`` would say).
    - ``score_mod(score, b, h, q_idx, kv_idx)`` / ``mask_mod(b, h, q_idx, kv_idx)``:
      FlexAttention's mods (``attend.flex_attention``), seeing ``q_idx`` / ``kv_idx`` as positions
      in the whole (unsharded, padded) sequence, ``b`` the batch index and ``h`` the query head:
      the result is this rank's shard of ``attend.flex_attention(Q, K, V, score_mod, block_mask)``
      on the gathered sequence, with ``block_mask`` the mask_mod AND every mask above (causal,
      window, documents, padding). q must be 4-D ``(B, Hq, L, E)``. Tensors the mods capture
      must be the same on every rank; a score_mod's captured float tensors that require grad
      receive gradients summed over every rank's blocks (all-reduced over ``group``).
    - Chunk pairs the mask leaves empty are skipped; ``record_ring_stats`` counts them. With a
      mask_mod, blocks its BlockMask leaves empty are skipped too.

    Every rank of ``group`` must call it (collectively), in the same order as its other
    collectives. A ValueError names any argument on which the ranks disagree.
    """
    rank, size = group_rank_and_size(group, "context_parallel_attention")
    from .._params import default_scale, to_4d
    from ..backends._kernels import TRITON_MASK_DTYPES, TRITON_MAX_HEAD_DIM, kernel_for

    # Checks that could fail on one rank alone still take part in the all-gather (flagged), so the
    # other ranks raise too instead of waiting for this one in the ring.
    from .._flex.trace import FlexTraceError

    mods = None
    try:
        layout = check_layout(layout)
        left, right = _check_options(is_causal, scale, enable_gqa, window_size, seq_len)
        cu = _check_cu_seqlens(cu_seqlens, seq_len)
        seq_len = cu[-1] if cu is not None else seq_len
        _check_tensors(q, k, v, enable_gqa)
        if score_mod is not None or mask_mod is not None:
            mods = _check_mods(score_mod, mask_mod, q, left, right)
    except (TypeError, ValueError, FlexTraceError):
        if size > 1:
            _check_ranks_agree([1] + [0] * (len(_META) - 1), group, _meta_device(q), rank, size)
        raise
    L = q.shape[-2]
    s = default_scale(q.shape[-1], scale)
    if size > 1:
        meta = [0, math.prod(q.shape[:-3]), q.shape[-3], k.shape[-3], q.shape[-1], v.shape[-1], L,
                _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99, LAYOUTS.index(layout), left, right,
                -1 if seq_len is None else seq_len, round(s * 1e6), 0 if cu is None else len(cu),
                0 if cu is None else zlib.crc32(repr(cu).encode()),
                0 if mods is None else flex.structure_checksum(mods.score),
                0 if mods is None else flex.structure_checksum(mods.mask),
                0 if mods is None else sum(t.numel() for t in mods.trained)]
        _check_ranks_agree(meta, group, q.device, rank, size)
    per = chunks_per_rank(layout)
    if L % per:
        raise ValueError(f"layout={layout!r} splits each rank's shard into {per} equal chunks, but q holds {L} tokens "
                         "(dim -2); shard the sequence with attend.distributed.shard(x, dim=..., layout=...)")
    padded = padded_length(seq_len, size, layout) if seq_len is not None else L * size
    if padded != L * size:
        raise ValueError(f"seq_len={seq_len} over {size} ranks (layout={layout!r}) pads to {padded} tokens, "
                         f"{padded // size} per rank, but q holds {L} per rank (dim -2): were the shards made for a "
                         "group of another size? pad_for_sharding and shard with this group")
    kernel = kernel_for(q)
    if kernel is None:
        raise ValueError(f"context_parallel_attention: no attend kernel for device type {q.device.type!r}; "
                         "expected cuda or cpu")
    if kernel == "triton" and (q.dtype not in TRITON_MASK_DTYPES or q.shape[-1] > TRITON_MAX_HEAD_DIM
                               or q.shape[-1] != v.shape[-1]):
        raise ValueError(f"context_parallel_attention: attend's Triton core takes dtypes "
                         f"{', '.join(str(d) for d in TRITON_MASK_DTYPES)}, head dims up to {TRITON_MAX_HEAD_DIM} "
                         f"and equal q/v head dims; got {q.dtype}, {q.shape[-1]} and {v.shape[-1]}")
    mask = Mask(left, right, L * size if seq_len is None else seq_len, cu)
    steps = plan(rank, size, L, layout, mask)
    blocks, captures = FusedBlocks(kernel), ()
    if mods is not None:
        plans = flex.block_plans(steps, (rank, size, L, layout, mask), mods, q.shape[0], q.shape[1], q.device)
        steps, captures = plans.steps, tuple(mods.trained)
        # The flex core scatters a trained capture's gradient by atomics; deterministic mode takes
        # the torch path then, as flex_attention takes its blocked path.
        fused = kernel == "triton" and not (captures and torch.are_deterministic_algorithms_enabled())
        blocks = flex.FlexBlocks("triton" if fused else "torch", mods, plans)
    cfg = _Config(Ring(group, rank, size, q.device) if size > 1 else None, steps, blocks, s, _STATS.get(), captures)
    q4, k4, v4 = (to_4d(t).contiguous() for t in (q, k, v))  # P2P sends need dense tensors
    out = _RingAttention.apply(q4, k4, v4, cfg, *captures)
    return out.reshape(*q.shape[:-1], v.shape[-1])

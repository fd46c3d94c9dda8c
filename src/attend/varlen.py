"""Variable-length (packed) attention: ``varlen_attn`` with PyTorch's contract.

Sequences are packed along the first dim of ``(T, H, D)`` tensors; ``cu_seq_q[b]`` /
``cu_seq_k[b]`` are where sequence ``b`` starts (int32, ``N + 1`` entries, first 0, last the
token count). On CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``) this runs attend's
Triton core with its VARLEN feature: one launch for the whole batch, no padding. Otherwise it
runs the CPU blocked kernel one sequence at a time.

``window_size=(left, right)``: query ``i`` of a sequence sees key ``j`` iff
``i + d - left <= j <= i + d + right`` with ``d = S_b - L_b`` (bottom-right aligned per sequence),
``-1`` meaning unbounded. ``(-1, -1)`` is full attention, ``(-1, 0)`` causal, ``(W, 0)`` a causal
sliding window of ``W + 1`` keys. Key blocks outside the window are skipped, so time scales
with the window. A query that sees no key gets output 0 and log-sum-exp ``-inf``.

Example::

    lens = torch.tensor([300, 1000, 64])
    cu = torch.zeros(4, dtype=torch.int32, device="cuda"); cu[1:] = lens.cumsum(0)
    out = varlen_attn(q, k, v, cu, cu, 1000, 1000, window_size=(-1, 0))   # q: (1364, H, D)
    out, lse = varlen_attn(q, k, v, cu, cu, 1000, 1000, return_aux=AuxRequest(lse=True))
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch

from ._hostcache import host_values, memo_get, memo_put, version

__all__ = ["varlen_attn", "AuxRequest"]


@dataclass(frozen=True)
class AuxRequest:
    """Extra outputs to return from :func:`varlen_attn`: ``lse=True`` adds the log-sum-exp,
    shaped ``(H, T_q)`` (natural log, fp32), the layout PyTorch's op returns."""

    lse: bool = False


def varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    score_mod=None,
):
    """Attention over packed sequences; returns ``out`` ``(T_q, H, D)``, or ``(out, lse)`` when
    ``return_aux.lse``.

    - ``query`` ``(T_q, H, D)``; ``key``/``value`` ``(T_k, H_kv, D)``, or a paged pool
      ``(pages, page_size, H_kv, D)`` with ``block_table`` ``(N, max_pages)`` int32 (page ids of
      each sequence's keys, in order) and ``seqused_k`` ``(N,)`` int32 (keys per sequence).
      ``page_size`` must be a multiple of 16. Without ``block_table``, ``seqused_k[b]`` uses
      the first keys of each ``cu_seq_k`` slot.
    - ``max_q`` / ``max_k``: at least the longest query / key sequence (they size the grid).
    - ``enable_gqa``: ``H`` may be a multiple of ``H_kv``; K/V heads are shared in place.
    - ``return_aux``: ``None`` or an ``AuxRequest`` (attend's or PyTorch's
      ``torch.nn.attention.varlen.AuxRequest``); anything else is a ``TypeError``.
    - ``num_splits``: PyTorch's split-KV knob (``None`` or an int >= 0; ``1`` turns split-KV off
      there). attend's kernels never split one query row's keys across programs, so every value
      runs the same kernel. Its tile sizes follow the ``max_q`` / ``max_k`` buckets, so bitwise
      equality of one sequence's output across different batches is not promised either way.
    - Gradients flow to query, key and value (and through ``lse``), except with
      ``block_table`` or ``seqused_k``, which are inference only (as in PyTorch).
    - ``score_mod`` (attend's addition; PyTorch's ``varlen_attn`` has none): a FlexAttention
      ``score_mod(score, b, h, q_idx, kv_idx)`` applied to every score the window keeps, with ``b``
      the sequence's index and ``q_idx`` / ``kv_idx`` positions in that sequence (a softcap,
      ALiBi, a bias table indexed per sequence). Inference calls on attend's Triton kernels run it
      in the same single launch; calls that need gradients, run under ``torch.compile`` or on the
      CPU blocked path run ``flex_attention`` once per sequence (docs/varlen.md).
    """
    from ._params import default_scale
    from ._layout import Band
    from .backends._kernels import kernel_for
    from .ops.varlen import varlen_attention

    want_lse = _check_aux(return_aux)
    _check_num_splits(num_splits)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool (True or False), got {type(enable_gqa).__name__}: {enable_gqa!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    left, right = _check_window(window_size)
    _check_args(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa, seqused_k, block_table)
    why = refusal(query, key, value)
    if why is not None:
        raise ValueError(f"varlen_attn: {why}")
    kernel = kernel_for(query)
    s = default_scale(query.shape[-1], scale)
    if score_mod is not None:
        if not callable(score_mod):
            raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score or None, "
                            f"got {type(score_mod).__name__}: {score_mod!r}")
        res = _with_score_mod(score_mod, query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table,
                              operator.index(max_q), operator.index(max_k), float(s), Band(left, right, True), kernel)
        if res is not None:
            return res if want_lse else res[0]
    out, lse = varlen_attention(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table,
                                operator.index(max_q), operator.index(max_k), float(s),
                                Band(left, right, bottom_right=True), kernel)
    return (out, lse) if want_lse else out


def refusal(query, key, value) -> str | None:
    """Why ``varlen_attn`` refuses tensors of these dtypes, devices and head dims (any layout: only
    ``dtype``, ``device`` and the last dim are read), or None where it takes them. The transformers
    integration asks it before routing a call to varlen_attn."""
    from .backends._kernels import TRITON_MASK_DTYPES, TRITON_MAX_HEAD_DIM, kernel_for

    D, Dk, Dv = query.shape[-1], key.shape[-1], value.shape[-1]
    for name, d in (("key", Dk), ("value", Dv)):
        if d != D:
            return f"{name} head dim {d} != query head dim {D}; varlen_attn takes one head dim"
    kernel = kernel_for(query)
    if kernel is None:
        return f"no kernel for device type {query.device.type!r}; expected cuda or cpu"
    if kernel == "triton" and query.dtype not in TRITON_MASK_DTYPES:  # the core's dtypes (fp16/bf16/fp32)
        return (f"query dtype {query.dtype} is not supported on {query.device.type}; "
                f"expected one of {', '.join(str(d) for d in TRITON_MASK_DTYPES)}")
    if kernel == "triton" and D > TRITON_MAX_HEAD_DIM:
        return f"head dim {D} > {TRITON_MAX_HEAD_DIM}, the Triton core's limit"
    return None


def _with_score_mod(score_mod, q, k, v, cu_q, cu_k, seqused_k, block_table, max_q: int, max_k: int, scale: float,
                    band, kernel: str):
    """(out, lse) of a call with a score_mod, or None where the mod is the identity (then the call
    runs as without one): an inference call on the Triton kernels in one launch of the core's score
    hooks (attend._flex.varlen), any other flex_attention per sequence (``_per_sequence``)."""
    from ._flex import varlen as flex_varlen
    from .ops.varlen import packed_of

    graph = flex_varlen.score_graph(score_mod, q)
    if graph is None:
        return None
    if flex_varlen.has_tangents((q, k, v, *(c.tensor for c in graph.captures))):
        raise NotImplementedError("varlen_attn: forward-mode AD (dual tensors) is not supported with a score_mod; "
                                  "use reverse mode (backward), which flows to query, key, value and the captures")
    if (block_table is not None or seqused_k is not None) and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, *(c.tensor for c in graph.captures))):
        raise RuntimeError("varlen_attn: block_table and seqused_k are inference only (as in PyTorch), and a "
                           "tensor here requires grad (query, key, value or one the score_mod captures); pass "
                           "packed keys with cu_seq_k to train")
    if flex_varlen.fused(kernel, (q, k, v, *(c.tensor for c in graph.captures))):
        packed = packed_of(cu_q, cu_k, seqused_k, block_table, k)
        return flex_varlen.forward_fused(graph, q, k, v, packed, max_q, max_k, scale, band)
    return _per_sequence(score_mod, q, k, v, cu_q, cu_k, seqused_k, block_table, scale, band)


def _per_sequence(score_mod, q, k, v, cu_q, cu_k, seqused_k, block_table, scale: float, band):
    """(out (T, H, D), lse (H, T)): ``flex_attention`` on each sequence's queries and keys (a paged
    pool's pages gathered), under the band's mask; rows that see no key are 0 with lse -inf."""
    from ._dispatch import in_graph
    from ._flex import varlen as flex_varlen
    from ._flex.trace import data_cells
    from .flex_attention import create_block_mask, flex_attention

    flex_varlen.PATHS["per_sequence"] += 1
    T, H, _ = q.shape
    Dv = v.shape[-1]
    qv = host_values(cu_q)
    kv = host_values(cu_k) if cu_k is not None else None
    used = host_values(seqused_k) if seqused_k is not None else None
    outs, lses = [], []
    for b in range(len(qv) - 1):
        L = qv[b + 1] - qv[b]
        if L == 0:
            continue
        kb, vb = _keys(b, k, v, kv, used, block_table)
        S = kb.shape[0]
        if S == 0:
            outs.append(q.new_zeros(L, H, Dv))
            lses.append(torch.full((H, L), float("-inf"), dtype=torch.float32, device=q.device))
            continue
        qb = q[qv[b]:qv[b + 1]].transpose(0, 1)[None]  # (1, H, L, D)
        seq = b

        def mod(score, b_, h, q_idx, kv_idx):
            return score_mod(score, b_ + seq, h, q_idx, kv_idx)

        mask = _band_mask(band, L, S)
        block_mask = None if mask is None else create_block_mask(mask, 1, 1, L, S, device=q.device)
        out, lse = flex_attention(qb, kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                                  score_mod=data_cells(mod, "seq"), block_mask=block_mask, scale=scale,
                                  enable_gqa=H != kb.shape[1], return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].float())
    if not outs:
        outs, lses = [q.new_zeros(T, H, Dv)], [torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)]
    out = torch.cat(outs, 0)
    if not out.requires_grad:  # no sequence saw a key: zeros, in the inputs' graph as SDPA's empty calls
        out = in_graph(out, (q, k, v))
    return out, torch.cat(lses, 1)


def _keys(b: int, k, v, kv: list[int] | None, used: list[int] | None, block_table):
    """Sequence ``b``'s keys and values, (S, Hkv, D)."""
    if block_table is not None:  # a (pages, page_size, Hkv, D) pool: the sequence's pages in order
        page = k.shape[1]
        n = -(-used[b] // page)
        ids = block_table[b, :n].long()
        return (k[ids].flatten(0, 1)[:used[b]], v[ids].flatten(0, 1)[:used[b]])
    end = kv[b + 1] if used is None else kv[b] + used[b]
    return k[kv[b]:end], v[kv[b]:end]


def _band_mask(band, L: int, S: int):
    """The mask_mod of a bottom-right ``band`` over one sequence's (L, S), or None for every key."""
    from ._flex.trace import data_cells

    hi, lo = S - L + band.right, S - L - band.left  # key bounds relative to the query's position

    def below(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + hi

    def above(b, h, q_idx, kv_idx):
        return kv_idx >= q_idx + lo

    def between(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + hi) & (kv_idx >= q_idx + lo)

    if band.left < 0:
        return None if band.right < 0 else data_cells(below, "hi")
    return data_cells(above, "lo") if band.right < 0 else data_cells(between, "hi", "lo")


def _check_aux(return_aux) -> bool:
    """Whether the caller asked for the log-sum-exp."""
    if return_aux is None:
        return False
    from torch.nn.attention.varlen import AuxRequest as TorchAuxRequest

    if not isinstance(return_aux, (AuxRequest, TorchAuxRequest)):
        raise TypeError(f"return_aux must be an attend.varlen.AuxRequest (e.g. AuxRequest(lse=True)) or None, "
                        f"got {type(return_aux).__name__}: {return_aux!r}")
    return bool(return_aux.lse)


def _check_num_splits(num_splits) -> None:
    if num_splits is None:
        return
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}: {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (1 = no split-KV) or None, got {num_splits}")


def _check_window(window_size) -> tuple[int, int]:
    ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size))
    if not ok:
        raise ValueError(f"window_size must be two ints (left, right), each >= -1 (-1 = unbounded); "
                         f"got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


# block_table versions (and the sequence lengths they were checked for) whose page ids are valid.
_PAGES_CHECKED: dict[int, tuple] = {}


def _check_cu(name: str, cu: torch.Tensor, device: torch.device, n: int | None, total: int) -> list[int]:
    """Validate a cu_seq tensor; returns it as a list."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, but query is on {device}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with N + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if n is not None and cu.numel() != n + 1:
        raise ValueError(f"{name} has {cu.numel()} entries; expected {n + 1} (cu_seq_q has {n + 1})")
    vals = host_values(cu)
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise ValueError(f"{name} must be non-decreasing: {name}[{i}] = {vals[i]} < {name}[{i - 1}] = {vals[i - 1]}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the token count {total}, got {vals[-1]}")
    return vals


def _check_int32(name: str, t: torch.Tensor, device: torch.device, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dims:
        got = f"{t.dtype} with shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dims}-D int32 tensor, got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but query is on {device}")


def _check_args(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa, seqused_k, block_table) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    paged = block_table is not None
    if q.dim() != 3:
        raise ValueError(f"query must be (T_q, H, D), got shape {tuple(q.shape)}")
    kv_dims = 4 if paged else 3
    for name, t in (("key", k), ("value", v)):
        if t.dim() != kv_dims:
            want = "(pages, page_size, H_kv, D) with block_table" if paged else "(T_k, H_kv, D)"
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, but query is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"key/value head dim {k.shape[-1]} != query head dim {D}")
    if H != Hkv and not enable_gqa:
        raise ValueError(f"query has {H} heads and key/value {Hkv}; pass enable_gqa=True for grouped-query attention")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    for name, m in (("max_q", max_q), ("max_k", max_k)):
        if isinstance(m, bool) or (isinstance(m, torch.Tensor) and (m.numel() != 1 or m.is_floating_point())):
            raise TypeError(f"{name} must be a non-negative int, got {m!r}")
        try:
            m = operator.index(m)  # an int, or anything that is one (numpy ints, a one-element int tensor)
        except TypeError:
            raise TypeError(f"{name} must be a non-negative int, got {type(m).__name__}: {m!r}") from None
        if m < 0:
            raise ValueError(f"{name} must be a non-negative int, got {m}")

    qv = _check_cu("cu_seq_q", cu_q, q.device, None, q.shape[0])
    n = len(qv) - 1
    lens_q = [qv[i + 1] - qv[i] for i in range(n)]
    if paged:
        if seqused_k is None:
            raise ValueError("block_table needs seqused_k (the number of keys of each sequence)")
        _check_int32("block_table", block_table, q.device, 2)
        if block_table.shape[0] != n:
            raise ValueError(f"block_table has {block_table.shape[0]} rows; expected one per sequence ({n})")
        page = k.shape[1]
        if page % 16:
            raise ValueError(f"page_size (key.shape[1]) must be a multiple of 16, got {page}")
        if cu_k is not None:
            _check_int32("cu_seq_k", cu_k, q.device, 1)
        cap = [block_table.shape[1] * page] * n
    else:
        if cu_k is None:
            raise ValueError("cu_seq_k is required unless block_table is given")
        kv = _check_cu("cu_seq_k", cu_k, q.device, n, k.shape[0])
        cap = [kv[i + 1] - kv[i] for i in range(n)]
    lens_k = cap
    if seqused_k is not None:
        _check_int32("seqused_k", seqused_k, q.device, 1)
        if seqused_k.numel() != n:
            raise ValueError(f"seqused_k has {seqused_k.numel()} entries; expected one per sequence ({n})")
        used = host_values(seqused_k)
        for b, (u, c) in enumerate(zip(used, cap)):
            if not 0 <= u <= c:
                where = "its block_table row holds" if paged else "its cu_seq_k slot holds"
                raise ValueError(f"seqused_k[{b}] = {u} is out of range: {where} {c} keys")
        lens_k = used
    checked = paged and (version(block_table), tuple(lens_k), *k.shape[:2])
    if paged and (checked[0] is None or memo_get(_PAGES_CHECKED, block_table) != checked):
        # The page ids each sequence uses, checked in one pass (one host sync, not one per sequence),
        # and once per block_table version and sequence lengths.
        pages = k.shape[0]
        n_used = torch.tensor([-(-u // k.shape[1]) for u in lens_k], device=q.device)
        used_cols = torch.arange(block_table.shape[1], device=q.device)[None, :] < n_used[:, None]
        bad = used_cols & ((block_table < 0) | (block_table >= pages))
        if bool(bad.any()):
            b, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}] refers to page {int(block_table[b, col])} outside the pool's "
                             f"{pages} pages")
        if checked[0] is not None:
            memo_put(_PAGES_CHECKED, block_table, checked)
    if n and max(lens_q) > max_q:
        b = lens_q.index(max(lens_q))
        raise ValueError(f"max_q = {max_q} is less than sequence {b}'s query length {lens_q[b]}")
    if n and max(lens_k) > max_k:
        b = lens_k.index(max(lens_k))
        raise ValueError(f"max_k = {max_k} is less than sequence {b}'s key length {lens_k[b]}")

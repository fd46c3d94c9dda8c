"""Band masks: a mask_mod that keeps a diagonal band of keys runs on the dense kernels.

A mask_mod that reads ``q_idx`` and ``kv_idx`` only through their difference (``q_idx - kv_idx <= w``,
``kv_idx <= q_idx + 3``, ``(q_idx - kv_idx).abs() < w``), and reads no ``b``, ``h`` or captured
tensor, keeps a set of differences ``d = q_idx - kv_idx``. Evaluating it once over every difference a call can meet
(``-(S - 1) .. L - 1``) gives that set; where it is one interval ``[lo, hi]`` holding 0 (the
diagonal), the mask is the dense kernels' :class:`~attend._layout.Band` (``left = hi``,
``right = -lo``): causal ``q_idx >= kv_idx``, a causal sliding window, a symmetric window.

A BlockMask that ``create_block_mask`` built from that mask_mod (``provenance``) lists every block
the band touches and calls full only blocks wholly inside it, so a call without a score_mod gives
the same result on attend's dense fused path (``_flex.dispatch``), which walks the band by
arithmetic: no list loads, no hooks, and on Hopper the Gluon kernels (docs/flex.md, "Band masks").
"""

from __future__ import annotations

import torch

from .._layout import Band
from .trace import ModGraph, Ref, evaluate

BAND_CACHE_SIZE = 256
_BANDS: dict[tuple, tuple[int, int] | None] = {}  # (structure, scalars, size class) -> kept interval, oldest first


def difference_only(graph: ModGraph, L: int, S: int) -> bool:
    """Whether ``graph`` (a mask_mod's) is provably a function of ``q_idx - kv_idx`` alone on an
    ``L x S`` call, in the int32 arithmetic the kernels and ``evaluate`` use.

    Each node is read as integer-affine in the two indices, ``cq * q_idx + ckv * kv_idx + c``
    (the indices, sums, differences, negations and products by literal integers of such nodes;
    ``c`` from the mod's numbers, bounded by their current values), or as a function of the
    difference (``_D``), or neither (None). A comparison of two affine nodes whose difference has
    ``cq == -ckv`` is a function of the difference where neither side can wrap around int32 (sums
    and products wrap exactly; a comparison of wrapped values does not compare the integers): for
    indices up to ``max(L, S) - 1`` in size (``evaluate`` runs q_idx over ``-(S - 1) .. L - 1``).
    Any other op whose operands are all functions of the difference (affine with ``cq == -ckv``
    included) is one. ``b``, ``h``, captured tensors and float nodes are neither: the BlockMask's
    lists come from the generated Triton hook, this check's band from torch, and float rounding
    may differ between the two at the band's edge."""
    if graph.kind != "mask" or graph.captures or not isinstance(graph.output, Ref):
        return False
    if any(n.dtype.is_floating_point for n in graph.nodes[5:]):
        return False
    n_max = max(L, S)
    forms: list = [None, None, None, (1, 0, 0), (0, 1, 0)]  # score, b, h, q_idx, kv_idx: (cq, ckv, |c| bound)
    arg = lambda a: forms[a.i] if isinstance(a, Ref) else (0, 0, abs(int(a)))
    for n in graph.nodes[5:]:
        if n.op == "scalar":
            forms.append((0, 0, abs(int(graph.scalars[n.args[0]]))))
        elif n.op == "const":
            forms.append((0, 0, abs(int(n.args[0]))))
        else:
            args = [arg(a) for a in n.args if not isinstance(a, torch.dtype)]
            forms.append(_form(n.op, args, n.args, n_max))
    out = forms[graph.output.i]
    return out is _D or isinstance(out, tuple) and out[0] == -out[1]


_D = "d"  # a node that is a function of q_idx - kv_idx (not affine)
_CMP = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
_INT32 = 2 ** 31


def _form(op: str, args: list, raw: tuple, n_max: int):
    """A node's form for ``difference_only``: (cq, ckv, bound on |c|) affine, _D, or None."""
    if op in ("input", "load") or any(a is None for a in args):
        return None
    affine = all(isinstance(a, tuple) for a in args)
    if op in ("add", "sub") and affine:
        (q1, k1, c1), (q2, k2, c2) = args
        return (q1 + q2, k1 + k2, c1 + c2) if op == "add" else (q1 - q2, k1 - k2, c1 + c2)
    if op == "neg" and affine:
        return (-args[0][0], -args[0][1], args[0][2])
    if op == "mul" and affine:
        lit = [r for r in raw if isinstance(r, int) and not isinstance(r, bool)]
        (q1, k1, c1), (q2, k2, c2) = args
        if (q2, k2) == (0, 0) and lit and not isinstance(raw[0], int):
            return (q1 * lit[0], k1 * lit[0], c1 * abs(lit[0]))
        if (q1, k1) == (0, 0) and lit and not isinstance(raw[1], int):
            return (q2 * lit[0], k2 * lit[0], c2 * abs(lit[0]))
    if op in _CMP and affine:
        if any((abs(cq) + abs(ckv)) * n_max + c >= _INT32 for cq, ckv, c in args):
            return None  # a side may wrap around
        cq, ckv = args[0][0] - args[1][0], args[0][1] - args[1][1]
        return _D if cq == -ckv else None
    if all(a is _D or a[0] == -a[1] for a in args):
        return _D
    return None


def band(graph: ModGraph, L: int, S: int) -> Band | None:
    """The Band ``graph`` keeps on an ``L x S`` call, or None where it is no band the dense kernels
    run: ``kept`` found no interval, or it holds neither the top-left diagonal (``q_idx ==
    kv_idx``) nor the bottom-right one (``q_idx + S - L == kv_idx``: a chunk of queries at the end
    of its keys, a decode step's window)."""
    kept_range = kept(graph, L, S)
    if kept_range is None:
        return None
    lo, hi = kept_range
    found = []
    for shift, bottom_right in ((0, False), (S - L, True)):
        lo_s, hi_s = lo + shift, hi + shift  # in differences from that diagonal
        if lo_s <= 0 <= hi_s:
            found.append(Band(left=hi_s if hi_s < L - 1 + shift else -1,
                              right=-lo_s if -lo_s < S - 1 - shift else -1, bottom_right=bottom_right))
    # both describe the same keys where both hold it: prefer a plain causal edge (right 0) or none
    return next((b for b in found if b.right in (0, -1)), found[0] if found else None)


def kept(graph: ModGraph, L: int, S: int) -> tuple[int, int] | None:
    """``(lo, hi)`` where ``graph`` keeps exactly the positions with ``lo <= q_idx - kv_idx <= hi``
    on an ``L x S`` call, or None: not ``difference_only``, or the differences it keeps are not one
    interval. Evaluated once per structure, numbers and power-of-two size class of the lengths,
    over every difference of that class (a decode loop's growing S evaluates again only when it
    doubles, or when the mod's numbers change); an interval there is one on every call it covers.
    (A mod that keeps one interval only on the smaller calls of a class is not taken.)"""
    n = max(16, 1 << (max(L, S) - 1).bit_length())
    key = (graph.key, tuple(graph.scalars), n)
    if key not in _BANDS:
        found = _interval(graph, n) if difference_only(graph, n, n) else None
        while len(_BANDS) >= BAND_CACHE_SIZE:
            _BANDS.pop(next(iter(_BANDS)))
        _BANDS[key] = found
    return _BANDS[key]


def _interval(graph: ModGraph, n: int) -> tuple[int, int] | None:
    d = torch.arange(-(n - 1), n, dtype=torch.int32)
    zero = torch.zeros((), dtype=torch.int32)
    keep, = evaluate(graph, dict(b=zero, h=zero, q_idx=d, kv_idx=zero))
    kept_at = torch.as_tensor(keep, dtype=torch.bool).expand(d.shape).nonzero().flatten()
    if kept_at.numel() == 0:
        return None
    lo, hi = int(d[kept_at[0]]), int(d[kept_at[-1]])
    if kept_at.numel() != hi - lo + 1:
        return None
    return lo, hi


def block_status(lo: int, hi: int, Q_LEN: int, KV_LEN: int, BQ: int, BKV: int, device) -> torch.Tensor:
    """int8 [query blocks, key blocks]: EMPTY / PARTIAL / FULL (block_mask's codes) of the band
    ``lo <= q_idx - kv_idx <= hi``, by arithmetic: a block's differences run over every integer
    from its smallest query minus its largest key to its largest query minus its smallest key. A
    block reaching past Q_LEN or KV_LEN is never full (create_block_mask's rule, as PyTorch's)."""
    nq, nk = -(-Q_LEN // BQ), -(-KV_LEN // BKV)
    i = torch.arange(nq, device=device, dtype=torch.int64)
    j = torch.arange(nk, device=device, dtype=torch.int64)
    q_end, k_end = (i + 1) * BQ, (j + 1) * BKV
    d_min = (i * BQ)[:, None] - (k_end.clamp(max=KV_LEN) - 1)[None, :]
    d_max = (q_end.clamp(max=Q_LEN) - 1)[:, None] - (j * BKV)[None, :]
    whole = (q_end <= Q_LEN)[:, None] & (k_end <= KV_LEN)[None, :]
    full = whole & (d_min >= lo) & (d_max <= hi)
    empty = (d_max < lo) | (d_min > hi)
    return torch.where(full, 2, torch.where(empty, 0, 1)).to(torch.int8)


def provenance(graph: ModGraph) -> tuple:
    """What ``create_block_mask`` records on a BlockMask it built from ``graph``: its structure and
    numbers. A call's mask graph must match it for the lists to be that mask's exact blocks (a
    mod whose global number changed since traces to other numbers)."""
    return (graph.key, tuple(graph.scalars))

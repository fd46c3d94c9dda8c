"""Block classification by interval arithmetic: most blocks of a mask decided without evaluating it.

``create_block_mask`` must know, per (query block, key block), whether the mask keeps none, some
or all of its positions. Evaluating the mask at every position costs ``L * S`` evaluations: 1.7e10
at 131072. But over one block, ``q_idx`` and ``kv_idx`` range over known intervals, and the
integer arithmetic masks are made of (``q_idx - kv_idx <= w``, ``q_idx // 64``, ``&``, ``|``,
``where``) maps intervals to intervals soundly. A comparison of two intervals is then definitely
true, definitely false, or undecided. :func:`block_bounds` evaluates the traced mask graph that
way for every block at once (a few torch ops on ``[NQ, NK]`` tensors), and only the undecided
blocks are evaluated position by position (``block_mask.classify``). For causal, sliding-window
and prefix-LM masks that is the blocks a boundary crosses; a load from a captured tensor
(``doc[b, q_idx]``) is undecided, but an ``&`` with a decided side still decides (a document mask
under causal: every block above the diagonal is empty without a look at the document ids).

Sound by construction: float arithmetic, bitwise ops on integers, and loads are "anything",
never guessed; every rule below keeps the exact value of every position inside its interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import trace as _trace
from .trace import Ref

UNDECIDED = 3  # a status beyond EMPTY / PARTIAL / FULL: evaluate the block position by position


@dataclass
class _Int:
    """Integer interval [lo, hi] per block (int64 tensors broadcasting to [NQ, NK])."""

    lo: torch.Tensor
    hi: torch.Tensor


@dataclass
class _Bool:
    """Per block: whether some position may be True (``may_true``), or False (``may_false``)."""

    may_true: torch.Tensor
    may_false: torch.Tensor


_TOP = None  # a numeric value nothing is known about


_I32 = torch.iinfo(torch.int32)
_BIG = 2 ** 62  # an int64 interval past this may have wrapped in its products and sums


def _exact(v: int, like: torch.Tensor):
    """A Python int as an exact interval; one outside int32's range is unknown (torch and the
    kernels disagree on how it meets an int32 tensor: wrapped, or promoted)."""
    if not _I32.min <= int(v) <= _I32.max:
        return _TOP
    # a fill, not torch.tensor: a host-to-device copy from pageable memory waits for the GPU's queue
    t = torch.full((), int(v), dtype=torch.int64, device=like.device)
    return _Int(t, t)


def _const_bool(v: bool, like: torch.Tensor) -> _Bool:
    t = torch.full((), bool(v), dtype=torch.bool, device=like.device)
    return _Bool(t, ~t)


def _unknown_bool(like: torch.Tensor) -> _Bool:
    t = torch.ones((), dtype=torch.bool, device=like.device)
    return _Bool(t, t)


def _is_int_dtype(dt) -> bool:
    """Integer dtypes the intervals follow: int32 and int64 (narrower ones wrap at small values;
    they stay unknown)."""
    return dt in (torch.int32, torch.int64)


def _cmp(op: str, a: _Int, b: _Int) -> _Bool:
    """Tri-state comparison of two intervals."""
    if op == "lt":
        return _Bool(a.lo < b.hi, a.hi >= b.lo)
    if op == "le":
        return _Bool(a.lo <= b.hi, a.hi > b.lo)
    if op == "gt":
        return _Bool(a.hi > b.lo, a.lo <= b.hi)
    if op == "ge":
        return _Bool(a.hi >= b.lo, a.lo < b.hi)
    overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
    single = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
    eq = _Bool(overlap, ~single)
    return eq if op == "eq" else _Bool(eq.may_false, eq.may_true)


def _floordiv(a: _Int, d: int) -> _Int:
    return _Int(torch.div(a.lo, d, rounding_mode="floor"), torch.div(a.hi, d, rounding_mode="floor"))


def _value(n, args, like):
    """The interval (or tri-state) of node ``n`` from its arguments' (``_TOP``: unknown number);
    an int32 interval that leaves int32's range is unknown (the kernels' arithmetic wraps)."""
    v = _value_unchecked(n, args, like)
    if isinstance(v, _Int):
        lo, hi = (_I32.min, _I32.max) if n.dtype == torch.int32 else (-_BIG, _BIG)
        if bool((v.lo < lo).any()) or bool((v.hi > hi).any()):
            return _TOP
    return v


def _value_unchecked(n, args, like):
    op = n.op
    ints = [a for a in args if isinstance(a, _Int)]
    if op in ("lt", "le", "gt", "ge", "eq", "ne"):
        if not all(isinstance(a, _Int) for a in args):
            return _unknown_bool(like)
        return _cmp(op, *args)
    if op in ("and", "or", "xor", "not"):
        if not all(isinstance(a, _Bool) for a in args):
            return _TOP if not _bool_dtype(n) else _unknown_bool(like)
        if op == "not":
            return _Bool(args[0].may_false, args[0].may_true)
        a, b = args
        if op == "and":
            return _Bool(a.may_true & b.may_true, a.may_false | b.may_false)
        if op == "or":
            return _Bool(a.may_true | b.may_true, a.may_false & b.may_false)
        return _Bool((a.may_true & b.may_false) | (a.may_false & b.may_true),
                     (a.may_true & b.may_true) | (a.may_false & b.may_false))
    if op == "where":
        c, x, y = args
        if _bool_dtype(n):
            if not (isinstance(x, _Bool) and isinstance(y, _Bool)) or not isinstance(c, _Bool):
                return _unknown_bool(like)
            return _Bool((c.may_true & x.may_true) | (c.may_false & y.may_true),
                         (c.may_true & x.may_false) | (c.may_false & y.may_false))
        if not (isinstance(x, _Int) and isinstance(y, _Int)) or not isinstance(c, _Bool):
            return _TOP
        only_x, only_y = ~c.may_false, ~c.may_true
        lo = torch.where(only_x, x.lo, torch.where(only_y, y.lo, torch.minimum(x.lo, y.lo)))
        hi = torch.where(only_x, x.hi, torch.where(only_y, y.hi, torch.maximum(x.hi, y.hi)))
        return _Int(lo, hi)
    if _bool_dtype(n) or not _is_int_dtype(n.dtype) or any(a is _TOP for a in args) or len(ints) != len(args):
        return _unknown_bool(like) if _bool_dtype(n) else _TOP
    if op == "add":
        return _Int(args[0].lo + args[1].lo, args[0].hi + args[1].hi)
    if op == "sub":
        return _Int(args[0].lo - args[1].hi, args[0].hi - args[1].lo)
    if op == "neg":
        return _Int(-args[0].hi, -args[0].lo)
    if op == "abs":
        a = args[0]
        lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, torch.zeros_like(a.lo)))
        return _Int(lo, torch.maximum(a.lo.abs(), a.hi.abs()))
    if op == "mul":
        a, b = args
        c = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
        return _Int(torch.minimum(torch.minimum(c[0], c[1]), torch.minimum(c[2], c[3])),
                    torch.maximum(torch.maximum(c[0], c[1]), torch.maximum(c[2], c[3])))
    if op in ("minimum", "maximum"):
        f = torch.minimum if op == "minimum" else torch.maximum
        return _Int(f(args[0].lo, args[1].lo), f(args[0].hi, args[1].hi))
    if op in ("floordiv", "remainder"):
        a, d = args
        if not (d.lo.numel() == 1 and bool((d.lo == d.hi).all()) and int(d.lo.max()) > 0):
            return _TOP  # only a known positive divisor
        d = int(d.lo.max())
        if op == "floordiv":
            return _floordiv(a, d)
        same = _floordiv(a, d)
        one_period = same.lo == same.hi
        lo = torch.where(one_period, torch.remainder(a.lo, d), torch.zeros_like(a.lo))
        hi = torch.where(one_period, torch.remainder(a.hi, d), torch.full_like(a.hi, d - 1))
        return _Int(lo, hi)
    if op == "cast":  # int32 <-> int64: values kept (the int32 range check above catches narrowing)
        return args[0]
    return _TOP


def _bool_dtype(n) -> bool:
    return n.dtype == torch.bool


def block_bounds(graph: _trace.ModGraph, B: int, H: int, Q_LEN: int, KV_LEN: int, BQ: int, BKV: int,
                 device) -> torch.Tensor:
    """int8 [NQ, NK]: EMPTY or FULL where the intervals decide it for every (b, h), PARTIAL for a
    ragged block they decide to keep, UNDECIDED elsewhere (``block_mask`` codes)."""
    from .block_mask import EMPTY, FULL, PARTIAL

    NQ, NK = -(-Q_LEN // BQ), -(-KV_LEN // BKV)
    i64 = dict(dtype=torch.int64, device=device)
    m = torch.arange(NQ, **i64).view(-1, 1)
    nk = torch.arange(NK, **i64).view(1, -1)
    q = _Int(m * BQ, torch.clamp((m + 1) * BQ, max=Q_LEN) - 1)
    kv = _Int(nk * BKV, torch.clamp((nk + 1) * BKV, max=KV_LEN) - 1)
    like = q.lo
    inputs = {"b": _Int(torch.zeros((), **i64), torch.full((), B - 1, **i64)),
              "h": _Int(torch.zeros((), **i64), torch.full((), H - 1, **i64)), "q_idx": q, "kv_idx": kv}
    vals: list = []
    for n in graph.nodes:
        if n.op == "input":
            v = inputs.get(n.args[0], _TOP)
        elif n.op in ("const", "scalar"):
            x = n.args[0] if n.op == "const" else graph.scalars[n.args[0]]
            if isinstance(x, bool) or n.dtype == torch.bool:
                v = _const_bool(bool(x), like)
            elif isinstance(x, int) and _is_int_dtype(n.dtype):
                v = _exact(x, like)
            else:
                v = _TOP
        elif n.op == "load":
            v = _unknown_bool(like) if n.dtype == torch.bool else _TOP
        else:
            args = []
            for a in n.args:
                if isinstance(a, Ref):
                    args.append(vals[a.i])
                elif isinstance(a, bool):
                    args.append(_const_bool(a, like))
                elif isinstance(a, int):
                    args.append(_exact(a, like))
                elif isinstance(a, torch.dtype):
                    continue  # a cast's target: n.dtype says it
                else:
                    args.append(_TOP)
            if n.op == "cast" and n.dtype == torch.bool and args and isinstance(args[0], _Int):
                v = _cmp("ne", args[0], _exact(0, like))
            elif n.op == "cast" and _is_int_dtype(n.dtype) and args and isinstance(args[0], _Bool):
                a = args[0]
                v = _Int((~a.may_false).to(torch.int64), a.may_true.to(torch.int64))
            else:
                v = _value(n, args, like)
        vals.append(v)
    out = graph.output
    if isinstance(out, Ref):
        res = vals[out.i]
    else:
        res = _const_bool(bool(out), like)
    if not isinstance(res, _Bool):
        res = _cmp("ne", res, _exact(0, like)) if isinstance(res, _Int) else _unknown_bool(like)
    shape = (NQ, NK)
    all_kept = (~res.may_false).expand(shape)
    none_kept = (~res.may_true).expand(shape)
    ragged = ((m + 1) * BQ > Q_LEN) | ((nk + 1) * BKV > KV_LEN)
    status = torch.full(shape, UNDECIDED, dtype=torch.int8, device=device)
    status[all_kept] = PARTIAL
    status[all_kept & ~ragged.expand(shape)] = FULL
    status[none_kept] = EMPTY
    return status

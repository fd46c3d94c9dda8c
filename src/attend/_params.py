"""Call parameters, and the validation and normalization every call goes through before dispatch.

``prepare`` takes what ``torch.nn.functional.scaled_dot_product_attention`` takes and refuses
what it refuses, with a message that names the argument, the value and what was expected. It
returns the call in the one layout the backends see: ``(..., H, L, E)`` with at least three
dims, query / key / value sharing their batch dims, query and output heads equal, and key /
value heads each dividing them (grouped-query attention, or a head dim broadcast from 1).
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .bias import CausalBias, CausalVariant


@dataclass
class SDPAParams:
    """The arguments of one attention call, as the backends' checks see them.

    Mirrors ``torch.backends.cuda.SDPAParams(query, key, value, attn_mask, dropout,
    is_causal, enable_gqa)``. ``attn_mask`` may be a bool or float tensor, a
    :class:`attend.bias.CausalBias` (or PyTorch's ``torch.nn.attention.bias.CausalBias``),
    or ``None``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: Any = None
    dropout: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False

    @property
    def device_type(self) -> str:
        return self.query.device.type

    @property
    def causal_variant(self) -> CausalVariant | None:
        """The causal alignment the call asks for (``is_causal`` or a ``CausalBias``), if any."""
        if isinstance(self.attn_mask, CausalBias):
            return self.attn_mask.variant
        return CausalVariant.UPPER_LEFT if self.is_causal else None

    @property
    def dense_mask(self) -> torch.Tensor | None:
        """The mask as a tensor, or None when there is none or it is a CausalBias."""
        return self.attn_mask if isinstance(self.attn_mask, torch.Tensor) else None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def as_causal_bias(m: object) -> object:
    """PyTorch's ``torch.nn.attention.bias.CausalBias`` as attend's (same variant numbers and
    size); anything else unchanged. (Not imported here: ``torch.nn.attention.bias`` imports
    torch._dynamo, about a second; where it is not imported, ``m`` is none of its objects.)"""
    torch_bias = sys.modules.get("torch.nn.attention.bias")
    if torch_bias is not None and isinstance(m, torch_bias.CausalBias):
        return CausalBias(CausalVariant(int(m.variant)), int(m.seq_len_q), int(m.seq_len_kv))
    return m


def _flag(name: str, value: object) -> bool:
    # PyTorch's argument parser takes only a Python bool here: not 0 / 1, "False" or a tensor.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}: {value!r}")
    return value


def _real(name: str, value: object, expected: str) -> float:
    """A float argument as PyTorch's parser reads it: any real number (int, bool, NumPy scalar) or
    a 0-d tensor that does not require grad."""
    if type(value) is float:  # the common call; the Real ABC check below costs more than the rest
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.requires_grad or value.is_complex():
            what = ("a 0-d tensor that requires grad" if value.dim() == 0 and value.requires_grad
                    else f"a {value.dtype} tensor of shape {_shape(value)}")
            raise TypeError(f"{name} must be {expected}, got {what}")
        return float(value.item())
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{name} must be {expected}, got {value!r}, which overflows a float") from None
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}: {value!r}")


def _broadcast(a: tuple[int, ...], b: tuple[int, ...], *named: tuple[str, torch.Tensor]) -> tuple[int, ...]:
    """The broadcast of two batch shapes; the error names the ``(name, tensor)`` pairs."""
    out = _broadcast_or_none(a, b)
    if out is None:
        names = ", ".join(f"{n} {_shape(t)}" for n, t in named[:-1]) + f" and {named[-1][0]} {_shape(named[-1][1])}"
        raise ValueError(f"the batch dims (all but the last two) of {names} do not broadcast")
    return out


class Call(NamedTuple):
    """One validated call: the normalized ``params``, the ``scale`` as a float (or None), the
    shape the caller gets back, and whether that is all zeros by PyTorch's rule for empty calls
    (no query rows, or an empty value: zeros shaped ``query.shape[:-1] + (Ev,)``, with the
    query's batch dims even where key / value broadcast them). A named tuple, not a frozen
    dataclass: one is built per call, and a frozen dataclass's ``__init__`` costs three times as much."""

    params: SDPAParams
    scale: float | None
    out_shape: tuple[int, ...]
    zeros: bool = False


def prepare(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> Call:
    """Validate one ``scaled_dot_product_attention`` call and normalize it for the backends.

    Accepts what PyTorch's SDPA accepts: 2-D and higher inputs whose batch dims (all but the
    last two) broadcast against each other, ``enable_gqa`` with key and value head counts that
    each divide the query's, ``scale`` and ``dropout_p`` as numbers or 0-d tensors,
    ``dropout_p`` up to 1 inclusive, zero-size dims and head dim 0, and PyTorch's own
    ``CausalBias``. Refuses what it refuses (a non-bool flag, a rank below 2, masks that would
    grow the scores' shape, ...), with an error that names the argument, the value and what
    was expected. Also refuses three calls PyTorch's MATH backend refuses but its CPU default
    does not check: ``attn_mask`` with ``is_causal=True``, key / value lengths that differ, and
    a mask on another device; and a ``scale`` that is not finite (NaN or inf, which PyTorch's
    backends turn into NaN or zeros depending on which one runs). An empty call (no query
    rows, or an empty value) is checked in full too, where PyTorch returns its zeros without
    looking at the other arguments.
    """
    q, k, v = query, key, value
    # Each check below has a fast test for the common call in front of the loop that finds and
    # names the failing argument: this runs on every call, decode steps included.
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        for name, t in (("query", q), ("key", k), ("value", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    is_causal = _flag("is_causal", is_causal)
    enable_gqa = _flag("enable_gqa", enable_gqa)
    dropout = _real("dropout_p", dropout_p, "a float in [0, 1]")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    if scale is not None:
        scale = _real("scale", scale, "a finite float, a 0-d tensor or None")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (len(qs) >= 2 and len(ks) >= 2 and len(vs) >= 2
            and q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dim() < 2:
                raise ValueError(f"{name} must have at least 2 dims (..., seq, dim), got shape {_shape(t)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype "
                                "(float16, bfloat16, float32, float64)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device; got {q.device}, {k.device}, {v.device}")
    L, E, S, Ev = qs[-2], qs[-1], ks[-2], vs[-1]
    if ks[-1] != E:
        raise ValueError(f"query head dim {E} != key head dim {ks[-1]}; they must match")
    if vs[-2] != S:
        raise ValueError(f"key has {S} positions but value has {vs[-2]}; they must match")

    # Batch dims (all but the last two) broadcast as in torch.matmul. Under enable_gqa, dim -3
    # holds heads: query head h reads key head h // (Hq // Hk) and value head h // (Hq // Hv).
    rank = max(len(qs), len(ks), len(vs))
    qb, kb, vb = tuple(qs[:-2]), tuple(ks[:-2]), tuple(vs[:-2])
    if enable_gqa:
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dim() < 3:
                raise ValueError(f"enable_gqa=True needs a heads dim (..., H, seq, dim); {name} has shape {_shape(t)}")
        hq = qs[-3]
        for name, h in (("key", ks[-3]), ("value", vs[-3])):
            if h == 0 or hq % h:
                raise ValueError(f"{name} has {h} heads, query has {hq}; {hq} is not a multiple of {h}")
        kb, vb = (*kb[:-1], hq), (*vb[:-1], hq)
    elif len(qs) >= 3 and len(ks) >= 3 and qs[-3] != ks[-3] and 1 not in (qs[-3], ks[-3]):
        raise ValueError(f"query has {qs[-3]} heads and key has {ks[-3]}; "
                         "pass enable_gqa=True for grouped-query attention")
    scores = qb if qb == kb else _broadcast(qb, kb, ("query", q), ("key", k))
    batch = scores if scores == vb else _broadcast(scores, vb, ("query", q), ("key", k), ("value", v))

    mask = as_causal_bias(attn_mask)
    if mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both "
                             "(use attend.bias.causal_* for causal masks)")
        if isinstance(mask, CausalBias):
            if (mask.seq_len_q, mask.seq_len_kv) != (L, S):
                raise ValueError(f"attn_mask is a CausalBias for ({mask.seq_len_q}, {mask.seq_len_kv}) but "
                                 f"query/key lengths are ({L}, {S})")
        elif not isinstance(mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a Tensor, a CausalBias or None, got {type(mask).__name__}")
        else:
            if mask.dtype not in (torch.bool, torch.float32, q.dtype):
                raise TypeError(f"attn_mask has dtype {mask.dtype}; expected torch.bool, torch.float32 or the "
                                f"query dtype {q.dtype}")
            if mask.device != q.device:
                raise ValueError(f"attn_mask is on {mask.device} but query is on {q.device}")
            target = (*scores, L, S)
            if mask.dim() < 2:
                raise ValueError(f"attn_mask must have at least 2 dims (..., L, S), got shape {_shape(mask)}")
            if _broadcast_or_none(mask.shape, target) != target:
                raise ValueError(f"attn_mask of shape {_shape(mask)} does not broadcast to the scores' shape "
                                 f"(..., L, S) = {target}")

    # The backends' layout: at least one batch dim for heads, shared batch dims, query heads =
    # output heads. A broadcast is materialized (rare; the fused kernels assume real strides).
    nb = (1,) * (max(rank, 3) - 2 - len(batch)) + batch
    heads = nb[-1]
    hk, hv = _heads(ks, enable_gqa, heads), _heads(vs, enable_gqa, heads)
    q_n = _expand(q, (*nb, L, E))
    k_n = _expand(k, (*nb[:-1], hk, S, E))
    v_n = _expand(v, (*nb[:-1], hv, S, Ev))
    if isinstance(mask, torch.Tensor):
        if mask.dim() < len(nb) + 2:
            mask = mask.reshape((1,) * (len(nb) + 2 - mask.dim()) + tuple(mask.shape))
        if mask.dtype != torch.bool and mask.dtype != q.dtype:  # float32 with another query dtype, as PyTorch takes
            mask = mask.to(q.dtype)
    p = SDPAParams(q_n, k_n, v_n, mask, dropout, is_causal, hk != heads or hv != heads)
    if L == 0 or 0 in vs:
        return Call(p, scale, (*qs[:-1], Ev), zeros=True)
    return Call(p, scale, (*batch, L, Ev))


def _broadcast_or_none(a, b) -> tuple[int, ...] | None:
    """``torch.broadcast_shapes(a, b)``, or None where they do not broadcast; in plain Python, since
    torch's costs tens of microseconds of host time per call."""
    if a == b:
        return tuple(a)
    n = max(len(a), len(b))
    out = []
    for x, y in zip((1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def _heads(shape: torch.Size, gqa: bool, heads: int) -> int:
    # Grouped heads stay as they are; a head dim of 1 broadcast without GQA is one shared head too.
    h = shape[-3] if len(shape) >= 3 else 1
    return h if gqa or h == 1 else heads


def _expand(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if t.shape == shape:  # the common call: no view op (host time per call)
        return t
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    return t if t.shape == shape else t.expand(shape).contiguous()


def from_params(params: object) -> Call:
    """``prepare`` for an :class:`SDPAParams`, or PyTorch's ``torch.backends.cuda.SDPAParams``."""
    p = params
    return prepare(p.query, p.key, p.value, p.attn_mask, p.dropout, p.is_causal, None, p.enable_gqa)


def fused_reasons(p: SDPAParams, name: str) -> list[str]:
    """Calls no fused kernel takes, whatever its device: they go to MATH (as in PyTorch)."""
    reasons = []
    hk, hv = p.key.shape[-3], p.value.shape[-3]
    if hk != hv:
        reasons.append(f"{name} needs one head count for key and value; got {hk} and {hv}")
    if 0 in p.query.shape[:-2] or 0 in (hk, hv):
        reasons.append(f"{name} takes no zero-size batch or head dim (query {_shape(p.query)}, key {_shape(p.key)}); "
                       "the output is empty")
    if p.dropout >= 1.0:
        reasons.append(f"{name} does not take dropout_p={p.dropout} (every weight dropped: the output is 0)")
    return reasons


def to_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) -> (B, H, L, E); 3-D inputs become one batch of their first dim as heads."""
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def default_scale(head_dim: int, scale: float | None) -> float:
    # Head dim 0: every score is an empty sum (0), so any finite scale gives PyTorch's result.
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0

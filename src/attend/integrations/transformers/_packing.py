"""Packed layouts for ``varlen_attn``: a padded or packed batch's sequence lengths, read once per mask
tensor and shared by the layers of a forward."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from attend._flex import compiled as flex_compiled
from attend._hostcache import version
from attend.flex_attention import BlockMask

from ._masks import _packed_mod, _padded_mod, _sequence_ids


# ----------------------------------------------------------------------------------------------
# Packed layouts for varlen_attn
# ----------------------------------------------------------------------------------------------

@dataclass
class _Packing:
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    idx_q: torch.Tensor | None = None  # rows of the (B*L) query tokens kept (None = all)
    idx_k: torch.Tensor | None = None


# Host-side results per index tensor (padding masks, sequence ids): every layer of a forward shares
# the same tensor, so the sync that reads it happens once.
_MEMO: dict = {}


def _memo(t: torch.Tensor, extra, build):
    v = version(t)
    if v is None:  # an inference tensor: no version to tell a change by
        return build()
    key = (id(t), extra)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is t and hit[1] == v:
        return hit[2]
    with torch.inference_mode(False):  # kept for later calls, training ones too: never inference tensors
        value = build()
    _MEMO[key] = (weakref.ref(t, lambda _, key=key: _MEMO.pop(key, None)), v, value)
    return value


_DENSE_CU: dict = {}


def _dense_packing(B: int, L: int, S: int, device) -> _Packing:
    key = (B, L, S, str(device))
    if key not in _DENSE_CU:
        if len(_DENSE_CU) >= 64:  # generation grows S every step; keep the table small
            _DENSE_CU.clear()
        with torch.inference_mode(False):  # kept for later calls: a training step saves them for backward
            ar = torch.arange(B + 1, dtype=torch.int32, device=device)
            _DENSE_CU[key] = _Packing(ar * L, ar * S, L, S)
    return _DENSE_CU[key]


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _padding_packing(mask: torch.Tensor, L: int, S: int) -> _Packing:
    def build():
        keys = mask.to(torch.bool)[:, -S:]
        # queries are the last L positions (bottom-right); a decode step keeps its one query always
        queries = keys[:, -L:] if L > 1 else torch.ones_like(keys[:, -1:])
        nq, nk = queries.sum(-1, dtype=torch.int32), keys.sum(-1, dtype=torch.int32)
        return _Packing(_cu(nq), _cu(nk), int(nq.max()), int(nk.max()),
                        queries.flatten().nonzero().flatten(), keys.flatten().nonzero().flatten())
    return _memo(mask, ("pad", L, S), build)


def _ids_packing(ids: torch.Tensor) -> _Packing:
    def build():
        flat = ids.flatten()
        B, S = ids.shape
        start = torch.ones_like(flat, dtype=torch.bool)
        start[1:] = flat[1:] != flat[:-1]
        start[::S] = True  # each batch row starts a sequence
        cu = torch.cat([start.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
        longest = int(cu.diff().max())
        return _Packing(cu, cu, longest, longest)
    return _memo(ids, "ids", build)


def _may_be_packed(query, key, mask, kwargs) -> bool:
    """Whether the call's ``position_ids`` may reveal a packed batch (``_packed_from_positions``: a
    batch of one, L == S, no mask, no sequence lengths). Whether they restart is on the device, so
    inside a compiled graph no route may hang on it: there the call runs the BlockMask of the
    sequences they give (``_masks._positions_block_mask``)."""
    position_ids = kwargs.get("position_ids")
    L, S = query.shape[-2], key.shape[-2]
    return (mask is None and kwargs.get("cu_seq_lens_q") is None and isinstance(position_ids, torch.Tensor)
            and query.shape[0] == 1 and L == S and L >= 2 and position_ids.dim() == 2
            and position_ids.shape[-1] == L)


def _packed_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Sequence ids ``(1, S)`` when ``position_ids`` restart inside one row (a packed batch that
    reached the attention call without a mask: transformers builds none when a cache is passed),
    else None, for a call ``_may_be_packed`` takes. Read once per ``position_ids`` tensor, not once
    per layer."""
    def build():
        ids = _sequence_ids(position_ids[:1])
        return ids if bool(ids[0, -1]) else None
    return _memo(position_ids, "positions", build)


def _mask_or_packing(query, key, attention_mask, kwargs: dict):
    """The mask a call is planned with: the model's, or where it passed none (and no sequence
    lengths), the packed batch's sequence ids that ``position_ids`` reveal (``_packed_from_positions``);
    a BlockMask the mask builder made in a compiled graph (``_block_mask_over``) that reaches an
    eager call (a layer Dynamo hands back, as reentrant activation checkpointing does), as the mask
    builder makes it outside the graph: the sequence ids or the padding mask it is over."""
    if isinstance(attention_mask, BlockMask) and isinstance(attention_mask.mask_mod, flex_compiled.BoundMod) \
            and attention_mask.mask_mod.fn in (_packed_mod, _padded_mod):
        return attention_mask.mask_mod.tensors[0]
    if _may_be_packed(query, key, attention_mask, kwargs):
        return _packed_from_positions(kwargs["position_ids"])
    return attention_mask


def _kwargs_packing(kwargs: dict) -> _Packing:
    def as_int(x):
        return int(x.max()) if isinstance(x, torch.Tensor) else int(x)
    cu_q, cu_k = kwargs["cu_seq_lens_q"].to(torch.int32), kwargs["cu_seq_lens_k"].to(torch.int32)
    max_q = kwargs.get("max_length_q")
    max_k = kwargs.get("max_length_k")
    max_q = as_int(max_q) if max_q is not None else int(cu_q.diff().max())
    max_k = as_int(max_k) if max_k is not None else int(cu_k.diff().max())
    return _Packing(cu_q, cu_k, max_q, max_k)


def _ids_from_cu(cu: torch.Tensor, total: int) -> torch.Tensor:
    marks = torch.zeros(total, dtype=torch.int32, device=cu.device)
    inner = cu[1:-1].long()
    # boundaries past the tokens add 0 (not selected out: a boolean index is a device sync)
    marks.index_add_(0, inner.clamp(max=total - 1), (inner < total).to(torch.int32))
    return marks.cumsum(0)[None]

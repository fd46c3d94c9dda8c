"""The attention function inside torch.compile: the routes that stay in the graph, and the graph break
for the others."""

from __future__ import annotations

import torch

from attend._flex import compiled as flex_compiled
from attend._versions import GRAPH_MADE_MODS, outside_graph
from attend.flex_attention import BlockMask, create_block_mask, flex_attention
from attend.flex_attention import AuxRequest as FlexAuxRequest

from ._common import _Call
from ._mods import _additive_mod, _band_mod, _capped_mod, _keys_mod, _tensor_mask_mod
from ._masks import _mask_of, _positions_block_mask, _with_window
from ._packing import _may_be_packed
from ._routes import _attention, _mask_kind, _sdpa, _with_sinks


def _traced_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, is_causal,
                      s_aux, **kwargs) -> tuple[torch.Tensor, None]:
    """``attention_forward`` inside torch.compile, with no graph break (``fullgraph=True`` holds) for:
    a call with no softcap or sinks whose mask is None (``_traced_mask``'s unpadded causal band, the
    window cutting no key) or a 4-D tensor, on attend's SDPA, whose kernels are custom ops; and a call
    with a softcap or sinks, or whose mask is None with a window that cuts keys, on flex_attention over
    the band or with a materialized mask (``_traced_flex``; from torch 2.13: ``GRAPH_MADE_MODS``).
    The other routes plan on the host from the mask's or ``position_ids``' values (a 2-D padding mask
    or a packed batch handed over directly: ``varlen_attn``, whose sequence lengths are host
    integers), or have no fused form with dropout, so they run outside the graph (``_outside_graph``):
    a graph break per call, which ``fullgraph=True`` refuses. A batch of one whose ``position_ids``
    may restart (``_may_be_packed``) runs flex over the BlockMask of its sequences
    (``_positions_block_mask``; before torch 2.13 it leaves the graph, as transformers'
    ``flash_attention_2`` does)."""
    L, S = query.shape[-2], key.shape[-2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"attend: sliding_window must be a positive int, got {sliding_window!r}")
    if GRAPH_MADE_MODS and _may_be_packed(query, key, attention_mask, kwargs) and kwargs.get("block_table") is None:
        attention_mask = _positions_block_mask(kwargs["position_ids"], bool(is_causal))
    if isinstance(attention_mask, BlockMask):  # _traced_mask's packed or padded batch: band and window included
        attention_mask = _with_window(attention_mask, sliding_window)
        if not dropout:
            return _traced_flex(query, key, value, attention_mask, "block", scaling, None, softcap, s_aux,
                                bool(is_causal)), None
        attention_mask = _mask_of(attention_mask)
    kind = _mask_kind(attention_mask, kwargs)
    window_cuts = sliding_window is not None and S > sliding_window
    plain = (kwargs.get("block_table") is None and kwargs.get("k_cache") is None and 0 not in query.shape
             and not _may_be_packed(query, key, attention_mask, kwargs))
    flex = softcap is not None or s_aux is not None or (kind == "none" and window_cuts)
    takes = kind in ("keys", "dense") or (kind == "none" and (L == 1 or L == S))  # (chunked prefill: outside)
    if plain and flex and takes and not dropout and GRAPH_MADE_MODS:
        window = sliding_window if window_cuts and kind == "none" else None  # (a mask tensor holds its window)
        out = _traced_flex(query, key, value, attention_mask, kind, scaling, window, softcap, s_aux, bool(is_causal))
        return out, None
    if not plain or flex or kind not in ("none", "keys", "dense"):
        return _outside_graph(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                              is_causal, s_aux, **kwargs)
    call = _Call("sdpa", kind, bool(is_causal) and kind == "none" and L > 1, None, [])
    gqa = query.shape[1] != key.shape[1]
    return _sdpa(call, query, key, value, attention_mask, dropout, scaling, gqa).transpose(1, 2), None


def _traced_flex(q, k, v, mask, kind: str, scale, window: int | None, softcap: float | None, s_aux,
                 causal: bool) -> torch.Tensor:
    """A call with a softcap or sinks (or a window that cuts keys) inside torch.compile, on
    flex_attention with no graph break: the mods are ``BoundMod``s of ``_mods``' bodies over
    the graph's tensors, and the BlockMask is built in the graph. ``kind`` "none" (``_traced_mask``'s
    band: queries at the keys' end): a decode step's keys, the window's last ones sliced (as
    eagerly), or for L == S the band's BlockMask from create_block_mask in the graph, so the call
    takes the band's routes as eagerly; no number of the mods depends on a length, which may be
    symbolic (chunked prefill, L < S, runs outside the graph). A materialized mask: a decode step's
    key vector or an additive mask goes into the score_mod (as eagerly); a bool mask gets its
    BlockMask from create_block_mask over it. "block": a packed or padded batch's BlockMask
    (``_block_mask_over``), as it is. ``(B, L, H, D)``."""
    B, H, L, _ = q.shape
    S = k.shape[-2]
    cap = float(softcap) if softcap is not None else None
    score_mod = block_mask = None
    if kind == "none" and L == 1:  # a decode step sees every key, or a window's last keys: a slice
        if window is not None:
            k, v = k[:, :, S - window:], v[:, :, S - window:]
    elif kind == "block":  # a packed or padded batch's (``_block_mask_over``)
        block_mask = mask
    elif kind == "none" and (causal or window is not None):  # L == S (``_traced_attention``): query i at key i
        block_mask = create_block_mask(flex_compiled.BoundMod(_band_mod, (), (0, window, causal)), None, None, L, S,
                                       device=q.device)
    elif mask.dtype != torch.bool:  # an additive mask, added to the capped scores
        score_mod = flex_compiled.BoundMod(_additive_mod, (mask.detach().expand(B, H, L, S),), (cap,))
    elif L == 1 and mask.shape[1] == 1:  # a decode step's key vector: -inf scores, no BlockMask
        score_mod = flex_compiled.BoundMod(_keys_mod, (mask[:, 0, 0, :].expand(B, S),), (cap,))
    else:
        m = flex_compiled.BoundMod(_tensor_mask_mod, (mask.expand(B, H, L, S),))
        block_mask = create_block_mask(m, B if mask.shape[0] > 1 else None, H if mask.shape[1] > 1 else None, L, S,
                                       device=q.device)
    if score_mod is None and cap is not None:
        score_mod = flex_compiled.BoundMod(_capped_mod, (), (cap,))
    aux = FlexAuxRequest(lse=True) if s_aux is not None else None
    res = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                         scale=None if scale is None else float(scale), enable_gqa=H != k.shape[1], return_aux=aux)
    if s_aux is None:
        return res.transpose(1, 2)
    out, aux_out = res
    return _with_sinks(out.transpose(1, 2), aux_out.lse.transpose(1, 2), s_aux)


_outside_graph = outside_graph(
    _attention, reason="attend: a 2-D padding mask or packed batch handed to the attention function, dropout with "
    "a softcap, sinks or a window, or (before torch 2.13) a batch of one whose position_ids may restart, a softcap, "
    "sinks or a window runs attend's flex_attention or varlen_attn outside the compiled graph (one graph break per "
    "attention call; they plan on the host from the mask's or position_ids' values): compile with fullgraph=False "
    "(docs/transformers.md, \"Under torch.compile\")")

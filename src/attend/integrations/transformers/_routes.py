"""The routes of an attention call outside torch.compile: its plan (``_plan``), then SDPA, ``varlen_attn``,
``flex_attention`` or the unfused path."""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

import attend
from attend._flex import varlen as flex_varlen
from attend._flex.trace import data_cells
from attend._hostcache import version
from attend.backends import kernel_for
from attend.bias import causal_lower_right
from attend.flex_attention import and_masks, create_block_mask, flex_attention
from attend.flex_attention import AuxRequest as FlexAuxRequest
from attend.varlen import AuxRequest, varlen_attn
from attend.varlen import refusal as varlen_refusal

from ._common import _Call, _FEATURE_PATH, _SCORE_KEYS_SOFTCAP, _UNFUSED_PATH, _VARLEN_SOFTCAP, _warn_once
from ._mods import _additive_mod, _capped, _keys_mod, _tensor_mask_mod
from ._packing import (_Packing, _dense_packing, _ids_from_cu, _ids_packing, _kwargs_packing, _mask_or_packing,
                       _memo, _padding_packing)
from ._unfused import _unfused


# ----------------------------------------------------------------------------------------------
# The routes
# ----------------------------------------------------------------------------------------------

def _mask_kind(mask, kwargs) -> str:
    if mask is None:
        return "packed" if kwargs.get("cu_seq_lens_q") is not None else "none"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attend: attention_mask of type {type(mask).__name__} is not supported; expected None, "
                        "a 2-D (B, S) padding mask or sequence ids, or a 4-D mask tensor (set "
                        "attn_implementation='attend' through from_config / set_attn_implementation so that "
                        "transformers builds the mask for it)")
    if mask.dim() == 2:
        return "padding" if mask.dtype == torch.bool else "packed"
    if mask.dim() == 4:
        return "keys" if mask.shape[-2] == 1 and mask.dtype == torch.bool else "dense"
    raise ValueError(f"attend: attention_mask has shape {tuple(mask.shape)}; expected (B, S) or (B, H, L, S)")


def _plan(query, key, value, mask, kwargs, *, dropout, sliding_window, softcap, s_aux, is_causal) -> _Call:
    if kwargs.get("block_table") is not None or kwargs.get("k_cache") is not None:
        raise NotImplementedError(
            "attend: transformers' paged continuous-batching cache (block_table / k_cache) is not served by "
            "'attend': continuous batching runs 'paged|attend' (transformers 5.17-5.22), which writes the cache "
            "through read_index / write_index; elsewhere use generate() with a DynamicCache or StaticCache")
    L, S = query.shape[-2], key.shape[-2]
    kind = _mask_kind(mask, kwargs)
    if kind == "padding" and mask.shape[-1] < S:
        raise ValueError(f"attend: attention_mask has shape {tuple(mask.shape)}; a 2-D padding mask needs a column "
                         f"for each of the S = {S} keys (its last S columns are read)")
    window = sliding_window if sliding_window is not None and kind not in ("keys", "dense") else None
    if window is not None and window <= 0:
        raise ValueError(f"attend: sliding_window must be a positive int, got {window!r}")
    if window is not None and S <= window and kind != "packed":
        window = None  # the window cuts no key
    features = [name for name, v in (("softcap", softcap), ("s_aux", s_aux)) if v is not None]
    # one query sees every key; a 4-D mask is the whole mask (transformers built the band into it)
    causal = bool(is_causal) and not (L == 1 and kind in ("none", "padding")) and kind not in ("keys", "dense")
    decode_sinks = s_aux is not None and softcap is None and kind == "keys" and L == 1
    needs_flex = softcap is not None or (s_aux is not None and kind in ("keys", "dense") and not decode_sinks)
    needs_varlen = (window is not None or kind == "packed" or (kind == "padding" and L > 1) or s_aux is not None)
    if (needs_flex or needs_varlen) and dropout:
        what = "a softcap" if softcap is not None else "sinks with a mask tensor" if needs_flex else \
            "padding, packing, a sliding window or sinks"
        return _Call("unfused", kind, causal, window, features,
                     f"dropout {dropout} with {what}: flex_attention and varlen_attn have no dropout; " + _UNFUSED_PATH)
    packed = kind == "packed" or (kind == "padding" and L > 1)
    # varlen_attn's own limits (one head dim, the Triton core's dtypes and head dims)
    varlen_why = varlen_refusal(query, key, value) if needs_varlen or (needs_flex and packed) else None
    if (needs_flex and softcap is not None and packed and varlen_why is None
            and flex_varlen.fused(kernel_for(query), (query, key, value))):
        reason = "; ".join(f"{f}: {_VARLEN_SOFTCAP if f == 'softcap' else _FEATURE_PATH[f]}" for f in features)
        return _Call("varlen", kind, causal, window, features, reason)
    if needs_flex:
        # a decode step's key padding (a key vector holding no band: mask_for_attend puts a sliding
        # window that cuts keys into it) as -inf scores; a 2-D padding mask's window is a slice
        score_keys = L == 1 and not causal and (kind == "padding" or (
            kind == "keys" and mask.shape[1] == 1 and mask.shape[-1] == S
            and (sliding_window is None or S <= sliding_window)))
        paths = dict(_FEATURE_PATH, softcap=_SCORE_KEYS_SOFTCAP) if score_keys else _FEATURE_PATH
        reason = "; ".join(f"{f}: {paths[f]}" for f in features)
        return _Call("flex", kind, causal, window, features, reason, score_keys=score_keys)
    if (decode_sinks or needs_varlen) and varlen_why is not None:
        what = "sinks" if s_aux is not None else "padding, packing or a sliding window"
        return _Call("unfused", kind, causal, window, features,
                     f"{what}: varlen_attn refuses the call ({varlen_why}); " + _UNFUSED_PATH)
    if decode_sinks:  # decode: one query per row, its keys unpadded
        return _Call("varlen", kind, False, None, features, "s_aux: " + _FEATURE_PATH["s_aux"])
    if needs_varlen:
        return _Call("varlen", kind, causal, window, features,
                     "s_aux: " + _FEATURE_PATH["s_aux"] if s_aux is not None else "")
    return _Call("sdpa", kind, causal, window, features)


def _sdpa(call: _Call, q, k, v, mask, dropout, scale, gqa):
    L, S = q.shape[-2], k.shape[-2]
    if call.mask_kind in ("keys", "dense"):
        return attend.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                   enable_gqa=gqa)
    if call.mask_kind == "padding":  # one query: its padded keys only
        mask = mask.to(torch.bool)[:, None, None, -S:]
        return attend.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                   enable_gqa=gqa)
    if call.causal and L == S:
        return attend.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                                   enable_gqa=gqa)
    bias = causal_lower_right(L, S) if call.causal else None
    return attend.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B * N, H, D): free for the (B, N, H, D) projections models pass."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])


def _packing(call: _Call, q, k, mask, kwargs) -> _Packing:
    B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
    if call.mask_kind == "packed":
        if mask is not None:
            return _ids_packing(mask)
        return _kwargs_packing(kwargs)
    if call.mask_kind == "padding":
        return _padding_packing(mask, L, S)
    if call.mask_kind == "keys":
        return _padding_packing(mask.reshape(mask.shape[0], -1), L, S)
    return _dense_packing(B, L, S, q.device)


def _varlen(call: _Call, q, k, v, mask, scale, gqa, s_aux, kwargs, softcap=None):
    B, H, L, D = q.shape
    p = _packing(call, q, k, mask, kwargs)
    qp, kp, vp = _tokens(q), _tokens(k), _tokens(v)
    if p.idx_q is not None:
        qp, kp, vp = qp.index_select(0, p.idx_q), kp.index_select(0, p.idx_k), vp.index_select(0, p.idx_k)
    left = call.window - 1 if call.window is not None else -1
    right = 0 if call.causal else left
    aux = AuxRequest(lse=True) if s_aux is not None else None
    out = varlen_attn(qp, kp, vp, p.cu_q, p.cu_k, p.max_q, p.max_k, return_aux=aux, scale=scale,
                      window_size=(left, right), enable_gqa=gqa, score_mod=_score_mod(softcap, None))
    if s_aux is not None:
        out, lse = out  # out (T, H, D), lse (H, T)
        out = _with_sinks(out, lse.transpose(0, 1), s_aux)
    if p.idx_q is not None:
        out = out.new_zeros(B * L, H, out.shape[-1]).index_copy(0, p.idx_q, out)
    return out.view(B, L, H, -1)


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, s_aux: torch.Tensor) -> torch.Tensor:
    """``out (..., H, D)`` with ``lse (..., H)`` (natural log) and one sink logit per head ``s_aux (H,)``.

    A sink is one more logit per head that takes softmax mass and gives no value:
    softmax over [scores, s] @ [V; 0] = out * Z / (Z + e^s) = out * sigmoid(lse - s). A row that sees
    no key (lse = -inf) stays 0. Autograd carries the gradient to ``s_aux`` and, through ``lse``,
    into the kernel's backward."""
    keep = torch.sigmoid(lse - s_aux.to(torch.float32))[..., None]
    return (out.to(torch.float32) * keep).to(out.dtype)


# ----------------------------------------------------------------------------------------------
# softcap, and sinks with a mask tensor: attend's FlexAttention
# ----------------------------------------------------------------------------------------------

# BlockMasks this module built, most recent last: transformers calls the attention function once per
# layer with the same mask, so a forward builds one BlockMask per distinct mask (two for Gemma 2's
# alternating window / global layers), not one per layer. An entry holds the BlockMask's lists and
# weak references to the tensors the mask reads (padding mask, sequence ids, a 4-D mask), checked
# with their ``_version`` on every hit, so a freed or modified tensor never matches and a cached entry
# keeps no mask tensor alive. Generation makes a new key per step (S grows): the table stays bounded.
BLOCK_MASK_CACHE_SIZE = 16
_BLOCK_MASKS: OrderedDict = OrderedDict()


@dataclass
class _FlexMask:
    """The mask of one flex call: ``mask_mod`` (None: no mask), the batch / head counts it varies
    over (None: broadcast), the tensors it reads, and what else its BlockMask depends on."""

    mask_mod: object
    B: int | None
    H: int | None
    sources: tuple
    spec: tuple
    what: str = "none"
    # (B, S) bool: a decode step's key padding, applied by the score_mod as -inf scores instead
    keys: torch.Tensor | None = None


def _flex_mask(call: _Call, q, k, mask, kwargs) -> _FlexMask:
    B, Hq, L, _ = q.shape
    S = k.shape[-2]
    kind = call.mask_kind
    if call.score_keys:  # (a 2-D padding mask's window is already a slice: ``_decode_window``)
        # A decode step of a padded batch (mask_for_attend's key vector, or a 2-D padding mask): its
        # one query sees every valid key, so the padding goes into the score_mod as -inf scores and
        # the call needs no BlockMask, which would be new at every step (the keys grow, and so does
        # the mask); the score hooks' dense path serves it, with its decode plan
        # (attend/_flex/plan.py). Its cost: every key is read, padded or an empty static-cache slot
        # past the step's position, as SDPA's key-padding calls read them. A key vector that holds
        # a sliding window (``_plan``) keeps its BlockMask, which skips the keys the window cuts.
        keys = mask.to(torch.bool)[:, -S:] if kind == "padding" else mask[:, 0, 0, :]
        return _FlexMask(None, None, None, (), (), "key padding, as -inf scores in the score_mod (a decode "
                         "step: no BlockMask)", keys=keys.expand(B, S))
    if kind in ("keys", "dense"):
        if mask.dtype != torch.bool:  # an additive mask: the score_mod adds it
            return _FlexMask(None, None, None, (), (), "none (the additive mask is added by the score_mod)")
        try:
            m = mask.expand(B, Hq, L, S)
        except RuntimeError:
            raise ValueError(f"attend: attention_mask has shape {tuple(mask.shape)}; expected one broadcastable to "
                             f"(B, H, L, S) = {(B, Hq, L, S)}") from None

        def tensor_mask(b, h, q_idx, kv_idx):
            return _tensor_mask_mod(b, h, q_idx, kv_idx, m)
        return _FlexMask(data_cells(tensor_mask, "m"), B if mask.shape[0] > 1 else None, Hq if mask.shape[1] > 1 else None, (mask,),
                         ("tensor",), f"the {tuple(mask.shape)} bool mask read per block")
    parts, sources = [], ()
    W = call.window
    # query i sits at key position i + off (bottom-right: transformers' KV-cache prefill and decode)
    # The mods below hand their numbers and tensors only to traced ops (data_cells): each call's new
    # offset, padding view or ids reuse the trace cache's trace of the same mask (_flex/trace.py).
    off = S - L
    pos = data_cells(lambda b, q_idx: q_idx + off, "off")
    if kind == "padding":
        valid = mask.to(torch.bool)[:, -S:]
        sources = (mask,)
        parts.append(("key padding", data_cells(lambda b, h, q_idx, kv_idx: valid[b, kv_idx], "valid")))
        if L > 1:  # padded queries see nothing (0, as on the varlen route); a decode step's query is real
            parts.append(("query padding", data_cells(lambda b, h, q_idx, kv_idx: valid[b, q_idx + off],
                                                      "valid", "off")))
    elif kind == "packed":
        if mask is not None:  # sequence ids (B, S); L == S
            ids_q = ids_k = mask
            sources = (mask,)
        else:  # cu_seq_lens_q / _k: queries of sequence d are bottom-right in its keys
            cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
            ids_q = _memo(cu_q, ("flex ids", L), lambda: _ids_from_cu(cu_q.to(torch.int32), L))
            ids_k = _memo(cu_k, ("flex ids", S), lambda: _ids_from_cu(cu_k.to(torch.int32), S))
            sources = (cu_q, cu_k)
            if cu_k is not cu_q:
                shift = (cu_k[1:] - cu_q[1:]).to(torch.int32)[ids_q.long()]  # (1, L)
                pos = data_cells(lambda b, q_idx: q_idx + shift[b, q_idx], "shift")
        parts.append(("same sequence", data_cells(lambda b, h, q_idx, kv_idx: ids_q[b, q_idx] == ids_k[b, kv_idx],
                                                  "ids_q", "ids_k")))
    if call.causal:
        parts.append(("causal" + (" (bottom-right)" if L != S or kind == "packed" else ""),
                      lambda b, h, q_idx, kv_idx: kv_idx <= pos(b, q_idx)))
        if W is not None:
            parts.append((f"sliding window {W}", data_cells(lambda b, h, q_idx, kv_idx: kv_idx > pos(b, q_idx) - W,
                                                            "W")))
    elif W is not None:
        parts.append((f"sliding window {W} (both sides)",
                      data_cells(lambda b, h, q_idx, kv_idx: (kv_idx - pos(b, q_idx)).abs() < W, "W")))
    if not parts:
        return _FlexMask(None, None, None, (), ())
    batched = B if sources and sources[0].dim() == 2 and sources[0].shape[0] > 1 else None
    return _FlexMask(and_masks(*(fn for _, fn in parts)), batched, None, sources, (kind, call.causal, W),
                     " & ".join(name for name, _ in parts))


def _block_mask(fm: _FlexMask, L: int, S: int, device):
    """The BlockMask of ``fm`` for ``(L, S)``, from ``_BLOCK_MASKS`` where an entry fits."""
    if fm.mask_mod is None:
        return None
    versions = tuple(version(t) for t in fm.sources)
    key = (fm.spec, fm.B, fm.H, L, S, str(device), tuple(zip(map(id, fm.sources), versions)))
    if None in versions:  # an inference tensor: no version to tell a change by, so nothing is kept
        return create_block_mask(fm.mask_mod, fm.B, fm.H, L, S, device=device)
    hit = _BLOCK_MASKS.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], fm.sources)):
        _BLOCK_MASKS.move_to_end(key)
        bm = hit[1]
    else:
        with torch.inference_mode(False):  # kept for later calls, training ones too: never inference tensors
            bm = create_block_mask(fm.mask_mod, fm.B, fm.H, L, S, device=device)
        while len(_BLOCK_MASKS) >= BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASKS.popitem(last=False)
        stored = bm._lists_only()  # each call brings its own mask_mod over its own tensors
        _BLOCK_MASKS[key] = (tuple(weakref.ref(t) for t in fm.sources), stored)
    # the key names the mask (spec, lengths, the tensors and their versions): the lists are this
    # call's mask_mod's own, so a band mask keeps the dense kernels (attend/_flex/band.py)
    return bm._relabeled(fm.mask_mod)


def _score_mod(softcap: float | None, additive: torch.Tensor | None, keys: torch.Tensor | None = None):
    """``softcap * tanh(score / softcap)`` (Gemma 2's logit softcap; ``softcap`` a Python float is a
    runtime scalar of the generated code, not a constant in it), plus an additive 4-D mask after it,
    as transformers' eager attention adds its mask to the capped scores, or -inf where ``keys``
    ``(B, S)`` is False (a padded decode step's keys, ``_FlexMask.keys``); None for none of them."""
    if softcap is None and additive is None and keys is None:
        return None
    cap = float(softcap) if softcap is not None else None

    def softcap_mod(score, b, h, q_idx, kv_idx):
        return _capped(score, cap)

    def masked_mod(score, b, h, q_idx, kv_idx):
        return _additive_mod(score, b, h, q_idx, kv_idx, additive, cap)

    def padded_mod(score, b, h, q_idx, kv_idx):
        return _keys_mod(score, b, h, q_idx, kv_idx, keys, cap)
    # data for the trace cache: a new softcap, additive mask or padding reuses the trace (_flex/trace.py)
    if additive is not None:
        return data_cells(masked_mod, "additive")
    return data_cells(padded_mod, "keys") if keys is not None else data_cells(softcap_mod, "cap")


def _decode_window(call: _Call, q, k, v) -> tuple:
    """``(call, k, v)`` for flex: a decode step's query (key position S - 1) sees exactly the last
    ``window`` keys, so those are sliced (views) and the window dropped, rather than a window
    BlockMask built for each step's new length; any other call as it is."""
    if q.shape[-2] == 1 and call.window is not None and call.mask_kind in ("none", "padding"):
        first = k.shape[-2] - call.window
        return dataclasses.replace(call, window=None), k[:, :, first:], v[:, :, first:]
    return call, k, v


def _flex_args(call: _Call, q, k, v, mask, scale, softcap, s_aux, kwargs) -> tuple:
    """(flex_attention's positional arguments, its keyword arguments) for the call."""
    call, k, v = _decode_window(call, q, k, v)
    B, H, L, _ = q.shape
    S = k.shape[-2]
    fm = _flex_mask(call, q, k, mask, kwargs)
    additive = None
    if call.mask_kind in ("keys", "dense") and mask.dtype != torch.bool:
        additive = mask.detach().expand(B, H, L, S)
    aux = FlexAuxRequest(lse=True) if s_aux is not None else None
    return (q, k, v), dict(score_mod=_score_mod(softcap, additive, fm.keys), block_mask=_block_mask(fm, L, S, q.device),
                           scale=None if scale is None else float(scale), enable_gqa=H != k.shape[1], return_aux=aux)


def _flex(call: _Call, q, k, v, mask, scale, softcap, s_aux, kwargs) -> torch.Tensor:
    """flex_attention for the call: ``(B, L, H, D)``."""
    args, flex_kwargs = _flex_args(call, q, k, v, mask, scale, softcap, s_aux, kwargs)
    res = flex_attention(*args, **flex_kwargs)
    if s_aux is None:
        return res.transpose(1, 2)
    out, aux_out = res
    return _with_sinks(out.transpose(1, 2), aux_out.lse.transpose(1, 2), s_aux)


def _attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, is_causal, s_aux,
               **kwargs) -> tuple[torch.Tensor, None]:
    """``attention_forward`` outside torch.compile: plan the call (``_plan``), then run its route."""
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions", "attend: output_attentions=True is not supported (the weights are never "
                   "materialized); use attn_implementation='eager' to get them")
    if 0 in query.shape:
        raise ValueError(f"attend: query has a zero-size dim, shape {tuple(query.shape)}")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    attention_mask = _mask_or_packing(query, key, attention_mask, kwargs)
    call = _plan(query, key, value, attention_mask, kwargs, dropout=dropout, sliding_window=sliding_window,
                 softcap=softcap, s_aux=s_aux, is_causal=is_causal)
    gqa = query.shape[1] != key.shape[1]
    if call.route == "unfused":
        _warn_once(("unfused", call.reason), f"attend: not fused, so this call runs the unfused path: {call.reason}")
        out = _unfused(call, query, key, value, attention_mask, kwargs, dropout=dropout, scale=scaling,
                       softcap=softcap, s_aux=s_aux)
        return out.transpose(1, 2), None
    if call.route == "flex":
        return _flex(call, query, key, value, attention_mask, scaling, softcap, s_aux, kwargs), None
    if call.route == "varlen":
        return _varlen(call, query, key, value, attention_mask, scaling, gqa, s_aux, kwargs, softcap), None
    return _sdpa(call, query, key, value, attention_mask, dropout, scaling, gqa).transpose(1, 2), None

"""``attn_implementation="attend"`` for Hugging Face transformers models.

Importing this package registers ``"attend"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask builder)::

    import attend.integrations.transformers  # noqa: F401  (registers "attend")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attend")
    model.set_attn_implementation("attend")   # or switch a loaded model

It serves what transformers' flash-attention path serves, through attend's public API
(``attend.scaled_dot_product_attention``, ``attend.bias``, ``attend.varlen.varlen_attn``,
``attend.flex_attention``), never PyTorch's SDPA:

============================================  ==============================================
what the model asks                           what runs
============================================  ==============================================
causal, no padding (training, prefill)        SDPA ``is_causal=True`` (``L == S``)
chunked prefill with a KV cache (``L < S``)   SDPA with ``causal_lower_right(L, S)``
decode (``L == 1``)                           SDPA without a mask, or a key vector ``(B,1,1,S)``
                                              (padding, sliding window, a static cache's
                                              unfilled slots)
padding (``L > 1``)                           ``varlen_attn`` on the unpadded tokens
sliding window, ``S > window``                ``varlen_attn`` with ``window_size=(window-1, 0)``
packed batch (``position_ids`` restart, or    ``varlen_attn`` with those sequences
``cu_seq_lens_q/k``)
bidirectional (encoder-style) masks           SDPA with a key vector ``(B,1,1,S)``
GQA                                           ``enable_gqa=True``, K/V never repeated
learnable sinks ``s_aux`` (gpt-oss)           ``varlen_attn``'s LSE: ``out * sigmoid(lse - s_aux)``
                                              (with a mask tensor, ``flex_attention``'s LSE)
``softcap`` (Gemma 2), with any mask above    ``flex_attention``: score_mod
                                              ``softcap * tanh(score / softcap)``, the mask as
                                              a BlockMask (causal bottom-right, window, key
                                              padding, sequence ids or the mask tensor)
attention dropout with softcap, sinks,        the unfused path (warns once):
padding, packing or a window                  flex and ``varlen_attn`` have no dropout
any other mask function                       its ``(B,1,L,S)`` bool mask, materialized (warns)
continuous batching (``generate_batch``;      ``"paged|attend"``: the paged cache's ``update``,
transformers 5.17-5.22)                       then the packed route above
============================================  ==============================================

The mask builder never materializes an ``L x S`` mask where a band or a key vector describes it:
it hands the attention function ``None`` (a causal band, bottom-right aligned), the 2-D padding
mask ``(B, S)`` (bool), packed sequence ids ``(B, S)`` (int32) or a key vector ``(B, 1, 1, S)``.
Masks the model builds itself (4-D tensors) are used as they are. Inside torch.compile (torch 2.13
and later) a padded or packed batch from position 0 is a BlockMask built in the graph instead, and
its calls run ``flex_attention`` (``_masks._traced_mask``, ``_traced``; docs/transformers.md).

``softcap`` runs attend's FlexAttention: the Triton core's flex mode, forward and backward, with
the softcap a runtime scalar of the generated score hook: a new softcap value generates no code
(flex keeps 0.5, 1 and 2 as literals, so those three values are one more structure each).
Its BlockMask is built once per mask, not once per layer: ``_routes._BLOCK_MASKS`` keeps the last
``BLOCK_MASK_CACHE_SIZE`` of them (a constant, read in ``_routes``), keyed by the mask's form, ``(L, S)``, the device and the
identity and ``_version`` of the tensors it reads (held by weak reference: a cached entry keeps no
mask alive). A float 4-D mask is added to the capped scores by the score_mod, as eager attention
adds it. ``FUSED`` says which features a fused kernel serves; :func:`unfused_attention` (torch ops
over blocks of query rows, memory ``O(rows * S)``) remains for attention dropout with those
features. :func:`explain` says which route and backend a call takes. A feature that cannot be
served raises an error naming it.
"""

from __future__ import annotations

import torch

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # transformers is optional for attend; only this package needs it
    raise ImportError(
        "attend.integrations.transformers needs Hugging Face transformers (5.x): pip install transformers. "
        f"Importing it failed: {e}") from e

import attend
from attend.bias import causal_lower_right
from attend.flex_attention import explain as flex_explain

from ._common import FUSED, NAME, PAGED_NAME, UnfusedFeatureWarning
from ._masks import _read_in_graph, mask_for_attend
from ._packing import _mask_or_packing, _memo
from ._routes import BLOCK_MASK_CACHE_SIZE, _attention, _decode_window, _flex_args, _flex_mask, _plan
from ._traced import _traced_attention
from ._unfused import UNFUSED_BLOCK_BYTES, unfused_attention

__all__ = ["NAME", "PAGED_NAME", "FUSED", "BLOCK_MASK_CACHE_SIZE", "UnfusedFeatureWarning", "attention_forward",
           "mask_for_attend", "paged_attention_forward", "unfused_attention", "UNFUSED_BLOCK_BYTES", "explain",
           "register"]


# ----------------------------------------------------------------------------------------------
# The attention function transformers calls
# ----------------------------------------------------------------------------------------------

# ``attention_forward``'s default ``sliding_window``: the call named none (not even None).
NOT_NAMED = type("NotNamed", (), {"__repr__": lambda self: "NOT_NAMED"})()


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window=NOT_NAMED, softcap: float | None = None, is_causal: bool | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for ``"attend"``.

    ``query`` ``(B, H, L, D)``, ``key`` / ``value`` ``(B, H_kv, S, D)`` (views of the model's
    ``(B, L, H, D)`` projections, or a KV cache's tensors); ``attention_mask`` as built by
    :func:`mask_for_attend` or a 4-D mask of the model's own. Returns ``((B, L, H, D), None)``
    (attention weights are never materialized). Inside torch.compile: :func:`_traced_attention`.
    """
    sliding_window = _layer_window(module, sliding_window)
    args = (module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, is_causal, s_aux)
    if torch.compiler.is_compiling():
        return _traced_attention(*args, **kwargs)
    return _attention(*args, **kwargs)


def _layer_window(module, sliding_window):
    """The layer's sliding window: the call's ``sliding_window`` where it names one (None included);
    else the attention module's own (Qwen2-MoE sets it and passes none); else, where the config has
    no per-layer types, the config's (PhiMoE builds its masks from it and passes none). The mask
    builder hands over no window where a band will do (``mask_for_attend``), so a window the call
    does not name would be lost. None: no window."""
    if sliding_window is not NOT_NAMED:
        return sliding_window
    own = getattr(module, "sliding_window", None)
    if type(own) is int:
        return own
    config = getattr(module, "config", None)
    if config is None or getattr(config, "layer_types", None) is not None or \
            getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if type(window) is int else None


def _for_layer(value, module: torch.nn.Module):
    """A continuous-batching argument that may be a dict per layer type: this layer's entry."""
    if isinstance(value, dict):
        kind = "sliding_attention" if getattr(module, "sliding_window", None) else "full_attention"
        if kind not in value:
            raise ValueError(f"attend: {PAGED_NAME!r} got per-layer-type arguments for {sorted(value)} but this "
                             f"layer is a {kind} layer")
        return value[kind]
    return value


def _first_tokens(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """``x`` ``(1, H, N, D)`` cut to the ``cu[-1]`` tokens that belong to sequences (a padded batch
    has more: transformers pads to static shapes when it captures CUDA graphs)."""
    n = _memo(cu, "total", lambda: int(cu[-1]))
    return x if n == x.shape[-2] else x[:, :, :n]


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask=None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for ``"paged|attend"``: continuous batching
    (``model.generate_batch``, ``ContinuousBatchingManager``), which switches a model loaded with
    ``attn_implementation="attend"`` to this name (transformers 5.17 to 5.22; later versions run only
    their own implementations there).

    Each call writes the batch's new keys and values into the paged cache and reads back every
    sequence's keys (``cache.update`` with ``read_index`` / ``write_index``), then runs
    :func:`attention_forward` on the packed batch: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (this layer
    type's), each sequence's queries bottom-right in its keys, the layer's sliding window, softcap
    and sinks as in any other call (continuous batching builds no mask for this name; a mask passed
    anyway is not read: the sequence lengths say the same). ``block_table`` (the decode path of the
    flash implementations, which writes into the pages inside the kernel) is refused: transformers
    passes it only to them. Where flash-attn is installed, transformers switches a model to its
    flash implementation instead, unless the model is already set to ``"paged|attend"``.
    """
    cache = kwargs.pop("cache", None)
    if cache is None:
        raise ValueError(f"attend: {PAGED_NAME!r} is continuous batching's attention (it needs the paged cache "
                         "transformers passes there); use attn_implementation='attend' for other calls")
    if kwargs.get("block_table") is not None:
        raise NotImplementedError(
            f"attend: {PAGED_NAME!r} got a block_table, the flash implementations' decode path (their kernel "
            "writes the new keys into the pages); continuous batching passes read_index / write_index to other "
            "implementations")
    if dropout:
        raise ValueError(f"attend: {PAGED_NAME!r} serves inference; got dropout={dropout}")
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"attend: {PAGED_NAME!r} cannot run inside a CUDA graph capture: varlen_attn reads the "
                           "sequence lengths on the host; leave ContinuousBatchingConfig(use_cuda_graph=...) off, "
                           "its default for implementations that need a mask")
    if query.shape[0] != 1:
        raise ValueError(f"attend: {PAGED_NAME!r} expects the packed batch as one row, query (1, H, T, D); got "
                         f"shape {tuple(query.shape)}")
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                              read_index=kwargs.pop("read_index"), write_index=kwargs.pop("write_index"))
    key, value = (t.transpose(0, 1).unsqueeze(0) for t in (key, value))  # (T_k, H_kv, D) -> (1, H_kv, T_k, D)
    cu_q = kwargs.pop("cu_seq_lens_q")
    cu_k = _for_layer(kwargs.pop("cu_seq_lens_k"), module)
    kwargs["max_length_q"] = kwargs.pop("max_seqlen_q", None)
    kwargs["max_length_k"] = _for_layer(kwargs.pop("max_seqlen_k", None), module)
    kwargs.pop("position_ids", None)  # the sequence lengths say where each sequence starts
    q = _first_tokens(query, cu_q)
    out, _ = attention_forward(module, q, _first_tokens(key, cu_k), _first_tokens(value, cu_k), None, 0.0,
                               scaling, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, **kwargs)
    if q.shape[-2] != query.shape[-2]:  # padding tokens: zeros
        out = torch.cat([out, out.new_zeros(1, query.shape[-2] - q.shape[-2], *out.shape[2:])], dim=1)
    return out, None


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None, *, dropout: float = 0.0,
            scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
            is_causal: bool = True, s_aux: torch.Tensor | None = None, **kwargs) -> str:
    """Which route (SDPA, varlen_attn, flex_attention or the unfused path) an attention call with
    these arguments takes, why, and: for SDPA calls ``attend.explain``'s backend table; for flex
    calls the score_mod and the mask its BlockMask describes."""
    attention_mask = _mask_or_packing(query, key, attention_mask, kwargs)
    call = _plan(query, key, value, attention_mask, kwargs, dropout=dropout, sliding_window=sliding_window,
                 softcap=softcap, s_aux=s_aux, is_causal=is_causal)
    lines = [str(call)]
    if call.route == "sdpa":
        L, S = query.shape[-2], key.shape[-2]
        mask = None
        if call.mask_kind in ("keys", "dense"):
            mask = attention_mask
        elif call.mask_kind == "padding":
            mask = attention_mask.to(torch.bool)[:, None, None, -S:]
        elif call.causal and L != S:
            mask = causal_lower_right(L, S)
        lines.append(str(attend.explain(query, key, value, attn_mask=mask, dropout_p=dropout,
                                        is_causal=call.causal and L == S and mask is None, scale=scaling,
                                        enable_gqa=query.shape[1] != key.shape[1])))
    elif call.route == "flex":
        args, flex_kwargs = _flex_args(call, query, key, value, attention_mask, scaling, softcap, s_aux, kwargs)
        window = call.window
        call, key, value = _decode_window(call, query, key, value)
        fm = _flex_mask(call, query, key, attention_mask, kwargs)
        if window is not None and call.window is None:  # sliced: the mask is what is left over the slice
            fm.what = f"the last {window} keys (a decode step past the sliding window)" + (
                f", {fm.what}" if fm.mask_mod is not None else "")
        mods = ([f"softcap {softcap} * tanh(score / {softcap})"] if softcap is not None else []) + (
            ["+ the additive mask"] if call.mask_kind in ("keys", "dense") and attention_mask.dtype != torch.bool
            else []) + (["then -inf at padded keys"] if fm.keys is not None else [])
        lines.append(f"flex_attention: score_mod {' '.join(mods) or 'none'}; mask {fm.what}"
                     + ("; sinks merged by the lse" if s_aux is not None else ""))
        lines.append(str(flex_explain(*args, **flex_kwargs)))
    return "\n".join(lines)


def register() -> None:
    """Register ``"attend"`` with transformers' attention and mask interfaces, and ``"paged|attend"``
    (continuous batching) with its attention interface; inside torch.compile, have the mask builders
    that attend reads make readable mask functions (``_read_in_graph``). Done on import."""
    _read_in_graph()
    AttentionInterface.register(NAME, attention_forward)
    AttentionInterface.register(PAGED_NAME, paged_attention_forward)
    AttentionMaskInterface.register(NAME, mask_for_attend)


register()

"""``attn_implementation="attend"`` for Hugging Face transformers models.

Importing this module registers ``"attend"`` with transformers' ``AttentionInterface`` (the
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
attention dropout with softcap, sinks,        this module's unfused path (warns once):
padding, packing or a window                  flex and ``varlen_attn`` have no dropout
any other mask function                       its ``(B,1,L,S)`` bool mask, materialized (warns)
continuous batching (``generate_batch``;      ``"paged|attend"``: the paged cache's ``update``,
transformers 5.17-5.22)                       then the packed route above
============================================  ==============================================

The mask builder never materializes an ``L x S`` mask where a band or a key vector describes it:
it hands the attention function ``None`` (a causal band, bottom-right aligned), the 2-D padding
mask ``(B, S)`` (bool), packed sequence ids ``(B, S)`` (int32) or a key vector ``(B, 1, 1, S)``.
Masks the model builds itself (4-D tensors) are used as they are.

``softcap`` runs attend's FlexAttention: the Triton core's flex mode, forward and backward, with
the softcap a runtime scalar of the generated score hook: a new softcap value generates no code
(flex keeps 0.5, 1 and 2 as literals, so those three values are one more structure each).
Its BlockMask is built once per mask, not once per layer: ``_BLOCK_MASKS`` keeps the last
``BLOCK_MASK_CACHE_SIZE`` of them, keyed by the mask's form, ``(L, S)``, the device and the
identity and ``_version`` of the tensors it reads (held by weak reference: a cached entry keeps no
mask alive). A float 4-D mask is added to the capped scores by the score_mod, as eager attention
adds it. ``FUSED`` says which features a fused kernel serves; :func:`unfused_attention` (torch ops
over blocks of query rows, memory ``O(rows * S)``) remains for attention dropout with those
features. :func:`explain` says which route and backend a call takes. A feature that cannot be
served raises an error naming it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
    )
except ImportError as e:  # transformers is optional for attend; only this module needs it
    raise ImportError(
        "attend.integrations.transformers needs Hugging Face transformers (5.x): pip install transformers. "
        f"Importing it failed: {e}") from e

import attend
from attend._flex import compiled as flex_compiled
from attend._flex import varlen as flex_varlen
from attend._flex.trace import data_cells
from attend._hostcache import version
from attend._versions import GRAPH_MADE_MODS, outside_graph
from attend.backends import kernel_for
from attend.bias import causal_lower_right
from attend.flex_attention import AuxRequest as FlexAuxRequest
from attend.flex_attention import BlockMask
from attend.flex_attention import and_masks, create_block_mask, flex_attention
from attend.flex_attention import explain as flex_explain
from attend.varlen import AuxRequest, varlen_attn
from attend.varlen import refusal as varlen_refusal

__all__ = ["NAME", "PAGED_NAME", "FUSED", "BLOCK_MASK_CACHE_SIZE", "UnfusedFeatureWarning", "attention_forward",
           "mask_for_attend", "paged_attention_forward", "unfused_attention", "explain", "register"]

NAME = "attend"

# Features of transformers' attention calls beyond SDPA's, and whether attend's fused kernels serve
# them (forward and backward); _FEATURE_PATH names the path. Attention dropout with one of them is
# the exception: flex_attention and varlen_attn have no dropout, so such a call runs the unfused
# path (warned once).
FUSED = {"softcap": True, "s_aux": True}
_UNFUSED_PATH = ("attend.integrations.transformers.unfused_attention (torch ops over blocks of query rows, every "
                 "score computed twice, memory O(rows * S))")
_FEATURE_PATH = {
    "softcap": "attend.flex_attention with score_mod softcap * tanh(score / softcap) and the mask as a BlockMask "
               "(the Triton core's flex mode, forward and backward)",
    "s_aux": "the fused kernel's log-sum-exp: out * sigmoid(lse - s_aux) (varlen_attn, or flex_attention where the "
             "call also has a softcap or a mask tensor); the sinks' gradient reaches the kernel's backward through "
             "the lse",
}
# An inference call over packed sequences (continuous batching, a packed batch) or a padded batch's
# prefill takes its softcap on varlen_attn's score_mod instead: one launch over every sequence,
# where a BlockMask over the packed keys would give each query block every sequence's keys to walk
# and cost a create_block_mask per step (docs/transformers.md).
_VARLEN_SOFTCAP = "varlen_attn with score_mod softcap * tanh(score / softcap) (inference: the Triton core's score hooks)"
# A decode step's key padding goes into the score_mod (_FlexMask.keys): no BlockMask per step.
_SCORE_KEYS_SOFTCAP = ("attend.flex_attention with score_mod softcap * tanh(score / softcap), then -inf at padded "
                       "keys (a decode step: no BlockMask; the Triton core's flex mode)")


class UnfusedFeatureWarning(UserWarning):
    """A transformers attention call that attend serves outside its fused kernels (warned once per reason)."""


_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, UnfusedFeatureWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Mask builder: what transformers' create_*_mask hand the attention function.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _MaskSpec:
    causal: bool
    window: int | None
    packed: torch.Tensor | None  # (B, S) sequence ids of a packed batch


class _BuiltMask:
    """A mask function one of transformers' mask builders made inside torch.compile, with the
    builder's arguments beside it. Dynamo cannot read the closures of functions made in the graph
    (which ``_mask_parts`` reads outside it), but it reads an object's attributes. Calls the
    builder's own closure, so it masks exactly as that does (``_read_in_graph``)."""

    def __init__(self, fn, builder: str, free: dict):
        self.fn, self.builder, self.free = fn, builder, free
        self.__name__ = self.__qualname__ = getattr(fn, "__qualname__", builder)

    def __call__(self, batch_idx, head_idx, q_idx, kv_idx):
        return self.fn(batch_idx, head_idx, q_idx, kv_idx)


# The mask builders whose functions ``_mask_parts`` reads, with their parameters' names ("*": the
# name of all the positional arguments).
_READ_BUILDERS = {"and_masks": ("*mask_functions",), "sliding_window_overlay": ("sliding_window",),
                  "packed_sequence_mask_function": ("packed_sequence_mask",),
                  "remap_positions_for_packed_sequence": ("mask_function", "position_ids")}
_READ_IN_GRAPH: list[str] = []  # the builders _read_in_graph registered
_READ_MARK = "_attend_read_in_graph"  # set on a builder once substituted (a process substitutes it once)


def _read_in_graph() -> None:
    """Inside torch.compile, have each of transformers' ``_READ_BUILDERS`` return a ``_BuiltMask``
    around its own closure (``torch.compiler.substitute_in_graph``, once per process; torch 2.13 and
    later, ``GRAPH_MADE_MODS``, where the routes that use what is read run in the graph). Outside
    the graph the builders run as they are. Dynamo then traces a copy of the builder, which makes the
    same closure, so every attention implementation's masks are unchanged; attend's mask builder can
    tell a causal band, a sliding window and a packed batch inside the graph as it does outside."""
    if _READ_IN_GRAPH or not GRAPH_MADE_MODS:
        return
    import types

    from transformers import masking_utils

    for name, params in _READ_BUILDERS.items():
        builder = getattr(masking_utils, name, None)
        if not isinstance(builder, types.FunctionType):
            continue  # not in this transformers: its masks stay unread (materialized) in the graph
        if getattr(builder, _READ_MARK, False):  # (this module imported again: Dynamo keeps the first)
            _READ_IN_GRAPH.append(name)
            continue
        copy = types.FunctionType(builder.__code__, builder.__globals__, builder.__name__, builder.__defaults__,
                                  builder.__closure__)
        copy.__kwdefaults__ = builder.__kwdefaults__

        def built(*args, _copy=copy, _name=name, _params=params, **kwargs):
            free = {_params[0][1:]: args} if _params[0].startswith("*") else dict(zip(_params, args))
            return _BuiltMask(_copy(*args, **kwargs), _name, {**free, **kwargs})
        try:
            torch.compiler.substitute_in_graph(builder, skip_signature_check=True)(built)
        except ValueError:  # another library's substitute for it: that one stays, and these masks go unread
            continue
        setattr(builder, _READ_MARK, True)
        _READ_IN_GRAPH.append(name)


def _built_by(fn) -> tuple[str, dict] | None:
    """(the mask builder that made ``fn``, its arguments by name), or None: a ``_BuiltMask``'s, or
    outside the graph a closure's ``__qualname__`` (``builder.<locals>.inner``) and free variables.
    Inside it any other function is unread (a lambda, a model's own ``or_mask_function``, a builder
    not in ``_READ_BUILDERS``), so its mask is materialized."""
    if isinstance(fn, _BuiltMask):
        return fn.builder, fn.free
    if torch.compiler.is_compiling():
        return None  # Dynamo cannot read a closure (inspect.getclosurevars fails there)
    name = getattr(fn, "__qualname__", "")
    if ".<locals>." not in name:
        return None
    try:
        return name.split(".<locals>.")[0], inspect.getclosurevars(fn).nonlocals
    except TypeError:
        return None


def _mask_parts(fn) -> list | None:
    """The pieces of a transformers mask function that attend serves without a mask tensor, or
    None for a function it does not recognize (then the mask is materialized)."""
    if fn is causal_mask_function:
        return [("causal", None)]
    if fn is bidirectional_mask_function:
        return [("full", None)]
    built = _built_by(fn)
    if built is None:
        return None
    builder, free = built
    if builder == "and_masks" and "mask_functions" in free:
        parts = []
        for f in free["mask_functions"]:
            sub = _mask_parts(f)
            if sub is None:
                return None
            parts += sub
        return parts
    if builder == "sliding_window_overlay" and "sliding_window" in free:
        return [("window", int(free["sliding_window"]))]
    if builder == "packed_sequence_mask_function" and "packed_sequence_mask" in free:
        return [("packed", free["packed_sequence_mask"])]
    if builder == "remap_positions_for_packed_sequence" and "mask_function" in free:
        # Positions step by 1 inside a packed sequence, so a band over them is the band over indices.
        return _mask_parts(free["mask_function"])
    return None


def _mask_spec(fn) -> _MaskSpec | None:
    parts = _mask_parts(fn)
    if parts is None:
        return None
    kinds = [k for k, _ in parts]
    causal = "causal" in kinds
    windows = [w for k, w in parts if k == "window"]
    packed = [p for k, p in parts if k == "packed"]
    if not causal and ("full" not in kinds or windows):
        return None  # a bidirectional window, or a window alone: no band form here
    if len(packed) > 1:
        return None  # two sets of sequence ids: no one tensor says both
    return _MaskSpec(causal, min(windows) if windows else None, packed[0] if packed else None)


def _key_padding(attention_mask: torch.Tensor | None, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """The 2-D padding mask cut to the keys ``[kv_offset, kv_offset + kv_length)`` (bool, True =
    a real token), or None when every key is real."""
    if attention_mask is None:
        return None
    kv_offset = int(kv_offset)
    missing = kv_offset + kv_length - attention_mask.shape[-1]
    # Whether every key is real costs a device sync, once per generated token: asked of the mask as
    # it is (nonzero = real, as its bool conversion reads it), and not at all where a static cache's
    # unfilled slots (missing > 0) are among the keys: those are padding, unless there are no keys.
    if missing <= 0 or kv_length <= 0 or attention_mask.shape[0] == 0:
        if bool(attention_mask[:, kv_offset:kv_offset + kv_length].all()):
            return None
    am = attention_mask.to(torch.bool)
    if missing > 0:  # a static cache's unfilled slots are not keys yet
        am = torch.nn.functional.pad(am, (0, missing), value=False)
    return am[:, kv_offset:kv_offset + kv_length]


def _materialized(reason: str, **kw) -> torch.Tensor | None:
    _warn_once(("mask", reason), f"attend: {reason}; the attention mask is materialized as a (B, 1, L, S) bool "
               "tensor, and the call runs EFFICIENT with it (flex_attention, where a softcap or sinks need it)")
    kw.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(**kw)


def mask_for_attend(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                    mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask interface for ``"attend"``: describe the mask as cheaply as possible.

    Returns None (causal band, bottom-right aligned, plus the layer's ``sliding_window``), a 2-D
    bool padding mask ``(B, S)``, int32 packed sequence ids ``(B, S)``, a bool key vector
    ``(B, 1, 1, S)``, or (for mask functions with no band form) the materialized
    ``(B, 1, L, S)`` bool mask.
    """
    kw = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
              mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if torch.compiler.is_compiling():
        return _traced_mask(kw)
    spec = _mask_spec(mask_function)
    if spec is None:
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        return _materialized(f"mask function {name} has no band or key-padding form", **kw)
    if spec.packed is not None:
        if attention_mask is not None:
            return _materialized("a packed batch with a padding mask", **kw)
        return spec.packed.to(torch.int32)
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    pad = _key_padding(attention_mask, kv_length, kv_offset)
    if not spec.causal:
        keys = pad if pad is not None else torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        return keys[:, None, None, :]
    # Query i sits at position q_offset + i and key j at kv_offset + j: causal iff j <= i + d.
    d = q_offset - kv_offset
    window_cuts = spec.window is not None and kv_length > spec.window
    if q_length == 1:
        if pad is None and not window_cuts and not isinstance(d, torch.Tensor) and d == kv_length - 1:
            return None
        j = torch.arange(kv_length, device=device)
        keys = j <= d
        if spec.window is not None:
            keys = keys & (j > d - spec.window)
        keys = keys.expand(batch_size, kv_length) if pad is None else keys & pad
        return keys[:, None, None, :]
    if int(d) != kv_length - q_length:
        return _materialized(f"queries at offset {int(q_offset)} with {kv_length} key slots (a static cache) "
                             "are not bottom-right aligned", **kw)
    return pad


def _traced_mask(kw: dict):
    """``mask_for_attend`` inside torch.compile, where a route must not hang on the mask's values
    (``_key_padding`` reads the device). transformers' mask functions are read as outside the graph
    (``_read_in_graph``, torch 2.13 and later; before, only the plain causal function is known).
    - An unpadded causal mask with the queries at the keys' end is None: the band (a sliding window
      arrives as the attention call's ``sliding_window``, and runs flex in the graph,
      ``_traced_flex``).
    - Training or a first prefill (queries and keys both from position 0) with a 2-D padding mask
      (``_padded_mod``), or a packed batch (``_packed_mod``: transformers' sequence ids, which it
      builds from ``position_ids`` in the graph whether or not they restart, since it cannot look),
      is a BlockMask over that ``(B, S)`` tensor (``_block_mask_over``), built here once per forward.
      A bidirectional padding mask is the key vector ``(B, 1, 1, S)``, as outside the graph.
    - Every other mask is materialized, as transformers' ``sdpa`` does under torch.compile."""
    q_offset, kv_offset, fn = kw["q_offset"], kw["kv_offset"], kw["mask_function"]
    L, S, am = kw["q_length"], kw["kv_length"], kw["attention_mask"]
    spec = _mask_spec(fn) if GRAPH_MADE_MODS and _READ_IN_GRAPH else None
    aligned = type(q_offset) is int and type(kv_offset) is int and q_offset - kv_offset == S - L
    if spec is not None and aligned and q_offset == kv_offset == 0 and L == S:  # training, a first prefill
        if spec.packed is not None and am is None:
            return _block_mask_over(_packed_mod, spec.packed.to(torch.int32), spec, kw["batch_size"], S)
        if spec.packed is None and am is not None and am.dim() == 2 and am.shape[-1] == S:
            keys = am.to(torch.bool)
            if not spec.causal:
                return keys[:, None, None, :]
            return _block_mask_over(_padded_mod, keys, spec, kw["batch_size"], S)
    if am is None and aligned and (fn is causal_mask_function or (
            spec is not None and spec.causal and spec.packed is None)):
        return None
    kw.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(**kw)


def _packed_mod(b, h, q_idx, kv_idx, ids, window: int | None, causal: bool):
    """A packed batch's mask: the same sequence (``ids`` ``(B, S)``), and the band inside it (the
    positions restart at each sequence and step by 1 inside it, so the band over positions is the
    band over indices)."""
    return _banded(ids[b, q_idx] == ids[b, kv_idx], b, h, q_idx, kv_idx, window, causal)


def _padded_mod(b, h, q_idx, kv_idx, keys, window: int | None, causal: bool):
    """A padded batch's mask: the real keys (``keys`` ``(B, S)`` bool), in the band."""
    return _banded(keys[b, kv_idx], b, h, q_idx, kv_idx, window, causal)


def _banded(keep, b, h, q_idx, kv_idx, window: int | None, causal: bool):
    """``keep`` in the band of query i at key i (``_band_mod``), or as it is without one."""
    return keep & _band_mod(b, h, q_idx, kv_idx, 0, window, causal) if causal or window is not None else keep


def _block_mask_over(mod, t: torch.Tensor, spec: _MaskSpec, B: int, S: int):
    """The BlockMask of ``mod`` (``_packed_mod``, ``_padded_mod``) over ``t`` ``(B, S)`` and
    ``spec``'s band, for ``S`` queries and keys, inside torch.compile: built in the graph
    (create_block_mask's block-status op: the blocks a sequence's edge, padding or the band crosses
    are partial, the others skipped or taken whole). The attention calls run flex with it, where
    outside the graph they run ``varlen_attn``, whose sequence lengths are host integers. Nothing
    ``L x S`` is made."""
    mod = flex_compiled.BoundMod(mod, (t,), (spec.window, spec.causal))
    return create_block_mask(mod, B, None, S, S, device=t.device)


def _with_window(block_mask, window: int | None):
    """A ``_block_mask_over``'s BlockMask with the attention call's ``sliding_window`` too, where it
    cuts keys the mask's own window (if any) keeps: a model may build a causal mask and pass a
    window (as outside the graph, the call's window is applied)."""
    bound = block_mask.mask_mod
    own, causal = bound.numbers
    S = block_mask.seq_lengths[1]
    if window is None or S <= window or (own is not None and own <= window):
        return block_mask
    mod = flex_compiled.BoundMod(bound.fn, bound.tensors, (window, causal))
    return create_block_mask(mod, block_mask.shape[0], None, *block_mask.seq_lengths, device=bound.tensors[0].device)


def _mask_of(block_mask) -> torch.Tensor:
    """A ``_block_mask_over``'s mask as a ``(B, 1, L, S)`` bool tensor (a call with dropout, which
    flex has no form for)."""
    bound = block_mask.mask_mod
    t, = bound.tensors
    L, S = block_mask.seq_lengths
    i32 = dict(dtype=torch.int32, device=t.device)
    b = torch.arange(t.shape[0], **i32)[:, None, None, None]
    q, kv = torch.arange(L, **i32)[None, None, :, None], torch.arange(S, **i32)[None, None, None, :]
    return bound.fn(b, 0, q, kv, t, *bound.numbers).expand(t.shape[0], 1, L, S)


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
    inside a compiled graph no route may hang on it. torch.cond would keep it there, but Dynamo
    (torch 2.13) loses a DynamicCache's pending attributes around it."""
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
        breaks = position_ids[0].diff() != 1
        if not bool(breaks.any()):
            return None
        return torch.nn.functional.pad(breaks.cumsum(0, dtype=torch.int32), (1, 0))[None]
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


# ----------------------------------------------------------------------------------------------
# The routes
# ----------------------------------------------------------------------------------------------

@dataclass
class _Call:
    """How one attention call is served; ``str()`` says it."""

    route: str          # "sdpa", "varlen", "flex" or "unfused"
    mask_kind: str      # "none", "padding", "packed", "keys", "dense"
    causal: bool
    window: int | None  # keys per query, when it cuts any key
    features: list
    reason: str = ""
    # flex: a decode step's key padding goes into the score_mod as -inf scores (_flex_mask)
    score_keys: bool = False

    def __str__(self) -> str:
        w = f", sliding window {self.window}" if self.window else ""
        f = f", features {', '.join(self.features)}" if self.features else ""
        line = f"route: {self.route} (mask {self.mask_kind}, causal={self.causal}{w}{f})"
        return line + (f"; {self.reason}" if self.reason else "")


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


def _capped(score, cap: float | None):
    """Gemma 2's logit softcap, ``cap * tanh(score / cap)``; the score itself for no cap."""
    return score if cap is None else cap * torch.tanh(score / cap)


# The mods' bodies, module-level so that a compiled graph hands them to flex as ``BoundMod``s over
# its tensors (``_traced_flex``); the eager closures below call the same bodies.
def _capped_mod(score, b, h, q_idx, kv_idx, cap):
    return _capped(score, cap)


def _additive_mod(score, b, h, q_idx, kv_idx, additive, cap):
    return _capped(score, cap) + additive[b, h, q_idx, kv_idx]


def _keys_mod(score, b, h, q_idx, kv_idx, keys, cap):
    return torch.where(keys[b, kv_idx], _capped(score, cap), float("-inf"))


def _tensor_mask_mod(b, h, q_idx, kv_idx, m):
    return m[b, h, q_idx, kv_idx]


def _band_mod(b, h, q_idx, kv_idx, off: int, window: int | None, causal: bool):
    """Query i at key position i + off: causal keys j <= i + off, and j > i + off - window; without
    causal, |j - (i + off)| < window."""
    if not causal:
        return (kv_idx - (q_idx + off)).abs() < window
    keep = kv_idx <= q_idx + off
    return keep & (kv_idx > q_idx + off - window) if window is not None else keep


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


def _allowed_rows(call: _Call, L: int, S: int, mask, kwargs, device):
    """A function ``(q0, q1) -> bool mask`` of query rows ``q0:q1`` (broadcastable to
    ``(B, 1, q1 - q0, S)``, True = may attend) for the unfused path, or None for all keys."""
    if call.mask_kind in ("keys", "dense"):
        return mask if mask.dtype == torch.bool else None
    ids = None
    if call.mask_kind == "packed":
        ids = mask if mask is not None else _ids_from_cu(kwargs["cu_seq_lens_q"], L)
    if not call.causal and call.window is None and call.mask_kind not in ("padding", "packed"):
        return None

    def rows(q0: int, q1: int) -> torch.Tensor:
        allowed = torch.ones(1, 1, q1 - q0, S, dtype=torch.bool, device=device)
        i = torch.arange(q0, q1, device=device)[:, None] + (S - L)  # bottom-right
        j = torch.arange(S, device=device)[None, :]
        if call.causal:
            allowed = allowed & (j <= i)
        if call.window is not None:
            allowed = allowed & ((j > i - call.window) if call.causal else ((j - i).abs() < call.window))
        if call.mask_kind == "padding":
            allowed = allowed & mask.to(torch.bool)[:, None, None, -S:]
        elif ids is not None:
            allowed = allowed & (ids[:, None, q0:q1, None] == ids[:, None, None, :])
        return allowed
    return rows


def _rows(mask, q0: int, q1: int):
    """Query rows q0:q1 of a mask broadcastable to (B, 1 or H, L, S), or of a mask function."""
    if mask is None:
        return None
    if callable(mask):
        return mask(q0, q1)
    return mask if mask.shape[-2] == 1 else mask[..., q0:q1, :]


# Scores held at once by the unfused path: rows of fp32 (B, H, rows, S) blocks within this budget.
UNFUSED_BLOCK_BYTES = 1 << 28


def _scores(qb, k, scale, softcap, allowed, additive):
    """fp32 scores of query rows ``qb`` ``(B, H, m, D)`` against ``k`` ``(B, H_kv, S, D)``, with the
    softcap (and its tanh, for the backward) and the masks applied."""
    Hkv = k.shape[1]
    G = qb.shape[1] // Hkv
    raw = torch.matmul(qb.unflatten(1, (Hkv, G)), k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
    raw = raw.to(torch.float32) * scale                                  # (B, H, m, S)
    t = None
    if softcap is not None:
        t = torch.tanh(raw / softcap)
        raw = softcap * t
    if additive is not None:
        raw = raw + additive.to(torch.float32)
    if allowed is not None:
        raw = raw.masked_fill(~allowed, float("-inf"))
    return raw, t


def _grouped(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    return x.unflatten(1, (Hkv, x.shape[1] // Hkv))                     # (B, Hkv, G, ...)


class _UnfusedAttention(torch.autograd.Function):
    """Blocked over query rows: the forward keeps (out, lse), the backward recomputes each block's
    scores, so memory is O(rows * S), not O(L * S), in both directions."""

    @staticmethod
    def forward(ctx, q, k, v, s_aux, allowed, additive, scale, softcap, rows):
        B, H, L, _ = q.shape
        Hkv = k.shape[1]
        out = q.new_empty(B, H, L, v.shape[-1])
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
        sink = s_aux.to(torch.float32).view(1, H, 1) if s_aux is not None else None
        for q0 in range(0, L, rows):
            q1 = min(L, q0 + rows)
            s, _ = _scores(q[:, :, q0:q1], k, scale, softcap, _rows(allowed, q0, q1), _rows(additive, q0, q1))
            peak = s.amax(-1)                                            # (B, H, m)
            if sink is not None:
                peak = torch.maximum(peak, sink)
            peak = peak.masked_fill(torch.isinf(peak), 0.0)
            p = torch.exp(s - peak[..., None])
            total = p.sum(-1)
            if sink is not None:
                total = total + torch.exp(sink - peak)
            p = p / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
            out[:, :, q0:q1] = torch.matmul(_grouped(p.to(v.dtype), Hkv), v.unsqueeze(2)).flatten(1, 2)
            lse[:, :, q0:q1] = peak + torch.log(total)                  # -inf for a row that sees nothing
        ctx.save_for_backward(q, k, v, s_aux, out, lse)
        ctx.masks = (allowed, additive)
        ctx.args = (scale, softcap, rows)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, s_aux, out, lse = ctx.saved_tensors
        allowed, additive = ctx.masks
        scale, softcap, rows = ctx.args
        B, H, L, _ = q.shape
        Hkv = k.shape[1]
        kf, vf = k.to(torch.float32), v.to(torch.float32)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        dsink = torch.zeros(H, dtype=torch.float32, device=q.device) if s_aux is not None else None
        for q0 in range(0, L, rows):
            q1 = min(L, q0 + rows)
            qb = q[:, :, q0:q1]
            s, t = _scores(qb, k, scale, softcap, _rows(allowed, q0, q1), _rows(additive, q0, q1))
            row_lse = lse[:, :, q0:q1]
            p = torch.exp(s - row_lse.masked_fill(torch.isinf(row_lse), 0.0)[..., None])   # (B, H, m, S)
            do = dout[:, :, q0:q1].to(torch.float32)
            delta = (do * out[:, :, q0:q1].to(torch.float32)).sum(-1)    # (B, H, m)
            dp = torch.matmul(_grouped(do, Hkv), vf.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
            ds = p * (dp - delta[..., None])
            if dsink is not None:  # the sink's weight is exp(s_aux - lse); it adds no value
                dsink -= (torch.exp(s_aux.to(torch.float32).view(1, H, 1) - row_lse) * delta).sum((0, 2))
            if t is not None:
                ds = ds * (1 - t * t)
            ds = ds * scale
            dq[:, :, q0:q1] = torch.matmul(_grouped(ds, Hkv), kf.unsqueeze(2)).flatten(1, 2)
            dk += torch.matmul(_grouped(ds, Hkv).transpose(-1, -2), _grouped(qb.to(torch.float32), Hkv)).sum(2)
            dv += torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(do, Hkv)).sum(2)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink.to(s_aux.dtype) if dsink is not None else None,
                None, None, None, None, None)


def unfused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed=None, *,
                      additive: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
                      s_aux: torch.Tensor | None = None, dropout: float = 0.0, block_rows: int | None = None) -> torch.Tensor:
    """Attention in torch ops with dropout, for the calls the fused kernels do not serve: attention
    dropout with a softcap, sinks, padding, packing or a sliding window (flex_attention and
    varlen_attn have no dropout).

    ``query`` ``(B, H, L, D)``, ``key`` / ``value`` ``(B, H_kv, S, D)`` (``H`` a multiple of ``H_kv``;
    K/V heads are broadcast, not repeated); ``allowed``: bool, broadcastable to ``(B, 1, L, S)``
    (True = may attend), or a function ``(q0, q1) -> `` that mask's rows ``q0:q1``; ``additive``: a
    float mask added to the scores (no gradient); ``softcap``: scores become
    ``softcap * tanh(scores / softcap)`` (Gemma 2); ``s_aux`` ``(H,)``: one learnable sink logit per
    head that joins the softmax and adds no value (gpt-oss). A row that sees no key is 0.

    Runs over blocks of ``block_rows`` query rows (default: fp32 score blocks of
    ``UNFUSED_BLOCK_BYTES``) with a hand-written backward that recomputes them, so memory stays
    ``O(block_rows * S)``; gradients reach query, key, value and ``s_aux``. With ``dropout`` the
    probabilities are kept for autograd instead (``O(L * S)``). Returns ``(B, H, L, D)``.
    """
    B, H, L, D = query.shape
    S = key.shape[-2]
    if H % key.shape[1]:
        raise ValueError(f"query has {H} heads and key {key.shape[1]}; {H} is not a multiple of {key.shape[1]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if additive is not None:
        additive = additive.detach()
    if dropout:
        return _unfused_with_dropout(query, key, value, _rows(allowed, 0, L), _rows(additive, 0, L), scale, softcap,
                                     s_aux, dropout)
    rows = block_rows or max(1, min(L, UNFUSED_BLOCK_BYTES // max(1, 4 * B * H * S)))
    return _UnfusedAttention.apply(query, key, value, s_aux, allowed, additive, scale, softcap, int(rows))


def _unfused_with_dropout(q, k, v, allowed, additive, scale, softcap, s_aux, dropout):
    s, _ = _scores(q, k, scale, softcap, allowed, additive)
    H = q.shape[1]
    peak = s.amax(-1, keepdim=True)
    if s_aux is not None:
        sink = s_aux.to(torch.float32).view(1, H, 1, 1)
        peak = torch.maximum(peak, sink)
    peak = peak.detach().masked_fill(torch.isinf(peak), 0.0)
    p = torch.exp(s - peak)
    total = p.sum(-1, keepdim=True)
    if s_aux is not None:
        total = total + torch.exp(sink - peak)
    p = torch.nn.functional.dropout(p / total.clamp_min(torch.finfo(torch.float32).tiny), p=dropout)
    return torch.matmul(_grouped(p.to(v.dtype), k.shape[1]), v.unsqueeze(2)).flatten(1, 2)


def _unfused(call: _Call, q, k, v, mask, kwargs, *, dropout, scale, softcap, s_aux):
    L, S = q.shape[-2], k.shape[-2]
    allowed = _allowed_rows(call, L, S, mask, kwargs, q.device)
    additive = mask if call.mask_kind == "dense" and mask.dtype != torch.bool else None
    return unfused_attention(q, k, v, allowed, additive=additive, scale=scale, softcap=softcap, s_aux=s_aux,
                             dropout=dropout)


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
    a graph break per call, which ``fullgraph=True`` refuses. So does a batch of one whose
    ``position_ids`` may restart (``_may_be_packed``), as transformers' ``flash_attention_2`` does."""
    L, S = query.shape[-2], key.shape[-2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if isinstance(attention_mask, BlockMask):  # _traced_mask's packed or padded batch: band and window included
        attention_mask = _with_window(attention_mask, sliding_window)
        if not dropout:
            return _traced_flex(query, key, value, attention_mask, "block", scaling, None, softcap, s_aux,
                                bool(is_causal)), None
        attention_mask = _mask_of(attention_mask)
    kind = _mask_kind(attention_mask, kwargs)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"attend: sliding_window must be a positive int, got {sliding_window!r}")
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
    flex_attention with no graph break: the mods are ``BoundMod``s of this module's mod bodies over
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


_outside_graph = outside_graph(
    _attention, reason="attend: a 2-D padding mask or packed batch handed to the attention function, dropout with "
    "a softcap, sinks or a window, a batch of one whose position_ids may restart, or (before torch 2.13) a softcap, "
    "sinks or a window runs attend's flex_attention or varlen_attn outside the compiled graph (one graph break per "
    "attention call; they plan on the host from the mask's or position_ids' values): compile with fullgraph=False "
    "(docs/transformers.md, \"Under torch.compile\")")

PAGED_NAME = "paged|" + NAME


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

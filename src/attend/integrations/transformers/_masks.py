"""The mask builder: what transformers' ``create_*_mask`` hand the attention function, outside a
compiled graph and inside it."""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
from transformers import masking_utils
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from attend._flex import compiled as flex_compiled
from attend._versions import GRAPH_MADE_MODS
from attend.flex_attention import create_block_mask

from ._common import _warn_once
from ._mods import _band_mod


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
    for name, params in _READ_BUILDERS.items():
        builder = getattr(masking_utils, name, None)
        if not isinstance(builder, types.FunctionType):
            continue  # not in this transformers: its masks stay unread (materialized) in the graph
        if getattr(builder, _READ_MARK, False):  # (the package imported again: Dynamo keeps the first)
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


def _sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``(B, L)`` ids of the sequences ``position_ids`` give, as transformers makes them for a
    packed batch (``find_packed_sequence_indices``): a new sequence wherever the position does not
    step by 1."""
    return (position_ids.diff(dim=-1, prepend=position_ids[:, :1] - 1) != 1).cumsum(-1, dtype=torch.int32)


def _positions_block_mask(position_ids: torch.Tensor, causal: bool):
    """Inside torch.compile, a batch of one whose ``position_ids`` may restart (``_may_be_packed``: a
    cache is passed, so transformers built no packed-sequence mask): the BlockMask of its sequences
    (``_sequence_ids``). Built per attention call: the mask builder never saw ``position_ids``."""
    ids = _sequence_ids(position_ids)
    return _block_mask_over(_packed_mod, ids, _MaskSpec(causal, None, None), 1, ids.shape[-1])


def _with_window(block_mask, window: int | None):
    """A ``_block_mask_over``'s BlockMask with the attention call's ``sliding_window`` too, where it
    cuts keys the mask's own window (if any) keeps: a model may build a causal mask and pass a
    window (as outside the graph, the call's window is applied)."""
    bound = block_mask.mask_mod
    own, causal = bound.numbers
    S = block_mask.seq_lengths[1]
    if window is None or S <= window or (own is not None and own <= window):
        return block_mask
    # one BlockMask per window and forward, not per layer: kept on the forward's BlockMask
    windowed = getattr(block_mask, "_attend_windowed", None)
    if windowed is None:
        windowed = block_mask._attend_windowed = {}
    if window not in windowed:
        mod = flex_compiled.BoundMod(bound.fn, bound.tensors, (window, causal))
        windowed[window] = create_block_mask(mod, block_mask.shape[0], None, *block_mask.seq_lengths,
                                             device=bound.tensors[0].device)
    return windowed[window]


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

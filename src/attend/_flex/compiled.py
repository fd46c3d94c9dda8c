"""The flex front door inside ``torch.compile``: mods as constants, their tensors as op inputs.

Dynamo cannot trace the mod tracer (``trace.py`` runs ``torch.fx`` on the mod), and a tensor a
mod reads from its closure must become an input of the graph, or its gradient is lost. So, in
a compiled region, ``flex_attention`` does three things that Dynamo can trace:

1. :func:`describe` (``torch._dynamo.assume_constant_result``) traces the mod once, at trace
   time, with the real tensors, and returns constants: the traced graph's structure and Python
   numbers, encoded as a string (:func:`encode`), and, for each tensor the mod reads, where it
   lives: a path of closure cells, globals, container items and attributes from the mod
   (:func:`_locate`).
2. :func:`fetch` follows those paths, which Dynamo traces as reads of closure cells and
   attributes: the tensors become graph inputs (parameters keep their gradients).
3. ``ops.flex`` (the ``attend::flex_fwd`` / ``attend::flex_bwd`` custom ops) takes the tensors
   and the string; :func:`graph` decodes the string back into a ``ModGraph`` over them.

A tensor that is found on no such path (one the mod builds itself, say) makes :func:`describe`
raise :class:`FlexTraceError` naming it. Python numbers a mod reads (a softcap, a window) are
part of the constant: Dynamo guards on the mod, and a new closure recompiles.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import pickle
import types

import torch

from .trace import Capture, FlexTraceError, ModGraph, Ref, trace

_MAX_DEPTH = 4  # closure / attribute hops searched from the mod


def encode(graph: ModGraph) -> str:
    """The graph's structure and numbers (no tensors: their dtype and rank only), as a string."""
    plain = dataclasses.replace(graph, captures=[])
    sigs = tuple(c.signature for c in graph.captures)
    return base64.b64encode(pickle.dumps((plain, sigs), protocol=4)).decode("ascii")


@functools.lru_cache(maxsize=256)
def _decode(key: str) -> tuple[ModGraph, tuple]:
    return pickle.loads(base64.b64decode(key.encode("ascii")))


def graph(key: str, captures: list[torch.Tensor]) -> ModGraph | None:
    """The ModGraph that ``key`` (from :func:`encode`) describes, reading ``captures``; None for ""."""
    if not key:
        return None
    plain, sigs = _decode(key)
    caps = [Capture(t) for t in captures]
    got = tuple(c.signature for c in caps)
    if got != sigs:
        raise ValueError(f"flex_attention: the {plain.kind}_mod's captured tensors are {got} (dtype, rank); "
                         f"it was traced with {sigs}")
    return dataclasses.replace(plain, captures=caps)


def _children(obj) -> list[tuple[tuple, object]]:
    """(step, value) pairs one hop from ``obj``: closure cells and referenced globals of a
    function, items of a list, tuple or dict, attributes of an object (an nn.Module's
    parameters, buffers and submodules too)."""
    out = []
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                out.append((("cell", i), cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                out.append((("global", name), obj.__globals__[name]))
    elif isinstance(obj, torch.nn.Module):
        out += [(("attr", n), t) for n, t in obj._parameters.items() if t is not None]
        out += [(("attr", n), t) for n, t in obj._buffers.items() if t is not None]
        out += [(("attr", n), m) for n, m in obj._modules.items() if m is not None]
        out += [(("attr", n), v) for n, v in vars(obj).items() if isinstance(v, torch.Tensor)]
    elif isinstance(obj, (list, tuple)):
        out += [(("item", i), v) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        out += [(("item", n), v) for n, v in obj.items() if isinstance(n, (str, int))]
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        out += [(("attr", n), v) for n, v in vars(obj).items()]
    return out


def _locate(mod, tensor: torch.Tensor) -> tuple | None:
    """The shortest path of steps from ``mod`` to ``tensor`` (by identity), or None."""
    frontier, seen = [((), mod)], {id(mod)}
    for _ in range(_MAX_DEPTH):
        nxt = []
        for path, obj in frontier:
            for step, val in _children(obj):
                if val is tensor:
                    return path + (step,)
                if id(val) not in seen and (callable(val) or hasattr(val, "__dict__") or isinstance(
                        val, (list, tuple, dict))) and not isinstance(
                        val, (torch.Tensor, type, types.ModuleType, types.BuiltinFunctionType)):
                    seen.add(id(val))
                    nxt.append((path + (step,), val))
        frontier = nxt
    return None


@torch._dynamo.assume_constant_result
def describe(mod, kind: str) -> tuple[str, tuple]:
    """(:func:`encode` of the traced mod, or "" when it changes nothing; the path to each tensor it
    reads, in the graph's capture order). Runs once at trace time, outside the graph."""
    g = trace(mod, kind)
    if kind == "score" and isinstance(g.output, Ref) and g.output.i == 0:
        return "", ()
    if kind == "mask" and isinstance(g.output, Ref) and g.nodes[g.output.i].op == "const" and \
            g.nodes[g.output.i].args[0] is True:
        return "", ()
    paths = []
    for c in g.captures:
        path = _locate(mod, c.tensor)
        if path is None:
            raise FlexTraceError(
                f"flex_attention under torch.compile: the {kind}_mod {getattr(mod, '__name__', mod)!r} reads a "
                f"tensor of shape {tuple(c.tensor.shape)} ({c.tensor.dtype}) that is not a closure variable, "
                f"global or attribute of it (or of a function or object it holds); the compiled graph must take "
                f"it as an input. Bind it to a variable the mod closes over.")
        paths.append(path)
    return encode(g), tuple(paths)


def fetch(mod, path: tuple):
    """The object at ``path`` (from :func:`describe`) from ``mod``; Dynamo traces this."""
    obj = mod
    for kind, name in path:
        if kind == "cell":
            obj = obj.__closure__[name].cell_contents
        elif kind == "global":
            obj = obj.__globals__[name]
        elif kind == "item":
            obj = obj[name]
        else:
            obj = getattr(obj, name)
    return obj

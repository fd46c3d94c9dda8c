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
raise :class:`FlexTraceError` naming it. A Python number the mod reads
from a variable (a softcap, a window) is read at run time too, as an op argument; one that
changes the generated code (1.0, 2) or feeds Python arithmetic is guarded on instead: a new
value traces the graph again.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import pickle
import types
from typing import Callable

import torch

from .._versions import assume_constant_result
from .trace import _SAFE_MODULES, Capture, FlexTraceError, ModGraph, Ref, _code_names, function_reads, trace

_MAX_DEPTH = 16  # closure / attribute / item hops searched from the mod (the seen set bounds the search)


def encode(graph: ModGraph) -> str:
    """The graph's structure and its literal numbers (no tensors: their dtype and rank only), as a
    string."""
    plain = dataclasses.replace(graph, captures=[])
    sigs = tuple(c.signature for c in graph.captures)
    return base64.b64encode(pickle.dumps((plain, sigs), protocol=4)).decode("ascii")


@functools.lru_cache(maxsize=256)
def _decode(key: str) -> tuple[ModGraph, tuple]:
    return pickle.loads(base64.b64decode(key.encode("ascii")))


def graph(key: str, captures: list[torch.Tensor], numbers: list[float] = (),
          slots: list[int] = ()) -> ModGraph | None:
    """The ModGraph that ``key`` (from :func:`encode`) describes, reading ``captures``, with
    scalar slot ``slots[i]`` set to ``numbers[i]`` (the values the compiled graph read at run
    time); None for ""."""
    if not key:
        return None
    plain, sigs = _decode(key)
    if slots:
        scalars = list(plain.scalars)
        for j, v in zip(slots, numbers):
            scalars[j] = int(v) if isinstance(scalars[j], int) else float(v)
        plain = dataclasses.replace(plain, scalars=scalars)
    caps = [Capture(t) for t in captures]
    got = tuple(c.signature for c in caps)
    if got != sigs:
        raise ValueError(f"flex_attention: the {plain.kind}_mod's captured tensors are {got} (dtype, rank); "
                         f"it was traced with {sigs}")
    return dataclasses.replace(plain, captures=caps)


def _children(obj, names: frozenset) -> list[tuple[tuple, object]]:
    """(step, value) pairs one hop from ``obj``: closure cells and referenced globals of a
    function (its nested functions' names too), items of a list, tuple or dict, attributes of an
    object (an nn.Module's parameters, buffers and submodules too), and of a module or class
    other than torch / math / operator the attributes named in ``names`` (the code's names)."""
    out = []
    if isinstance(obj, types.FunctionType):
        out += function_reads(obj)
    elif isinstance(obj, torch.nn.Module):
        out += [(("attr", n), t) for n, t in obj._parameters.items() if t is not None]
        out += [(("attr", n), t) for n, t in obj._buffers.items() if t is not None]
        out += [(("attr", n), m) for n, m in obj._modules.items() if m is not None]
        out += [(("attr", n), v) for n, v in vars(obj).items() if isinstance(v, (torch.Tensor, int, float, tuple))]
    elif isinstance(obj, (list, tuple)):
        out += [(("item", i), v) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        out += [(("item", n), v) for n, v in obj.items() if isinstance(n, (str, int))]
    elif isinstance(obj, (types.ModuleType, type)):
        if obj.__name__.split(".")[0] not in _SAFE_MODULES:
            out += [(("attr", n), getattr(obj, n)) for n in sorted(names) if hasattr(obj, n)]
    elif hasattr(obj, "__dict__"):
        out += [(("attr", n), v) for n, v in vars(obj).items()]
    return out


def _walk(mod):
    """Every (path, value) reachable from ``mod`` (:func:`_children`), breadth first: each path is
    the shortest to its value."""
    frontier, seen = [((), mod, frozenset())], {id(mod)}
    for _ in range(_MAX_DEPTH):
        nxt = []
        for path, obj, names in frontier:
            if isinstance(obj, types.FunctionType):
                names = frozenset(_code_names(obj.__code__))
            for step, val in _children(obj, names):
                yield path + (step,), val
                if id(val) not in seen and (callable(val) or hasattr(val, "__dict__") or isinstance(
                        val, (list, tuple, dict))) and not isinstance(
                        val, (torch.Tensor, types.BuiltinFunctionType)):
                    seen.add(id(val))
                    nxt.append((path + (step,), val, names))
        frontier = nxt


def _locate(mod, tensor: torch.Tensor) -> tuple | None:
    """The shortest path of steps from ``mod`` to ``tensor`` (by identity), or None."""
    return next((path for path, val in _walk(mod) if val is tensor), None)


def _assign(mod, path: tuple, value) -> None:
    """Set the object at ``path`` (the last step a cell, global, list / dict item or attribute)."""
    parent = fetch(mod, path[:-1])
    kind, name = path[-1]
    if kind == "cell":
        parent.__closure__[name].cell_contents = value
    elif kind == "global":
        parent.__globals__[name] = value
    elif kind == "item":
        parent[name] = value
    else:
        setattr(parent, name, value)


def _number_sources(mod, kind: str, g: ModGraph) -> tuple[list, list]:
    """(for each scalar slot of ``g``, the path of the closure / global / attribute number it is,
    None for a literal of the mod's code; the (path, value) of every other number the mod reads).
    Each candidate is checked by changing it and tracing the mod again: a slot's source must move
    that slot to the new value and change nothing else. A number that changes the graph in any
    other way (a value computed from it in Python, or one that changes the generated code, such
    as 1.0 or 2) is returned to be guarded: the compiled graph is traced again when it changes."""
    found: list = [None] * len(g.scalars)
    guarded: list = []
    for path, val in list(_walk(mod)):
        if not isinstance(val, (bool, int, float)):
            continue
        if path[-1][0] == "item" and isinstance(fetch(mod, path[:-1]), tuple):
            guarded.append((path, val))  # a tuple cannot be changed in place to test it: guard it
            continue
        new = (not val) if isinstance(val, bool) else val + 7919 if isinstance(val, int) else val * 1.375 + 0.3125
        _assign(mod, path, new)
        try:
            g2 = trace(mod, kind)
        finally:
            _assign(mod, path, val)
        if g2.key == g.key and g2.scalars == g.scalars:
            continue  # not read by the mod
        moved = [j for j, (a, b) in enumerate(zip(g.scalars, g2.scalars)) if a != b]
        if g2.key == g.key and all(g2.scalars[j] == new for j in moved):
            for j in moved:
                found[j] = path
            continue
        guarded.append((path, val))
    return found, guarded


def _keeps_everything(g: ModGraph) -> bool:
    """Whether the traced mod changes nothing: a score_mod returning the score, a mask_mod True."""
    if g.kind == "score":
        return isinstance(g.output, Ref) and g.output.i == 0
    return isinstance(g.output, Ref) and g.nodes[g.output.i].op == "const" and g.nodes[g.output.i].args[0] is True


@assume_constant_result
def describe(mod, kind: str) -> tuple[str, tuple, tuple, tuple]:
    """(:func:`encode` of the traced mod, or "" when it changes nothing; the path to each tensor it
    reads, in the graph's capture order; the scalar slots that read a number from a variable, and
    each one's path; the (path, value) of the other numbers it reads). Runs once at trace time,
    outside the graph: the compiled graph reads the tensors and slot numbers through :func:`fetch`
    (inputs: a new value is never a stale constant) and guards on the other numbers."""
    g = trace(mod, kind)
    if _keeps_everything(g):
        return "", (), (), (), ()
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
    sources, guarded = _number_sources(mod, kind, g)
    slots = tuple(j for j, p in enumerate(sources) if p is not None)
    return encode(g), tuple(paths), slots, tuple(sources[j] for j in slots), tuple(guarded)


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


@dataclasses.dataclass(frozen=True, eq=False)
class BoundMod:
    """A mod as a module-level function and the tensors and numbers it takes after its usual
    arguments: ``fn(score, b, h, q_idx, kv_idx, *tensors, *numbers)`` for a score_mod (a mask_mod
    without ``score``). The form a mod made inside a compiled region takes to reach flex over the
    graph's tensors: Dynamo cannot hand a function made there, closing over them, to
    :func:`describe`, but it hands ``fn`` over (:func:`describe_bound`), and the tensors become the
    op's inputs. ``numbers`` are constants of the graph. Callable as the mod it stands for."""

    fn: Callable
    tensors: tuple = ()
    numbers: tuple = ()

    def __call__(self, *args):
        return self.fn(*args, *self.tensors, *self.numbers)


@assume_constant_result
def describe_bound(fn, kind: str, signatures: tuple, numbers: tuple) -> tuple[str, tuple, tuple]:
    """(:func:`encode` of ``BoundMod(fn, tensors, numbers)`` traced, "" when it changes nothing; for
    each of the graph's captures, the index of its tensor in ``tensors``; the (path from the
    BoundMod, value) of every number it reads, ``numbers`` and ``fn``'s globals alike, which the
    graph guards on), for tensors of these (dtype, rank) ``signatures``: the trace reads none of
    their values or sizes, so one-element stand-ins serve, at trace time, outside the graph.
    ``fn`` must close over nothing (its numbers would be read nowhere else)."""
    if getattr(fn, "__code__", None) is not None and fn.__code__.co_freevars:
        raise FlexTraceError(f"BoundMod: fn {getattr(fn, '__name__', fn)!r} closes over "
                             f"{', '.join(fn.__code__.co_freevars)}; pass those values as its tensors or numbers")
    stand_ins = tuple(torch.zeros((1,) * rank, dtype=getattr(torch, dtype)) for dtype, rank in signatures)
    bound = BoundMod(fn, stand_ins, tuple(numbers))
    g = trace(bound, kind)
    if _keeps_everything(g):
        return "", (), ()
    order = tuple(next(i for i, t in enumerate(stand_ins) if t is c.tensor) for c in g.captures)
    sources, guarded = _number_sources(bound, kind, g)
    guards = tuple(guarded) + tuple((p, fetch(bound, p)) for p in sources if p is not None)
    return encode(g), order, guards


def parts(mod, kind: str, described: tuple | None = None) -> tuple[str, list, tuple, list]:
    """(:func:`encode` of ``mod``, or "" when it changes nothing; the tensors it reads, graph inputs,
    in capture order; the scalar slots the op fills at run time; their numbers) inside a compiled
    region: :func:`describe` (or ``described``, its result the caller has) and :func:`fetch`, or
    for a :class:`BoundMod` :func:`describe_bound`. Numbers ``describe`` made guards are checked
    here, which Dynamo turns into guards."""
    if isinstance(mod, BoundMod):
        sigs = tuple(Capture(t).signature for t in mod.tensors)
        key, order, guards = describe_bound(mod.fn, kind, sigs, tuple(mod.numbers))
        for path, seen in guards:  # its numbers and fn's number globals are constants of the graph
            if fetch(mod, path) != seen:
                raise AssertionError("unreachable: describe_bound read this value")
        return key, [mod.tensors[i] for i in order], (), []
    key, paths, slots, sources, guards = described if described is not None else describe(mod, kind)
    caps = [fetch(mod, p) for p in paths]
    try:
        for path, seen in guards:  # numbers baked into the graph: Dynamo guards on each
            if fetch(mod, path) != seen:
                raise AssertionError("unreachable: describe read this value")
        numbers = [float(fetch(mod, p)) for p in sources]
    except AttributeError:  # a mod made inside the compiled function: its numbers are constants of it
        slots, numbers = (), []
    return key, caps, slots, numbers


def _describable(mod) -> bool:
    """Whether :func:`describe` may be handed ``mod`` inside a compiled region: a plain function
    that closes over nothing, or one made outside the region (its cells hold real values). A
    function made inside may close over the graph's tensors, which Dynamo cannot pass to a
    constant function (it reports no ``__closure__`` for such a function)."""
    if isinstance(mod, BoundMod):
        mod = mod.fn
    if not isinstance(mod, types.FunctionType):
        return False
    if not mod.__code__.co_freevars:
        return True
    try:
        mod.__closure__
    except AttributeError:
        return False
    return True


@assume_constant_result
def _describe_or_none(mod, kind: str):
    """:func:`describe`, or None where the mod cannot be traced or its tensors located (then
    create_block_mask runs outside the graph, whose eager call raises the trace's own error)."""
    try:
        return describe(mod, kind)
    except FlexTraceError:
        return None


def graph_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, separate_full_blocks: bool):
    """``create_block_mask`` inside torch.compile, in the graph (no graph break), for a mask_mod
    :func:`describe` can take there (``_describable``; a :class:`BoundMod`). The block status comes
    from the ``attend::flex_block_status`` op over the mod's tensors and run-time numbers, sizes
    included (symbolic ones too): ``block_mask.classify``, or a band's arithmetic as eagerly (a new
    document layout or window reuses the graph). The lists follow by ops of the graph, and the
    BlockMask records that they are its mask_mod's exact blocks (``BlockMask._graph_lists``), so the
    compiled call takes a band's routes as eagerly. None where the mod cannot be described in the
    graph: create_block_mask then runs outside it."""
    from ..ops import flex as flex_op
    from . import block_mask

    block = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if len(block) != 2 or not all(type(n) is int and n > 0 for n in block) or not _describable(mask_mod):
        return None
    described = None if isinstance(mask_mod, BoundMod) else _describe_or_none(mask_mod, "mask")
    if described is None and not isinstance(mask_mod, BoundMod):
        return None
    try:
        key, caps, slots, numbers = parts(mask_mod, "mask", described)
    except AttributeError:  # a tensor global of a function made inside: not read there
        return None
    if not key:
        return None  # keeps every key: no lists to build (outside, as ever)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    like = torch.empty(0, device=device)
    spec = flex_op.block_status_spec(key, tuple(slots), block)
    status = flex_op.block_status(caps, list(numbers), like, B or 1, H or 1, Q_LEN, KV_LEN, spec)
    out = block_mask.of_status(status, (Q_LEN, KV_LEN), block, mask_mod, separate_full_blocks)
    out._graph_lists = (mask_mod, out._kv_lists())
    return out

"""Trace a score_mod / mask_mod into a small typed graph (the mod's structure).

``torch.fx`` runs the mod once on proxies for ``score, b, h, q_idx, kv_idx``; every tensor the mod
reaches through a closure or a global becomes a *capture* (a kernel input), and each fx node is
translated into one :class:`Node` of a closed op set that :mod:`.codegen` can write as Triton and
:func:`evaluate` can run as torch ops. Nodes are hash-consed (common subexpressions share one
node) and typed by running the op once on one-element example tensors, so the graph carries
torch's own type promotion.

A graph's :attr:`ModGraph.key` names its structure: nodes, Python constants and the captures'
dtypes and ranks, never their values or sizes. That key is what generated code is cached by.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import sys
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

SCORE_INPUTS = ("score", "b", "h", "q_idx", "kv_idx")
INDEX_DTYPE = torch.int32  # b, h, q_idx, kv_idx, as PyTorch passes them


class FlexTraceError(RuntimeError):
    """A mod uses something the generator cannot translate; the message names it and the line."""


@dataclass(frozen=True)
class Ref:
    """An argument that is another node's value."""

    i: int


@dataclass(frozen=True)
class Node:
    op: str
    args: tuple  # Ref, Python int / float / bool, or torch.dtype
    dtype: torch.dtype


@dataclass
class Capture:
    """A tensor the mod reads: a kernel input passed as pointer + strides (its values and sizes
    are runtime data; only dtype and rank are structure)."""

    tensor: torch.Tensor

    @property
    def signature(self) -> tuple:
        return (str(self.tensor.dtype).replace("torch.", ""), self.tensor.dim())


@dataclass
class ModGraph:
    """A traced mod: ``nodes[0:5]`` are the inputs (score, b, h, q_idx, kv_idx); ``output`` the result."""

    kind: str  # "score" or "mask"
    nodes: list[Node]
    output: Ref | Any
    captures: list[Capture]
    lines: dict[int, str] = field(default_factory=dict)  # node -> the user's source line
    scalars: list = field(default_factory=list)  # values of the "scalar" nodes' slots (runtime data)
    # per slot, the closure number (``_Tagged.pos``) it was read from, or None; only a trace of
    # :func:`trace_cached` sets it. Not structure: the cache uses it to fill a hit's slots
    sources: list = field(default_factory=list, repr=False, compare=False)
    capture_sources: list = field(default_factory=list, repr=False, compare=False)  # per capture, likewise
    # the nodes' and output's part of ``key``, made once (nodes are never changed after tracing;
    # dataclasses.replace carries it to a cached trace's copies)
    nodes_key: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple:
        """The mod's structure: what generated code is cached by. The captures' part is read each
        time (a tensor's rank is the tensor's, not the trace's)."""
        if self.nodes_key is None:
            self.nodes_key = (tuple(_key_node(n) for n in self.nodes), _key_arg(self.output))
        return (self.kind, *self.nodes_key, tuple(c.signature for c in self.captures),
                tuple(type(v).__name__ for v in self.scalars))

    def loads(self) -> list[int]:
        """Indices of the load nodes (reads of a capture at an index expression)."""
        return [i for i, n in enumerate(self.nodes) if n.op == "load"]


def _key_arg(a):
    if isinstance(a, float):
        return ("f", repr(a))  # nan-safe, and 1 vs 1.0 stay apart
    if isinstance(a, torch.dtype):
        return ("dt", str(a))
    return a


def _key_node(n: Node) -> tuple:
    return (n.op, tuple(_key_arg(a) for a in n.args), str(n.dtype))


# ---------------------------------------------------------------------------------------------
# The op set: the ops a mod may use, what fx calls them, and how torch evaluates them.

_UNARY_FLOAT = {"exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "tanh": torch.tanh,
                "sigmoid": torch.sigmoid, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "floor": torch.floor,
                "ceil": torch.ceil, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf}
def _both_tensors(fn):
    """torch.minimum / maximum take tensors only; a Python operand becomes a 0-d tensor (which, as
    a scalar does, takes the other operand's dtype within its category)."""

    def call(a, b):
        other = a if isinstance(a, torch.Tensor) else b
        wrap = lambda x: x if isinstance(x, torch.Tensor) else torch.tensor(x, device=other.device)
        return fn(wrap(a), wrap(b))

    return call


TORCH_OPS: dict[str, Callable] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": torch.floor_divide, "remainder": torch.remainder, "pow": torch.pow,
    "minimum": _both_tensors(torch.minimum), "maximum": _both_tensors(torch.maximum),
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor,
    "neg": torch.neg, "abs": torch.abs, "not": operator.invert, "where": torch.where,
    **_UNARY_FLOAT,
}

_BINARY = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "truediv",
           operator.floordiv: "floordiv", operator.mod: "remainder", operator.pow: "pow",
           operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le", operator.gt: "gt",
           operator.ge: "ge", operator.and_: "and", operator.or_: "or", operator.xor: "xor",
           torch.add: "add", torch.sub: "sub", torch.subtract: "sub", torch.mul: "mul", torch.multiply: "mul",
           torch.div: "truediv", torch.true_divide: "truediv", torch.divide: "truediv",
           torch.floor_divide: "floordiv", torch.remainder: "remainder", torch.pow: "pow",
           torch.minimum: "minimum", torch.maximum: "maximum", torch.min: "minimum", torch.max: "maximum",
           torch.eq: "eq", torch.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt", torch.ge: "ge",
           torch.logical_and: "and", torch.logical_or: "or", torch.logical_xor: "xor",
           torch.bitwise_and: "and", torch.bitwise_or: "or", torch.bitwise_xor: "xor"}
_UNARY = {operator.neg: "neg", operator.abs: "abs", operator.invert: "not", abs: "abs",
          torch.neg: "neg", torch.abs: "abs", torch.logical_not: "not", torch.bitwise_not: "not",
          torch.special.expit: "sigmoid", torch.nn.functional.sigmoid: "sigmoid", torch.special.erf: "erf",
          **{getattr(torch, name): name for name in _UNARY_FLOAT}}
_METHOD_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "truediv", "true_divide": "truediv",
                  "floor_divide": "floordiv", "remainder": "remainder", "pow": "pow", "minimum": "minimum",
                  "maximum": "maximum", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
                  "logical_and": "and", "logical_or": "or", "logical_xor": "xor", "__and__": "and",
                  "__or__": "or", "__xor__": "xor", "bitwise_and": "and", "bitwise_or": "or"}
_LOGICAL = {torch.logical_not: "not", torch.logical_and: "and", torch.logical_or: "or", torch.logical_xor: "xor",
            "logical_not": "not", "logical_and": "and", "logical_or": "or", "logical_xor": "xor"}
_METHOD_UNARY = {"neg": "neg", "abs": "abs", "logical_not": "not", "bitwise_not": "not", "__invert__": "not",
                 "sigmoid": "sigmoid", **{name: name for name in _UNARY_FLOAT}}
# Functions and methods that ``_Builder`` writes as the ops above (its ``_<name>`` methods).
_COMPOSED = {torch.square: "_square", "square": "_square", torch.relu: "_relu", torch.nn.functional.relu: "_relu",
             "relu": "_relu", torch.sign: "_sign", "sign": "_sign", torch.log1p: "_log1p", "log1p": "_log1p",
             torch.special.log1p: "_log1p", torch.expm1: "_expm1", "expm1": "_expm1", torch.special.expm1: "_expm1",
             torch.nn.functional.softplus: "_softplus"}
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
          "int": torch.int32, "long": torch.int64, "bool": torch.bool}
SUPPORTED = ("+ - * / // % ** and comparisons, & | ^ ~, torch.where, abs, exp, exp2, log, log2, tanh, sigmoid, "
             "sqrt, rsqrt, floor, ceil, sin, cos, erf, square, relu, softplus, sign, log1p and expm1 (as log(1 + x) "
             "and exp(x) - 1), minimum / maximum, clamp, floor_divide / remainder, .to(dtype) "
             "and .float() / .int() ..., new_ones / new_zeros / new_full of size (), and captured tensors indexed "
             "by index expressions (bias[h], doc[b, q_idx], table[h, q_idx - kv_idx + c])")


# ---------------------------------------------------------------------------------------------
# Tracing

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _user_line() -> str:
    """``file:line: code`` of the innermost frame outside torch and attend's flex package."""
    f = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if not (path.startswith(_TORCH) or path.startswith(_HERE) or path.endswith("attend/flex_attention.py")):
            import linecache

            code = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
            return f"{f.f_code.co_filename}:{f.f_lineno}: {code}" if code else f"{f.f_code.co_filename}:{f.f_lineno}"
        f = f.f_back
    return "<unknown line>"


class _Tracer(fx.Tracer):
    """fx tracer that turns every tensor it meets into a capture and records the user's line."""

    def __init__(self):
        super().__init__(autowrap_modules=(math,))
        self.captures: list[torch.Tensor] = []

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            for i, t in enumerate(self.captures):
                if t is a:
                    break
            else:
                i = len(self.captures)
                self.captures.append(a)
            return self.create_node("get_attr", f"_capture{i}", (), {})
        return super().create_arg(a)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["attend_line"] = _user_line()
        return node


def trace(mod: Callable, kind: str) -> ModGraph:
    """Trace ``mod`` (a score_mod when ``kind == "score"``, else a mask_mod) into a :class:`ModGraph`."""
    if kind == "score":
        def root(score, b, h, q_idx, kv_idx):
            return mod(score, b, h, q_idx, kv_idx)
    else:
        def root(b, h, q_idx, kv_idx):
            return mod(b, h, q_idx, kv_idx)
    tracer = _Tracer()
    name = getattr(mod, "__name__", type(mod).__name__)
    _TAGS.active = True  # a tagged tensor (trace_cached) records its uses while the mod runs only
    try:
        graph = tracer.trace(root)
    except FlexTraceError:
        raise
    except Exception as e:  # data-dependent control flow, math.* on a proxy, ...
        raise FlexTraceError(f"{kind}_mod {name!r} cannot be traced at {_traceback_line(e)}: "
                             f"{type(e).__name__}: {e}. attend generates the mod into Triton, so it may use "
                             f"only tensor ops on its arguments (no Python control flow on them); "
                             f"supported: {SUPPORTED}") from None
    finally:
        _TAGS.active = False
    return _Builder(kind, name, tracer.captures).build(graph)


# ---------------------------------------------------------------------------------------------
# The trace cache: a mod seen again (same code, same closure values) is not traced again.
#
# Values are keyed by value (numbers) or identity (tensors), except in closure cells that a function
# declares data (``data_cells``): there a number is keyed by its type and a tensor by its dtype and
# rank, so a mod made again each call over new values (transformers' mask per decode step closes
# over ``S - L`` and a new key-padding view) is traced once per structure. The declaration is a
# promise that the function hands those values only to the traced ops (a number as an operand, a
# tensor indexed by index expressions): attend's own mods make it (the transformers integration);
# it is not inferred, since Python reads a number in ways nothing can observe (a tuple index,
# ``math.isinf``). The first trace runs with the declared values tagged (``_Tagged``,
# ``_TaggedTensor``): each number becomes a scalar slot of its own and each tensor a capture,
# which later calls fill from their own cells; a declared value the mod does use in Python
# anyway (as far as its dunders and torch functions tell) is keyed by value or identity instead.

TRACE_CACHE_SIZE = 64
_VARIANTS = 4  # traces kept per key: numbers that are structure (keyed by value) pick one
_TRACES: dict = {}  # key -> [(graph without captures, weak refs to its captures, binding)], oldest key first
TRACES = {"traced": 0, "cached": 0}  # counts (tests and benchmarks read them)

_SAFE_MODULES = ("torch", "math", "operator")  # modules a mod may name: their attributes are ops


def _code_names(code) -> set:
    """The global (and attribute) names a code object and every function nested in it use."""
    import types

    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


@functools.lru_cache(maxsize=1024)
def _sorted_code_names(code) -> tuple:
    """``_code_names`` in name order, once per code object (a mod's fingerprint reads it per call)."""
    return tuple(sorted(_code_names(code)))


def function_reads(fn) -> list[tuple[tuple, object]]:
    """What a function can read besides its arguments, as (step, value): its closure cells
    (("cell", i); an empty cell is left out) and the globals its code, and the code of functions
    nested in it, names (("global", name), in name order)."""
    out = []
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            out.append((("cell", i), cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    g = fn.__globals__
    out += [(("global", n), g[n]) for n in _sorted_code_names(fn.__code__) if n in g]
    return out


def _fingerprint(obj, tensors: list, depth: int = 0, cells: list | None = None):
    """A hashable key of what tracing ``obj`` (a mod, or a value it reads) depends on, or None
    where that cannot be known without tracing: functions by their code object (compared by
    content, and kept alive by the key), closure cells, defaults and the globals their code and
    nested code name; numbers, strings and None by value; tensors by identity (appended to
    ``tensors``: the caller checks each is a capture, so none was read into Python); torch, math
    and operator by name. Anything else (an object, a class or another module whose attributes
    the mod might read) is None. With ``cells`` given, an int or float in a closure cell a function
    declares data (``data_cells``) is keyed by its type, a tensor there by its dtype and rank, and
    either by its cell's position in ``cells`` (appended there), not by value or identity."""
    t = type(obj)
    if t is types.FunctionType:  # the common cases first, by exact type
        return _function_fingerprint(obj, tensors, depth, cells) if depth < 8 else None
    if obj is None or t is float or t is bool or t is int or t is str:
        return ("float", repr(obj)) if t is float else (t.__name__, obj)
    if isinstance(obj, (bool, int, str)):
        return (type(obj).__name__, obj)
    if isinstance(obj, float):
        return ("float", repr(obj))
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor", id(obj))
    if isinstance(obj, (torch.dtype, torch.device)):
        return ("torch", str(obj))
    if isinstance(obj, types.ModuleType):
        root = obj.__name__.split(".")[0]
        return ("module", obj.__name__) if root in _SAFE_MODULES else None
    if isinstance(obj, types.BuiltinFunctionType):
        return ("builtin", getattr(obj, "__module__", None), obj.__qualname__)
    if isinstance(obj, tuple):
        parts = tuple([_fingerprint(x, tensors, depth, cells) for x in obj])
        return None if None in parts else ("tuple", parts)
    return None  # (functions were taken above: Python's function type has no subclasses)


_NO_DEFAULTS = [("NoneType", None), ("tuple", ())]  # the fingerprints of no __defaults__ and no __kwdefaults__


def _function_fingerprint(obj, tensors: list, depth: int, cells: list | None):
    """``_fingerprint`` of a function: its code, what it reads and its defaults."""
    reads = function_reads(obj)
    parts = []
    data = getattr(obj, "_attend_data", ()) if cells is not None else ()
    for step, v in reads:
        if data and step[0] == "cell" and obj.__code__.co_freevars[step[1]] in data and (
                type(v) in (int, float) or type(v) in _TENSOR_TYPES):
            cell = obj.__closure__[step[1]]
            pos = next((p for p, c in enumerate(cells) if c is cell), None)
            if pos is None:
                pos = len(cells)
                cells.append(cell)
            parts.append(("num", type(v).__name__, pos) if type(v) in (int, float) else
                         ("tensor", str(v.dtype), v.dim(), pos))
        else:
            parts.append(_fingerprint(v, tensors, depth + 1, cells))
    if obj.__defaults__ is None and obj.__kwdefaults__ is None:
        parts += _NO_DEFAULTS
    else:
        parts += [_fingerprint(v, tensors, depth + 1, cells)
                  for v in (obj.__defaults__, tuple(sorted((obj.__kwdefaults__ or {}).items())))]
    if None in parts:
        return None
    return ("function", obj.__code__, tuple([step for step, _ in reads]), tuple(parts))


def data_cells(fn: Callable, *names: str) -> Callable:
    """Declare the closure variables ``names`` of ``fn`` data for the trace cache (the section's
    comment): ``fn`` hands them only to traced ops, so a new value never changes its trace. While
    the first trace of a mod runs, its declared cells hold tagged stand-ins: a declared function is
    one call's own (the transformers integration makes its mods per call), not one that other
    threads run at the same time. Returns ``fn``."""
    free = fn.__code__.co_freevars
    missing = [n for n in names if n not in free]
    if missing:
        raise ValueError(f"data_cells: {fn.__qualname__} has no closure variable {', '.join(missing)} "
                         f"(it closes over {', '.join(free) or 'nothing'})")
    fn._attend_data = frozenset(names)
    return fn


class _Tagged:
    """A declared closure number (``data_cells``) during a trace of :func:`trace_cached`: it behaves
    as its value, and records (in ``log``) every use of it in Python (arithmetic, comparisons,
    truth, conversions, hashing). An op with a traced value (an fx Proxy) is not a use: the Proxy
    records the number as an operand, and the builder makes it a slot of its own
    (``_Builder.scalar``)."""

    def __new__(cls, value, pos: int, log: set):
        self = super().__new__(cls, value)
        self.plain, self.pos, self.log = value, pos, log
        return self

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if isinstance(self.plain, float) else torch.int32

    def slot_ok(self) -> bool:
        """Whether a slot can hold it (an int32, or a float that is not nan)."""
        v = self.plain
        return -2 ** 31 <= v < 2 ** 31 if isinstance(v, int) else v == v

    def used(self) -> None:
        self.log.add(self.pos)


_TAG_OPS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "divmod", "lshift", "rshift", "and", "or",
            "xor", "radd", "rsub", "rmul", "rtruediv", "rfloordiv", "rmod", "rpow", "rdivmod", "rlshift",
            "rrshift", "rand", "ror", "rxor", "neg", "pos", "abs", "invert", "eq", "ne", "lt", "le", "gt", "ge",
            "bool", "index", "int", "float", "complex", "hash", "round", "trunc", "floor", "ceil", "format",
            "str", "getnewargs", "reduce", "reduce_ex")


def _tag_class(base: type) -> type:
    def op(name):
        plain_op = getattr(base, name, None) or getattr(object, name)

        def method(self, *args):
            if any(isinstance(a, fx.Proxy) for a in args):
                return NotImplemented  # the Proxy's reflected op records the number
            self.used()
            return plain_op(self.plain, *args)
        return method

    names = [f"__{n}__" for n in _TAG_OPS]
    return type(f"_Tagged{base.__name__.title()}", (_Tagged, base),
                {n: op(n) for n in names if hasattr(base, n) or hasattr(object, n)})


_TAGGED = {int: _tag_class(int), float: _tag_class(float)}
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # exactly these (a subclass may read itself anyhow)
_TAGS = threading.local()  # .active: the mod is being traced (tagged tensors record uses only then)


class _TaggedTensor(torch.Tensor):
    """A declared closure tensor (``data_cells``) during a trace of :func:`trace_cached`: a view of it
    that records (in its log) every torch function or method the mod calls on it, property reads
    (shape, dtype) too, except an op that takes a traced value (an fx Proxy): that op indexes the
    tensor as a capture."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if any(isinstance(a, fx.Proxy) for a in _flat((args, kwargs))):
            return NotImplemented  # the Proxy's op records the tensor as a capture
        if getattr(_TAGS, "active", False):
            for a in _flat((args, kwargs)):
                if isinstance(a, _TaggedTensor):
                    a._attend_log.add(a._attend_pos)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _flat(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


def _tag(v, p: int, log: set):
    if isinstance(v, torch.Tensor):
        t = v.detach().as_subclass(_TaggedTensor)
        t._attend_pos, t._attend_log, t._attend_plain = p, log, v
        return t
    return _TAGGED[type(v)](v, p, log)


def _trace_tagged(mod: Callable, kind: str, cells: list, values: list) -> tuple[ModGraph, frozenset]:
    """:func:`trace` with each of ``cells`` holding its value of ``values`` tagged; the graph (its
    captures the cells' own tensors, ``capture_sources`` their positions) and the positions of the
    values used otherwise than as a slot or a capture. The cells get their contents back."""
    log: set = set()
    saved = [c.cell_contents for c in cells]
    try:
        for p, (c, v) in enumerate(zip(cells, values)):
            c.cell_contents = _tag(v, p, log)
        graph = trace(mod, kind)
    finally:
        for c, v in zip(cells, saved):
            c.cell_contents = v
    stack = [graph.output] + [a for n in graph.nodes for a in n.args]
    while stack:  # a number kept in the graph other than as a slot (a constant, an exponent)
        a = stack.pop()
        if isinstance(a, _Tagged):
            a.used()
        elif isinstance(a, tuple):
            stack.extend(a)
    caps = [c.tensor for c in graph.captures]
    graph = dataclasses.replace(
        graph, nodes=[Node(n.op, tuple(_plain(a) for a in n.args), n.dtype) for n in graph.nodes],
        output=_plain(graph.output),
        captures=[Capture(t._attend_plain if isinstance(t, _TaggedTensor) else t) for t in caps],
        capture_sources=[t._attend_pos if isinstance(t, _TaggedTensor) else None for t in caps])
    return graph, frozenset(log)


def _plain(a):
    return a.plain if isinstance(a, _Tagged) else tuple(_plain(x) for x in a) if isinstance(a, tuple) else a


def _held(v):
    """What a binding keeps of a cell's value: a tensor by weak reference (the cache keeps none alive)."""
    return weakref.ref(v) if isinstance(v, torch.Tensor) else v


def _binding(graph: ModGraph, used: frozenset, values: list) -> list:
    """Per declared cell value, from a tagged trace: ``("slot", j, value)`` (a number in scalar slot
    j), ``("capture", j, value)`` (a tensor that is capture j), ``("free", None, value)`` (nothing
    reads it) or ``("value", None, value)`` (used in Python after all: keyed by value, a tensor by
    identity). A tensor's value is held by weak reference (the cache keeps none alive)."""
    slots = {p: j for j, p in enumerate(graph.sources) if p is not None}
    caps = {p: j for j, p in enumerate(graph.capture_sources) if p is not None}
    return [("value", None, _held(v)) if p in used else ("slot", slots[p], v) if p in slots else
            ("capture", caps[p], None) if p in caps else ("free", None, _held(v)) for p, v in enumerate(values)]


def _same(held, v) -> bool:
    """Whether a binding's held value is ``v``: a tensor the same object, a number the same value
    (floats by repr: nan equals nan, -0.0 is not 0.0)."""
    if isinstance(held, weakref.ref):
        return held() is v
    return type(held) is type(v) and (repr(held) == repr(v) if isinstance(v, float) else held == v)


def _fits(binding: list, values: list) -> bool:
    """Whether a trace with ``binding`` serves the declared values ``values``: every value it used
    in Python is the same, and every slot can hold its number."""
    for (kind, _, v0), v in zip(binding, values):
        if kind == "value" and not _same(v0, v):
            return False
        if kind == "slot" and (isinstance(v, int) and not -2 ** 31 <= v < 2 ** 31 or v != v):
            return False
    return True


def _with_data(plain: ModGraph, captures: list, scalars: list) -> ModGraph:
    """A copy of a cached trace with this call's captures and scalars (``dataclasses.replace``'s
    result, without its per-call field introspection: every field else is shared, as there)."""
    graph = object.__new__(ModGraph)
    graph.__dict__.update(plain.__dict__)
    graph.captures, graph.scalars = captures, scalars
    return graph


def trace_cached(mod: Callable, kind: str) -> ModGraph:
    """:func:`trace`, from a bounded cache where the mod and every value it reads fingerprint the
    same as a cached trace's (``_fingerprint``; about 3 ms of tracing saved per call); declared data
    (``data_cells``) may differ (the section's comment). Other captured tensors are held by weak
    reference: a hit needs the very same tensors alive, and the cache keeps no tensor alive. Mods
    that read other objects are traced every time, and so is a mod that reads a tensor's value in
    Python (``t.item()``): the tensor is then no capture."""
    tensors: list = []
    cells: list = []
    fp = _fingerprint(mod, tensors, cells=cells)
    if fp is None:
        TRACES["traced"] += 1
        return trace(mod, kind)
    values = [c.cell_contents for c in cells]
    key = (kind, fp, torch.get_default_dtype())
    for plain, refs, binding in _TRACES.get(key, ()):
        caps = [r() if r is not None else None for r in refs]
        if any(c is None for c, r in zip(caps, refs) if r is not None) or not _fits(binding, values):
            continue
        _TRACES[key] = _TRACES.pop(key)  # most recently used last
        TRACES["cached"] += 1
        scalars = list(plain.scalars)
        for (kind_, j, _), v in zip(binding, values):
            if kind_ == "slot":
                scalars[j] = v
            elif kind_ == "capture":
                caps[j] = v
        return _with_data(plain, [Capture(c) for c in caps], scalars)
    if cells:
        graph, used = _trace_tagged(mod, kind, cells, values)
        binding = _binding(graph, used, values)
    else:
        graph, binding = trace(mod, kind), []
    TRACES["traced"] += 1
    captured = {id(c.tensor) for c in graph.captures}
    # a tensor read in Python (its values, its shape) may change in place unseen: nothing is kept
    read = any(b[0] == "value" and isinstance(b[2], weakref.ref) for b in binding)
    if all(id(t) in captured for t in tensors) and not read:
        abstract = {b[1] for b in binding if b[0] == "capture"}  # filled from the cells on a hit
        try:
            refs = [None if j in abstract else weakref.ref(c.tensor) for j, c in enumerate(graph.captures)]
        except TypeError:
            return graph
        variants = _TRACES.pop(key, [])
        while len(_TRACES) >= TRACE_CACHE_SIZE:
            _TRACES.pop(next(iter(_TRACES)))
        graph.key  # the nodes' part, made once for every later hit
        _TRACES[key] = [(dataclasses.replace(graph, captures=[]), refs, binding)] + variants[:_VARIANTS - 1]
    return graph


def _traceback_line(e: BaseException) -> str:
    import traceback

    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.abspath(fr.filename)
        if not (path.startswith(_TORCH) or path.startswith(_HERE) or path.endswith("attend/flex_attention.py")):
            return f"{fr.filename}:{fr.lineno}: {fr.line}"
    return "<unknown line>"


_LITERALS = (0, 1, -1, 2, 0.5, float("inf"), float("-inf"))


class _Builder:
    """Translates an fx graph into hash-consed, typed :class:`Node` s."""

    def __init__(self, kind: str, name: str, captures: list[torch.Tensor]):
        self.kind, self.name = kind, name
        self.captures = [Capture(t) for t in captures]
        self.nodes: list[Node] = []
        self.index: dict[tuple, int] = {}
        self.examples: list[Any] = []  # one-element tensors carrying each node's dtype
        self.lines: dict[int, str] = {}
        self.scalars: list = []
        self.sources: list = []  # per slot, the tagged closure number's position, or None
        self.line = ""
        ex = lambda dt: torch.ones((), dtype=dt)
        for name_, dt in zip(SCORE_INPUTS, (torch.float32,) + (INDEX_DTYPE,) * 4):
            self._add(Node("input", (name_,), dt), ex(dt))

    # -- nodes
    def _add(self, node: Node, example) -> Ref:
        k = _key_node(node)
        if k not in self.index:
            self.index[k] = len(self.nodes)
            self.nodes.append(node)
            self.examples.append(example)
            self.lines[len(self.nodes) - 1] = self.line
        return Ref(self.index[k])

    def _example(self, a):
        return self.examples[a.i] if isinstance(a, Ref) else a

    def scalar(self, value):
        """A Python number the mod uses (a length, a window, a softcap) as a runtime slot, so that a
        new value is new data, not new code; 0, 1, 2, 0.5, inf and nan stay literals."""
        if isinstance(value, _Tagged):  # a closure number of trace_cached's trace: its own slot, any value
            if not value.slot_ok():
                value.used()  # past int32 or nan: a literal, so the value is structure
                return value.plain
            if value.pos not in self.sources:
                self.sources.append(value.pos)
                self.scalars.append(value.plain)
            return self._add(Node("scalar", (self.sources.index(value.pos),), value.dtype), value.plain)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value in _LITERALS \
                or value != value or isinstance(value, int) and not -2 ** 31 <= value < 2 ** 31:
            return value
        for k, v in enumerate(self.scalars):
            if type(v) is type(value) and v == value and self.sources[k] is None:
                break
        else:
            k = len(self.scalars)
            self.scalars.append(value)
            self.sources.append(None)
        dtype = torch.float32 if isinstance(value, float) else torch.int32
        return self._add(Node("scalar", (k,), dtype), value)

    def op(self, op: str, *args) -> Ref | Any:
        """A node for ``op(*args)``; constant operands fold, other numbers become scalar slots."""
        if not any(isinstance(a, Ref) for a in args):
            return self._fold(op, args)
        args = tuple(a if op == "pow" and j == 1 else self.scalar(a) for j, a in enumerate(args))
        exs = [self._example(a) for a in args]
        try:
            out = TORCH_OPS[op](*exs)
        except Exception as e:
            raise self.error(f"{op} on {[getattr(x, 'dtype', type(x).__name__) for x in exs]}: {e}")
        return self._add(Node(op, tuple(args), out.dtype), torch.ones((), dtype=out.dtype))

    def cast(self, a, dtype: torch.dtype):
        if not isinstance(a, Ref):
            return self._fold("cast", (a, dtype))
        if self.nodes[a.i].dtype == dtype:
            return a
        return self._add(Node("cast", (a, dtype), dtype), torch.ones((), dtype=dtype))

    def const(self, value, dtype: torch.dtype):
        return self._add(Node("const", (value,), dtype), torch.ones((), dtype=dtype))

    def _fold(self, op, args):
        for a in args:  # Python arithmetic on a closure number: the number is structure
            if isinstance(a, _Tagged):
                a.used()
        args = tuple(_plain(a) for a in args)
        if op == "cast":
            v, dt = args
            return bool(v) if dt == torch.bool else (float(v) if dt.is_floating_point else int(v))
        return fold(op, args)

    def error(self, what: str) -> FlexTraceError:
        return FlexTraceError(f"{self.kind}_mod {self.name!r} at {self.line}: {what}. attend generates the mod "
                              f"into Triton and supports: {SUPPORTED}")

    # -- fx translation
    def build(self, graph: fx.Graph) -> ModGraph:
        env: dict[fx.Node, Any] = {}
        placeholders = iter(SCORE_INPUTS if self.kind == "score" else SCORE_INPUTS[1:])
        output = None
        for n in graph.nodes:
            self.line = n.meta.get("attend_line", "<unknown line>")
            if n.op == "placeholder":
                env[n] = Ref(SCORE_INPUTS.index(next(placeholders)))
            elif n.op == "get_attr":
                env[n] = ("capture", int(n.target[len("_capture"):]), ())
            elif n.op == "output":
                output = self._value(env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0])
            else:
                args = fx.node.map_arg(n.args, lambda x: env[x])
                kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
                env[n] = self._call(n.op, n.target, args, kwargs)
        if isinstance(output, tuple):
            raise self.error("the mod returns a captured tensor that is not indexed down to one element")
        if self.kind == "mask":
            output = output if not isinstance(output, Ref) or self.nodes[output.i].dtype == torch.bool \
                else self.op("ne", output, 0)
        used = self._used(output)
        return self._compact(output, used)

    def _used(self, output) -> set[int]:
        used = set(range(len(SCORE_INPUTS)))
        stack = [output] if isinstance(output, Ref) else []
        while stack:
            r = stack.pop()
            if r.i in used and r.i >= len(SCORE_INPUTS):
                continue
            used.add(r.i)
            stack.extend(a for a in self.nodes[r.i].args if isinstance(a, Ref))
        return used

    def _compact(self, output, used: set[int]) -> ModGraph:
        """Drop dead nodes (device lookups, unused loads) and captures nothing reads."""
        remap, nodes, lines = {}, [], {}
        live_caps = sorted({n.args[0] for i, n in enumerate(self.nodes) if i in used and n.op == "load"})
        cap_map = {c: j for j, c in enumerate(live_caps)}
        live_scalars = sorted({n.args[0] for i, n in enumerate(self.nodes) if i in used and n.op == "scalar"})
        scalar_map = {c: j for j, c in enumerate(live_scalars)}
        for i, n in enumerate(self.nodes):
            if i not in used:
                continue
            args = tuple(Ref(remap[a.i]) if isinstance(a, Ref) else a for a in n.args)
            if n.op == "load":
                args = (cap_map[args[0]],) + args[1:]
            if n.op == "scalar":
                args = (scalar_map[args[0]],)
            remap[i] = len(nodes)
            nodes.append(Node(n.op, args, n.dtype))
            lines[len(nodes) - 1] = self.lines.get(i, "")
        out = Ref(remap[output.i]) if isinstance(output, Ref) else output
        return ModGraph(self.kind, nodes, out, [self.captures[c] for c in live_caps], lines,
                        [self.scalars[k] for k in live_scalars], [self.sources[k] for k in live_scalars])

    def _value(self, a):
        """A value operand: a capture indexed to one element becomes a load; a 0-d capture loads at ()."""
        if isinstance(a, tuple) and a and a[0] == "capture":
            _, c, idx = a
            t = self.captures[c].tensor
            if len(idx) == t.dim():
                return self._add(Node("load", (c,) + idx, t.dtype), torch.ones((), dtype=t.dtype))
            raise self.error(f"captured tensor of shape {tuple(t.shape)} is used with {len(idx)} of its {t.dim()} "
                             f"indices; index every dimension with an index expression (e.g. bias[h, q_idx])")
        if isinstance(a, torch.dtype) or a is None or isinstance(a, (bool, int, float, Ref)):
            return a
        if isinstance(a, tuple) and a and a[0] == "opaque":
            raise self.error(f"{a[1]} is used as a value")
        raise self.error(f"unsupported operand {a!r}")

    def _call(self, kind: str, target, args: tuple, kwargs: dict):
        name = target if kind == "call_method" else getattr(target, "__name__", repr(target))
        module = getattr(target, "__module__", None) or ""
        qual = f"Tensor.{name}" if kind == "call_method" else (
            f"torch.{name}" if module.startswith("torch") else
            f"{module}.{name}" if module not in ("", "_operator", "operator", "builtins") else name)
        if target is getattr and len(args) == 2:
            if args[1] == "device":
                return ("opaque", "tensor.device")
            if args[1] == "dtype":
                v = self._value(args[0])
                return self.nodes[v.i].dtype if isinstance(v, Ref) else torch.tensor(v).dtype
            raise self.error(f"attribute .{args[1]} of a mod argument")
        if kind == "call_method" and name == "__getitem__" or target is operator.getitem:
            return self._index(args[0], args[1])
        logical = _LOGICAL.get(target) if kind == "call_function" else _LOGICAL.get(name) if kind == "call_method" \
            else None
        if logical is not None and len(args) == (1 if logical == "not" else 2) and not kwargs:
            # torch.logical_*: the operands' truth values (on integers, not their bits)
            return self.op(logical, *[self.cast(self._value(a), torch.bool) for a in args])
        if kind == "call_function" and target in _BINARY and len(args) == 2 and not kwargs:
            return self.op(_BINARY[target], self._value(args[0]), self._value(args[1]))
        if kind == "call_function" and target in _UNARY and len(args) == 1 and not kwargs:
            return self.op(_UNARY[target], self._value(args[0]))
        if kind == "call_method" and name in _METHOD_BINARY and len(args) == 2 and not kwargs:
            return self.op(_METHOD_BINARY[name], self._value(args[0]), self._value(args[1]))
        if kind == "call_method" and name in _METHOD_UNARY and len(args) == 1 and not kwargs:
            return self.op(_METHOD_UNARY[name], self._value(args[0]))
        if target is torch.where or name == "where" and kind == "call_method":
            if kind == "call_method":
                x, cond, other = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("other")
            else:
                cond, x, other = (list(args) + [kwargs.get("input"), kwargs.get("other")])[:3] if len(args) < 3 \
                    else args
            return self.op("where", self._value(cond), self._value(x), self._value(other))
        if target in (torch.clamp, torch.clip) or kind == "call_method" and name in ("clamp", "clip",
                                                                                    "clamp_min", "clamp_max"):
            x = self._value(args[0])
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
            if name == "clamp_max":
                lo, hi = None, lo
            if lo is not None:
                x = self.op("maximum", x, self._value(lo))
            if hi is not None:
                x = self.op("minimum", x, self._value(hi))
            return x
        composed = _COMPOSED.get(target) if kind == "call_function" else _COMPOSED.get(name) \
            if kind == "call_method" else None
        if composed is not None:
            return getattr(self, composed)(args, kwargs)
        if kind == "call_method" and name == "masked_fill" and len(args) == 3:
            return self.op("where", self._value(args[1]), self._value(args[2]), self._value(args[0]))
        if kind == "call_method" and name in _CASTS and len(args) == 1:
            return self.cast(self._value(args[0]), _CASTS[name])
        if kind == "call_method" and name in ("to", "type"):
            dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if dtype is None:
                if all(isinstance(a, (str, tuple)) or a is None for a in args[1:]):  # .to(device)
                    return self._value(args[0])
                raise self.error(f"Tensor.{name}{args[1:]} (only a dtype can be given)")
            return self.cast(self._value(args[0]), dtype)
        if kind == "call_method" and name in ("new_ones", "new_zeros", "new_full", "new_tensor"):
            return self._new(name, args, kwargs)
        if target in (torch.ones_like, torch.zeros_like, torch.full_like):
            x = self._value(args[0])
            fill = {torch.ones_like: 1, torch.zeros_like: 0}.get(target, args[1] if len(args) > 1 else None)
            dtype = kwargs.get("dtype") or (self.nodes[x.i].dtype if isinstance(x, Ref) else torch.tensor(x).dtype)
            return self.const(fill, dtype)
        if kind == "call_method" and name in ("contiguous", "clone", "detach", "squeeze", "unsqueeze"):
            if name == "unsqueeze" or name == "squeeze" and len(args) > 1:
                raise self.error(f"Tensor.{name} (mods see one element: shapes do not exist)")
            return self._value(args[0])
        raise self.error(f"{qual} cannot be generated into Triton")

    # Ops written as the ops above: their values as torch's, and their derivatives follow from the parts'.
    def _square(self, args, kwargs):
        x = self._value(args[0])
        return self.op("mul", x, x)

    def _relu(self, args, kwargs):  # torch's derivative at 0 is 0: the where's other side
        x = self._value(args[0])
        return self.op("where", self.op("gt", x, 0), x, 0.0 if self._is_float(x) else 0)

    def _sign(self, args, kwargs):
        x = self._value(args[0])
        one = 1.0 if self._is_float(x) else 1
        s = self.op("where", self.op("gt", x, 0), one, self.op("where", self.op("lt", x, 0), -one, 0 * one))
        return self.cast(s, self.nodes[x.i].dtype) if isinstance(x, Ref) else s

    def _log1p(self, args, kwargs):  # log(1 + x): an absolute error near 2^-24 where |x| is tiny
        return self.op("log", self.op("add", self._value(args[0]), 1.0))

    def _expm1(self, args, kwargs):
        return self.op("sub", self.op("exp", self._value(args[0])), 1.0)

    def _softplus(self, args, kwargs):  # torch.nn.functional.softplus(x, beta, threshold)
        x = self._value(args[0])
        beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
        threshold = args[2] if len(args) > 2 else kwargs.get("threshold", 20.0)
        bx = x if beta == 1 else self.op("mul", x, beta)
        soft = self.op("log", self.op("add", self.op("exp", bx), 1.0))
        soft = soft if beta == 1 else self.op("truediv", soft, beta)
        return self.op("where", self.op("gt", bx, threshold), x, soft)

    def _is_float(self, x) -> bool:
        return self.nodes[x.i].dtype.is_floating_point if isinstance(x, Ref) else isinstance(x, float)

    def _new(self, name, args, kwargs):
        size = args[1] if len(args) > 1 else kwargs.get("size", ())
        if name == "new_tensor":
            value, size = size, ()
        else:
            value = {"new_ones": 1, "new_zeros": 0}.get(name, args[2] if len(args) > 2 else kwargs.get("fill_value"))
        if tuple(size) not in ((), (1,)):
            raise self.error(f"Tensor.{name} of size {tuple(size)} (only size () is an element)")
        base = self._value(args[0])
        dtype = kwargs.get("dtype") or (self.nodes[base.i].dtype if isinstance(base, Ref) else torch.float32)
        if isinstance(value, Ref):
            return self.cast(value, dtype)
        return self.const(value, dtype)

    def _index(self, base, index):
        if not (isinstance(base, tuple) and base and base[0] == "capture"):
            raise self.error("indexing a value that is not a captured tensor")
        if not isinstance(index, tuple) or (index and index[0] == "capture"):  # one index (a loaded capture too)
            index = (index,)
        _, c, done = base
        parts = []
        for ix in index:
            if isinstance(ix, (slice, type(Ellipsis))) or ix is None:
                raise self.error(f"captured tensor indexed by {ix!r} (index each dimension by one index expression)")
            v = self._value(ix)
            if isinstance(v, Ref) and self.nodes[v.i].dtype.is_floating_point or isinstance(v, float):
                raise self.error("captured tensor indexed by a floating-point value")
            if isinstance(v, bool) or isinstance(v, Ref) and self.nodes[v.i].dtype == torch.bool:
                raise self.error("captured tensor indexed by a bool (boolean masks are not index expressions)")
            parts.append(self.scalar(v))
        t = self.captures[c].tensor
        if len(done) + len(parts) > t.dim():
            raise self.error(f"captured tensor of shape {tuple(t.shape)} indexed with {len(done) + len(parts)} indices")
        return ("capture", c, done + tuple(parts))


# ---------------------------------------------------------------------------------------------
# Evaluation on torch tensors (the blocked path, create_block_mask on the CPU, the float64 oracle)


def evaluate(graph: ModGraph, inputs: dict[str, torch.Tensor], captures: list[torch.Tensor] | None = None,
             outputs: list | None = None, float_dtype: torch.dtype | None = None, scalars: list | None = None) -> list:
    """Run ``graph`` with torch ops on broadcastable ``inputs`` (score, b, h, q_idx, kv_idx).

    Returns the values of ``outputs`` (default: the graph's output). Loads index the captures with
    the index tensors, so autograd reaches captured tensors that require grad. ``float_dtype``
    (e.g. float64 for an oracle) casts float captures and float constants' results to it.
    """
    captures = [c.tensor for c in graph.captures] if captures is None else captures
    if float_dtype is not None:
        captures = [c.to(float_dtype) if c.is_floating_point() else c for c in captures]
    vals: list[Any] = []
    for i, n in enumerate(graph.nodes):
        arg = lambda a: vals[a.i] if isinstance(a, Ref) else a
        if n.op == "input":
            v = inputs.get(n.args[0])
        elif n.op == "scalar":
            v = (graph.scalars if scalars is None else scalars)[n.args[0]]
        elif n.op == "load":
            idx = tuple(arg(a).long() if isinstance(arg(a), torch.Tensor) else arg(a) for a in n.args[1:])
            cap = captures[n.args[0]]
            v = cap[idx] if idx else cap  # index tensors broadcast against each other
        elif n.op == "cast":
            x = arg(n.args[0])
            v = x.to(n.dtype) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=n.dtype)
            if float_dtype is not None and n.dtype.is_floating_point and isinstance(x, torch.Tensor) \
                    and x.dtype.is_floating_point:
                # the value rounds as the cast does, the gradient passes in full precision (as the
                # generated derivative does; torch's autograd would round it through the cast)
                v = x.to(float_dtype) + (v.to(float_dtype) - x.to(float_dtype)).detach()
            elif float_dtype is not None and n.dtype.is_floating_point:
                v = v.to(float_dtype)
        elif n.op == "const":
            dt = float_dtype if float_dtype is not None and n.dtype.is_floating_point else n.dtype
            v = torch.tensor(n.args[0], dtype=dt, device=_device(inputs))
        else:
            args = [arg(a) for a in n.args]
            if n.op == "where" and not isinstance(args[1], torch.Tensor) and not isinstance(args[2], torch.Tensor):
                dt = n.dtype if float_dtype is None or not n.dtype.is_floating_point else float_dtype
                args[1] = torch.tensor(args[1], dtype=dt, device=args[0].device)
            v = TORCH_OPS[n.op](*args)
        vals.append(v)
    outs = [graph.output] if outputs is None else outputs
    return [vals[o.i] if isinstance(o, Ref) else o for o in outs]


def fold(op: str, args: tuple):
    """``op`` on Python constants, as torch computes it (floats in double precision)."""
    v = TORCH_OPS[op](*[torch.tensor(a, dtype=torch.float64) if isinstance(a, float) else torch.tensor(a)
                        for a in args])
    return v.item()


def _device(inputs):
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return "cpu"

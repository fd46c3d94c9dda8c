"""Symbolic derivatives of a traced score_mod, for the backward.

Forward mode over the graph: seeding the score (or one load of a captured tensor) with tangent 1
and pushing tangents through each node gives ``d out / d score`` (the score hook's derivative,
which turns the gradient of the modded score into the gradient of the raw score) and
``d out / d load`` for every load of a float capture (what the kernel scatter-adds into that
capture's gradient at the load's index). Integer and bool nodes carry no tangent; zeros are
symbolic, so a term that cannot contribute generates no code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .trace import TORCH_OPS, ModGraph, Node, Ref, _key_node, fold

LN2 = math.log(2.0)


@dataclass
class Derivatives:
    """``graph`` extended with the derivative nodes; ``dscore`` and each ``dloads[load] `` are outputs in it."""

    graph: ModGraph
    dscore: Ref | float
    dloads: dict[int, Ref | float]  # load node -> d out / d (loaded value), float captures only


class _Editor:
    """Appends hash-consed nodes to a copy of a graph, typed by torch on one-element examples."""

    def __init__(self, graph: ModGraph):
        self.nodes = list(graph.nodes)
        self.index = {_key_node(n): i for i, n in enumerate(self.nodes)}

    def dtype(self, a):
        return self.nodes[a.i].dtype if isinstance(a, Ref) else torch.tensor(a).dtype

    def op(self, op: str, *args):
        if not any(isinstance(a, Ref) for a in args):
            return fold(op, args)
        exs = [self._example(a) for a in args]
        if op == "where" and not isinstance(exs[1], torch.Tensor) and not isinstance(exs[2], torch.Tensor):
            exs[1] = torch.tensor(exs[1])
        dtype = TORCH_OPS[op](*exs).dtype
        return self._add(Node(op, tuple(args), dtype))

    def _example(self, a):
        if not isinstance(a, Ref):
            return a
        n = self.nodes[a.i]
        if n.op == "scalar":  # a Python number in the mod: torch's scalar promotion
            return 1.0 if n.dtype.is_floating_point else 1
        return torch.ones((), dtype=n.dtype)

    def cast(self, a, dtype):
        if not isinstance(a, Ref):
            return float(a)
        return a if self.nodes[a.i].dtype == dtype else self._add(Node("cast", (a, dtype), dtype))

    def _add(self, node: Node) -> Ref:
        k = _key_node(node)
        if k not in self.index:
            self.index[k] = len(self.nodes)
            self.nodes.append(node)
        return Ref(self.index[k])

    # arithmetic on tangents, where None is a symbolic zero
    def add(self, a, b):
        return b if a is None else a if b is None else self.op("add", a, b)

    def mul(self, a, b):
        if a is None or b is None:
            return None
        if a == 1.0 and not isinstance(a, Ref):
            return b
        if b == 1.0 and not isinstance(b, Ref):
            return a
        return self.op("mul", a, b)

    def neg(self, a):
        return None if a is None else self.op("neg", a) if isinstance(a, Ref) else -a


def _tangent(ed: _Editor, graph: ModGraph, seed: int):
    """Tangents of every node of ``graph`` with node ``seed`` seeded to 1; returns the output's."""
    nodes = graph.nodes
    t: list = [None] * len(nodes)
    t[seed] = 1.0
    val = lambda a: a  # node values are the nodes themselves (Refs) or constants
    tan = lambda a: t[a.i] if isinstance(a, Ref) else None
    for i in range(seed + 1, len(nodes)):
        n = nodes[i]
        if not n.dtype.is_floating_point:
            continue
        out = Ref(i)
        a = n.args
        da = tan(a[0]) if a else None
        db = tan(a[1]) if len(a) > 1 and isinstance(a[1], Ref) else None
        op = n.op
        if op == "add":
            d = ed.add(da, db)
        elif op == "sub":
            d = ed.add(da, ed.neg(db))
        elif op == "mul":
            d = ed.add(ed.mul(da, val(a[1])), ed.mul(val(a[0]), db))
        elif op == "truediv":  # (da - out * db) / b
            num = ed.add(da, ed.neg(ed.mul(out, db)))
            d = None if num is None else ed.op("truediv", num, val(a[1]))
        elif op == "neg":
            d = ed.neg(da)
        elif op == "abs":
            d = None if da is None else ed.op("where", ed.op("lt", a[0], 0), ed.neg(da), da)
        elif op == "exp":
            d = ed.mul(da, out)
        elif op == "exp2":
            d = ed.mul(da, ed.mul(out, LN2))
        elif op == "log":
            d = None if da is None else ed.op("truediv", da, a[0])
        elif op == "log2":
            d = None if da is None else ed.op("truediv", da, ed.mul(a[0], LN2))
        elif op == "sqrt":
            d = None if da is None else ed.op("truediv", ed.mul(da, 0.5), out)
        elif op == "rsqrt":  # -0.5 * out^3
            d = ed.mul(da, ed.mul(ed.mul(ed.mul(out, out), out), -0.5))
        elif op == "tanh":
            d = ed.mul(da, ed.op("sub", 1.0, ed.mul(out, out)))
        elif op == "sigmoid":
            d = ed.mul(da, ed.mul(out, ed.op("sub", 1.0, out)))
        elif op == "sin":
            d = ed.mul(da, ed.op("cos", a[0]))
        elif op == "cos":
            d = ed.mul(da, ed.neg(ed.op("sin", a[0])))
        elif op == "erf":  # 2 / sqrt(pi) * exp(-x^2)
            d = ed.mul(da, ed.mul(ed.op("exp", ed.neg(ed.mul(a[0], a[0]))), 2.0 / math.sqrt(math.pi)))
        elif op in ("floor", "ceil", "floordiv"):
            d = None
        elif op == "remainder":  # a - b * floor(a / b)
            d = ed.add(da, ed.neg(ed.mul(db, ed.op("floor", ed.op("truediv", a[0], a[1])))))
        elif op == "pow":
            d = None
            if da is not None:  # b * a^(b-1) * da
                d = ed.mul(da, ed.mul(a[1], ed.op("pow", a[0], ed.op("sub", a[1], 1)) if isinstance(a[1], Ref)
                                      else (ed.op("pow", a[0], a[1] - 1) if a[1] != 1 else 1.0)))
            if db is not None:  # out * log(a) * db
                d = ed.add(d, ed.mul(db, ed.mul(out, ed.op("log", a[0]))))
        elif op in ("minimum", "maximum"):  # torch's rule: the chosen side's tangent, half each on a tie
            if da is None and db is None:
                d = None
            else:
                pick = ed.op("lt" if op == "minimum" else "gt", a[0], a[1])
                tie = ed.op("eq", a[0], a[1])
                za, zb = da if da is not None else 0.0, db if db is not None else 0.0
                half = ed.mul(ed.add(da, db), 0.5)
                d = ed.op("where", pick, za, ed.op("where", tie, half if half is not None else 0.0, zb))
        elif op == "where":
            dx = tan(a[1]) if isinstance(a[1], Ref) else None
            dy = tan(a[2]) if isinstance(a[2], Ref) else None
            d = None if dx is None and dy is None else ed.op(
                "where", a[0], dx if dx is not None else 0.0, dy if dy is not None else 0.0)
        elif op == "cast":  # the tangent stays in fp32: a cast to half precision rounds values only
            d = da
        elif op in ("input", "load", "const", "scalar"):
            d = None
        else:
            raise NotImplementedError(f"no derivative rule for {op}")
        t[i] = d
    o = graph.output
    return t[o.i] if isinstance(o, Ref) else None


def derivatives(graph: ModGraph) -> Derivatives:
    """d score_mod / d score and d score_mod / d load for each load of a float capture."""
    assert graph.kind == "score"
    ed = _Editor(graph)
    dscore = _tangent(ed, graph, 0)
    dloads = {}
    for i in graph.loads():
        if graph.nodes[i].dtype.is_floating_point:
            d = _tangent(ed, graph, i)
            dloads[i] = 0.0 if d is None else ed.cast(d, torch.float32) if isinstance(d, Ref) else float(d)
    dscore = 0.0 if dscore is None else ed.cast(dscore, torch.float32) if isinstance(dscore, Ref) else float(dscore)
    out = ModGraph(graph.kind, ed.nodes, graph.output, graph.captures, graph.lines, graph.scalars)
    return Derivatives(out, dscore, dloads)

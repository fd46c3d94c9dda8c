"""The torch and Triton versions attend supports (pyproject.toml's bounds), and whether the
installed ones are inside them. No Triton import: ``attend info`` reports the range without it."""

from __future__ import annotations

import sys
from importlib import metadata

import torch

# The declared range (pyproject.toml's bounds), inclusive minor versions. The CPU tests (and the
# sm_90 / sm_80 build check) run on the Triton ends of it, the GPU suite on torch 2.11 + Triton 3.6.
SUPPORTED = {"torch": ((2, 11), (2, 15)), "triton": ((3, 6), (3, 9))}


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def installed() -> dict[str, str]:
    """name -> version; Triton's from its package metadata ("not installed" where it is missing)."""
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version}


def supported_range() -> str:
    return ", ".join(f"{name} {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}" for name, (lo, hi) in SUPPORTED.items())


def out_of_range() -> list[str]:
    """One sentence per installed package outside ``SUPPORTED`` (empty: all in range)."""
    found = []
    for name, version in installed().items():
        lo, hi = SUPPORTED[name]
        if version == "not installed":
            found.append(f"{name} is not installed (attend's Triton kernels need {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]})")
            continue
        if not lo <= _minor(version) <= hi:
            found.append(f"{name} {version} is outside the supported {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} (untested)")
    return found


# Whether flex's objects are made inside a compiled graph: create_block_mask's BlockMask
# (``compiled.graph_block_mask``) and the transformers integration's mods over the graph's tensors
# (its softcap, sinks and windows under torch.compile). Tested from torch 2.13. torch 2.11 and 2.12's
# Dynamo fails at trace time on a function made in the graph that closes over Python numbers
# ("SourcelessBuilder ... <class 'cell'>"), so there those calls keep their graph break.
GRAPH_MADE_MODS = _minor(torch.__version__) >= (2, 13)

# What torch.compiler.assume_constant_result does (every supported torch; a test compares): it
# imports torch._dynamo (about a second, most of ``import attend``) to set this attribute.
DYNAMO_CONSTANT = "_dynamo_marked_constant"


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)``, without importing torch._dynamo where nothing
    has yet: attend marks its functions at import, and most processes never compile."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, DYNAMO_CONSTANT, True)
    return fn


_OUTSIDE: dict = {}  # id of a function -> torch.compiler.disable of it (``outside_graph``)


def outside_graph(fn, reason: str):
    """A function that runs ``fn`` outside a compiled graph (``torch.compiler.disable(fn,
    reason=reason)``: a graph break, which ``fullgraph=True`` refuses with ``reason``), for calls
    made inside a compiled region only. The wrapper is made at the first such call, by a function
    Dynamo runs rather than traces, so importing attend imports no torch._dynamo."""
    key = id(fn)

    @assume_constant_result
    def made() -> bool:
        if key not in _OUTSIDE:
            _OUTSIDE[key] = torch.compiler.disable(fn, reason=reason)
        return True

    def call(*args, **kwargs):
        made()
        return _OUTSIDE[key](*args, **kwargs)
    return call

"""Kernel launches without ``JITFunction.run``'s per-call work.

Triton binds every argument, specializes it (dtype, 16-byte alignment, divisibility by 16,
== 1), builds a string cache key and checks the kernel's globals on every call: tens of
microseconds of host time per launch for attend's kernels (about 50 arguments), three launches
per forward+backward. At S=1024 the H100 waited on the host: the causal backward measured
146 TFLOP/s through the API against 0.69 ms of kernel time (docs/kernels.md, "Tuning: host
overhead and the direct launcher").

``Launcher`` keys the compiled kernel by what can change Triton's specialization, cheaply:
each pointer argument's dtype and 16-byte alignment, and the exact values of the scalar
arguments (hashing the values is cheaper than classifying them). Scalars named ``volatile`` (a
dropout seed that changes per call) are keyed by Triton's classes instead. Then it calls the
compiled kernel's launcher directly. A key not seen yet is looked up again by Triton's own
classes of every scalar (``scalar_class``: an int's ``int_class``, or its width alone where the
kernel says ``do_not_specialize``; any float, any bool), so a new
length (each step of a decode loop, each batch of a varlen call) launches a kernel compiled for
an earlier length of its class directly; only a new class, and the interpreter, go through
Triton's own path. (The forward launchers declare a decode step's length and K / V strides
volatile, ``launch._DECODE_VOLATILE``: a new length of a known class then hits the exact key.)

Gluon kernels launch the same way, with host tensor descriptors among the leading pointer
arguments (``ws.attn_fwd_ws``), classed as Triton specializes them (``descriptor_class``: dtype,
box and layout; the shape and strides are launch arguments), so a decode loop's next length
launches the Gluon forward directly too. Triton's debug and instrumentation knobs are part of every key,
as they are of Triton's, so turning one on after a kernel's first launch builds the other kernel.
Through Triton's own path the H100 waited on the host: the
persistent forward at S=1024 (B=16, H=16, D=128) timed 0.464 ms per call, against 0.293 ms
launched directly (ab.py).
"""

from __future__ import annotations

import operator

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .versions import COMPILE_OPTIONS, TensorDescriptor, await_compile_key

MAX_KEYS = 4096  # per kernel and cache; past it that cache starts over (varlen calls key their max lengths)


def int_class(a: int) -> int:
    """Triton's specialization class of an int argument: == 1 (a constant), else its width
    (i32, i64, u64) and whether it is divisible by 16. Tests compare it with Triton's own."""
    if a == 1:
        return -1
    return 2 * int_width(a) + (a & 15 == 0)


def int_width(a: int) -> int:
    """Triton's specialization of an int argument it does not specialize on its value
    (``do_not_specialize``): its width only (i32, i64, u64)."""
    return 0 if -(2**31) <= a < 2**31 else (1 if -(2**63) <= a < 2**63 else 2)


def scalar_class(a) -> object:
    """Triton's specialization of a scalar argument (``native_specialize_impl``): an int's
    ``int_class``, one class for every float (fp32) and one for every bool (u1); None and any other
    value as itself (never coarser than Triton). Tests compare it with Triton's own."""
    t = type(a)
    if t is int:
        return int_class(a)
    if t is float:
        return "fp32"
    if t is bool:
        return "u1"
    return (t, a)


def _is_pointer(a) -> bool:
    """A tensor or a Gluon host tensor descriptor: the arguments ``Launcher`` wants first."""
    return isinstance(a, torch.Tensor) or (TensorDescriptor is not None and type(a) is TensorDescriptor)


def _descriptor_key(d: TensorDescriptor) -> tuple:
    """What a host tensor descriptor's kernel may depend on, exactly: its base's dtype and 16-byte
    alignment, shape, strides, box and shared layout (Triton's own key is coarser: the box, dtype
    and layout; the shape and strides are runtime arguments). The launcher fills the TMA
    descriptor from the object at each call (``make_tensordesc_arg``)."""
    return (d.base.dtype, d.base.data_ptr() & 15 == 0, tuple(d.shape), tuple(d.strides), tuple(d.block_shape),
            d.layout, d.padding)


def descriptor_class(d: TensorDescriptor) -> tuple:
    """What Triton specializes a host tensor descriptor on: its base's dtype, the box and the
    shared layout (tests compare it with Triton's own). Not its shape or strides: the compiled
    kernel takes them at each launch, so a descriptor of a new length launches the kernel compiled
    for an earlier one."""
    return d.base.dtype, tuple(d.block_shape), d.layout, d.padding


def _pointer_key(ptrs: tuple, exact: bool = True) -> tuple:
    """Tensors by dtype and 16-byte alignment, host tensor descriptors by ``_descriptor_key``
    (``exact``) or ``descriptor_class``."""
    desc = _descriptor_key if exact else descriptor_class
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else desc(a) for a in ptrs])


def _nested_key(a, exact: bool):
    """A ``nested`` parameter's key: tensors as ``_pointer_key`` keys them, tuples element by
    element, anything else by value (``exact``) or by ``scalar_class``. Tensors include their
    subclasses (an ``nn.Parameter`` a score_mod captures)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if type(a) is tuple:
        return tuple([_nested_key(x, exact) for x in a])
    return a if exact else scalar_class(a)


class Launcher:
    """``Launcher(kernel, volatile)(grid, args, constexprs, num_warps, num_stages)`` launches
    like ``kernel[grid](**args, **constexprs, num_warps=..., num_stages=...)``.

    ``args`` maps every runtime parameter's name to its value; the launcher puts them in the
    kernel's order (its pointer (tensor) parameters first, then the scalars). Every constexpr
    parameter comes after them in the signature and is given in ``constexprs``. ``volatile``:
    names of int parameters whose value changes from call to call. ``nested``: names of
    parameters after the leading tensors that take a tensor, a tuple of tensors (and ints) or None
    (flex's block lists and captures), keyed as ``_nested_key`` keys them. Each scalar keeps its
    Python type across calls (an int stays an int and a bool a bool: ``0 == 0.0`` and ``1 == True`` in a key)."""

    def __init__(self, kernel, volatile: tuple[str, ...] = (), nested: tuple[str, ...] = ()):
        self.kernel = kernel
        self.direct = isinstance(kernel, JITFunction)  # not the interpreter's InterpretedFunction
        self.cache: dict = {}  # exact key -> compiled kernel
        self.by_class: dict = {}  # Triton's specialization (scalar_class) -> compiled kernel
        self.n_ptr = None  # leading tensor arguments, learnt on the first call
        if self.direct:
            is_constexpr = [p.is_constexpr for p in kernel.params]
            first = is_constexpr.index(True)
            if not all(is_constexpr[first:]):
                raise TypeError(f"{kernel.__name__}: constexpr parameters must come last for Launcher")
            self.arg_names = tuple(kernel.arg_names[:first])
            self._order = operator.itemgetter(*self.arg_names)
            self.constexpr_names = tuple(kernel.arg_names[first:])
            # a constexpr the caller leaves out takes its default, as Triton's own path does
            self.defaults = {p.name: p.default for p in kernel.params[first:] if p.has_default}
            self.volatile = tuple(kernel.arg_names.index(n) for n in volatile)
            self.nested = tuple(kernel.arg_names.index(n) for n in nested)
            # ints the kernel does not specialize on their value (tile counts): classed by width
            self.unspecialized = tuple(i for i, p in enumerate(kernel.params[:first]) if p.do_not_specialize)

    def ordered(self, args: dict) -> tuple:
        """``args`` (name -> value) in the kernel's parameter order; a TypeError names any
        parameter missing or unknown."""
        try:
            if len(args) != len(self.arg_names):
                raise KeyError
            return self._order(args)
        except KeyError:
            missing = [n for n in self.arg_names if n not in args]
            extra = [n for n in args if n not in self.arg_names]
            raise TypeError(f"{self.kernel.__name__}: runtime arguments missing {missing}, unknown {extra}") from None

    def _key(self, args: tuple) -> tuple:
        n = self.n_ptr
        ptrs = _pointer_key(args[:n])
        if not self.volatile and not self.nested:
            return ptrs, args[n:]
        rest = list(args[n:])
        for i in self.volatile:
            rest[i - n] = int_class(rest[i - n])
        for i in self.nested:
            rest[i - n] = _nested_key(rest[i - n], True)
        return ptrs, tuple(rest)

    def _class_key(self, args: tuple) -> tuple:
        """The key as Triton specializes: tensors as in ``_key``, host tensor descriptors by
        ``descriptor_class``, every scalar by ``scalar_class``."""
        n = self.n_ptr
        rest = [scalar_class(a) for a in args[n:]]
        for i in self.unspecialized:
            if type(args[i]) is int:
                rest[i - n] = ("i", int_width(args[i]))
        for i in self.nested:
            rest[i - n] = _nested_key(args[i], False)
        return _pointer_key(args[:n], exact=False), tuple(rest)

    def __call__(self, grid: tuple, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> None:
        if not self.direct:
            self.kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        args = self.ordered(args)
        if self.n_ptr is None:  # learnt once, and kept only from a call that passes the check
            n_ptr = next((i for i, a in enumerate(args) if not _is_pointer(a)), len(args))
            if any(_is_pointer(a) for i, a in enumerate(args) if i >= n_ptr and i not in self.nested) or any(
                    i < n_ptr for i in self.volatile + self.nested):
                raise TypeError(f"{self.kernel.__name__}: pointer parameters must come first for Launcher")
            self.n_ptr = n_ptr
        if len(constexprs) != len(self.constexpr_names):
            constexprs = {**self.defaults, **constexprs}
        tail = tuple([constexprs[n] for n in self.constexpr_names])
        device = driver.active.get_current_device()
        # Triton's debug and instrumentation knobs select a different build (JITFunction.run reads them per call)
        build = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        key = (build, tail, num_warps, num_stages, self._key(args))
        compiled = self.cache.get(key)
        if compiled is None:
            class_key = (build, tail, num_warps, num_stages, self._class_key(args))
            compiled = self.by_class.get(class_key)
            if len(self.cache) >= MAX_KEYS:
                self.cache.clear()
            if compiled is None:  # Triton's path compiles (or loads) and launches; later calls go direct
                if len(self.by_class) >= MAX_KEYS:
                    self.by_class.clear()
                await_compile_key()
                compiled = self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages,
                                             **COMPILE_OPTIONS)
                compiled.run  # noqa: B018 - loads the module, so compiled.function exists
                self.cache[key] = self.by_class[class_key] = compiled
                return
            self.cache[key] = compiled  # a new value of a known class: the same kernel, direct
        stream = driver.active.get_current_stream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        metadata = compiled.launch_metadata(grid, stream, *args, *tail) if enter is not None else None
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave,
                     *args, *tail)

"""Eager twins of attend's custom ops.

A ``torch.library.custom_op`` with autograd costs tens of microseconds of host time per call in
eager mode (dispatch, and ``fill_defaults`` rebuilding the schema's argument list once per
argument), which the GPU waits on at small shapes. Eager calls on plain tensors therefore run the
op's own function, ``setup_context`` and backward through a plain ``autograd.Function``;
traced code (torch.compile), fake tensors and tensor subclasses keep the custom op, and calls
autograd would not record (inference) skip the ``autograd.Function`` too (``call``).
"""

from __future__ import annotations

from typing import Callable

import torch


def eager_twin(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function that runs ``impl`` and the custom op's ``setup_context``/``backward``."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward),
                                                       backward=staticmethod(backward)))


def is_eager(*tensors: torch.Tensor | None) -> bool:
    """Plain tensors outside any trace: the direct path is safe."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) is torch.Tensor for t in tensors)


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call(op: Callable, twin: type, impl: Callable, args: tuple, tensors: tuple) -> object:
    """Run a custom op's forward: ``op`` itself when traced (or on tensor subclasses); else its
    ``twin`` when autograd records the call (grad mode on, some of ``tensors`` requires grad);
    else ``impl`` directly, since for inference ``autograd.Function.apply`` is only host cost."""
    if not is_eager(*tensors):
        return op(*args)
    return twin.apply(*args) if _records_grad(*tensors) else impl(*args)

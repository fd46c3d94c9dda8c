"""Eager twins of attend's custom ops.

A ``torch.library.custom_op`` with autograd costs tens of microseconds of host time per call in
eager mode (dispatch, and ``fill_defaults`` rebuilding the schema's argument list once per
argument), which the GPU waits on at small shapes. Eager calls on plain tensors therefore run the
op's own function, ``setup_context`` and backward through a plain ``autograd.Function``;
traced code (torch.compile), fake tensors and tensor subclasses keep the custom op.
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

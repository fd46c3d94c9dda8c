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


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Autograd would record this call: grad mode is on and some input requires grad. When not
    (inference), the twin's ``autograd.Function.apply`` is pure host cost and can be skipped."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

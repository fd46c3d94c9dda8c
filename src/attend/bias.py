"""Causal attention biases that never materialize an ``L x S`` mask on a fused path.

Equivalent plain torch for a ``CausalBias`` of size ``(L, S)``::

    upper_left  = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
    lower_right = torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L)

For ``L=3, S=4`` (1 = may attend)::

    UPPER_LEFT      LOWER_RIGHT
    1 0 0 0         1 1 0 0
    1 1 0 0         1 1 1 0
    1 1 1 0         1 1 1 1
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import torch

__all__ = ["CausalVariant", "CausalBias", "causal_upper_left", "causal_lower_right"]


class CausalVariant(IntEnum):
    """Alignment of a causal mask when ``L != S``.

    - ``UPPER_LEFT``: query ``i`` sees keys ``j <= i`` (``is_causal=True`` semantics).
    - ``LOWER_RIGHT``: query ``i`` sees keys ``j <= i + S - L``, so the last query sees every
      key (decoding with a KV cache).
    """

    UPPER_LEFT = 1
    LOWER_RIGHT = 2


class CausalBias:
    """A causal mask described by its variant and size; pass it as ``attn_mask``.

    Works in ``attend.scaled_dot_product_attention`` and, through ``__torch_function__``,
    in ``torch.nn.functional.scaled_dot_product_attention``, where the call goes to attend's
    dispatcher and therefore to attend's fused kernels.

    Example::

        bias = causal_lower_right(L, S)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    """

    def __init__(self, variant: CausalVariant, seq_len_q: int, seq_len_kv: int) -> None:
        if not isinstance(variant, CausalVariant):
            raise TypeError(f"variant must be a CausalVariant, got {variant!r}")
        for name, n in (("seq_len_q", seq_len_q), ("seq_len_kv", seq_len_kv)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        self.variant = variant
        self.seq_len_q = seq_len_q
        self.seq_len_kv = seq_len_kv

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.seq_len_q, self.seq_len_kv))

    def materialize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The equivalent ``(L, S)`` bool mask (True = may attend). Only MATH needs it."""
        L, S = self.seq_len_q, self.seq_len_kv
        diagonal = 0 if self.variant is CausalVariant.UPPER_LEFT else S - L
        return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=diagonal)

    def __repr__(self) -> str:
        return f"CausalBias({self.variant.name}, seq_len_q={self.seq_len_q}, seq_len_kv={self.seq_len_kv})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            from . import scaled_dot_product_attention

            return scaled_dot_product_attention(*args, **kwargs)
        raise TypeError(f"CausalBias only supports scaled_dot_product_attention, not {getattr(func, '__name__', func)}")


def causal_upper_left(*size: int) -> CausalBias:
    """A ``CausalBias`` of ``size=(L, S)`` aligned to the top-left corner (``is_causal``)."""
    if len(size) != 2:
        raise ValueError(f"causal_upper_left takes two sizes (L, S), got {size!r}")
    return CausalBias(CausalVariant.UPPER_LEFT, *size)


def causal_lower_right(*size: int) -> CausalBias:
    """A ``CausalBias`` of ``size=(L, S)`` aligned to the bottom-right corner."""
    if len(size) != 2:
        raise ValueError(f"causal_lower_right takes two sizes (L, S), got {size!r}")
    return CausalBias(CausalVariant.LOWER_RIGHT, *size)

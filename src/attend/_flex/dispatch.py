"""The flex front door's one seam: traced mods + block lists in, (out, lse, max_scores) out.

:func:`run` is what ``attend.flex_attention.flex_attention`` calls after validating arguments.
Today it runs the blocked torch path (:mod:`.eager`); the fused core plugs in as :func:`_fused`
(the generated hooks, captures and block lists are already in the shape it takes; docs/flex.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import codegen, eager
from .lists import BlockLists
from .trace import ModGraph


@dataclass
class FlexCall:
    """Everything one flex call computes from (the core's launcher takes the same)."""

    query: torch.Tensor  # [B, Hq, L, E]
    key: torch.Tensor  # [B or 1, Hkv, S, E]
    value: torch.Tensor  # [B or 1, Hkv, S, Ev]
    score: ModGraph | None  # None: identity score_mod
    mask: ModGraph | None  # None: no mask work (partial blocks kept whole)
    blocks: BlockLists
    scale: float

    @property
    def score_captures(self) -> list[torch.Tensor]:
        return [c.tensor for c in self.score.captures] if self.score is not None else []

    @property
    def mask_captures(self) -> list[torch.Tensor]:
        return [c.tensor for c in self.mask.captures] if self.mask is not None else []

    def hooks(self) -> dict:
        """The generated Triton functions of this call's mods (generated once per structure)."""
        out = {}
        if self.score is not None:
            out.update(codegen.hooks(self.score).functions)
        if self.mask is not None:
            out.update(codegen.hooks(self.mask).functions)
        return out


def _fused(call: FlexCall):
    """The fused Triton core's flex mode: not wired yet (returns None to decline the call)."""
    return None


def run(call: FlexCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, Ev], lse [B, Hq, L] natural log, max_scores [B, Hq, L])."""
    res = _fused(call)
    if res is not None:
        return res
    return eager.attention(call.query, call.key, call.value, call.score, call.score_captures, call.mask,
                           call.mask_captures, call.blocks, call.scale)

"""What every part of the transformers integration shares: its names, the paths its features take, the
warning of an unfused call, and a call's plan (``_Call``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass


NAME = "attend"

# Features of transformers' attention calls beyond SDPA's, and whether attend's fused kernels serve
# them (forward and backward); _FEATURE_PATH names the path. Attention dropout with one of them is
# the exception: flex_attention and varlen_attn have no dropout, so such a call runs the unfused
# path (warned once).
FUSED = {"softcap": True, "s_aux": True}
_UNFUSED_PATH = ("attend.integrations.transformers.unfused_attention (torch ops over blocks of query rows, every "
                 "score computed twice, memory O(rows * S))")
_FEATURE_PATH = {
    "softcap": "attend.flex_attention with score_mod softcap * tanh(score / softcap) and the mask as a BlockMask "
               "(the Triton core's flex mode, forward and backward)",
    "s_aux": "the fused kernel's log-sum-exp: out * sigmoid(lse - s_aux) (varlen_attn, or flex_attention where the "
             "call also has a softcap or a mask tensor); the sinks' gradient reaches the kernel's backward through "
             "the lse",
}
# An inference call over packed sequences (continuous batching, a packed batch) or a padded batch's
# prefill takes its softcap on varlen_attn's score_mod instead: one launch over every sequence,
# where a BlockMask over the packed keys would give each query block every sequence's keys to walk
# and cost a create_block_mask per step (docs/transformers.md).
_VARLEN_SOFTCAP = "varlen_attn with score_mod softcap * tanh(score / softcap) (inference: the Triton core's score hooks)"
# A decode step's key padding goes into the score_mod (_FlexMask.keys): no BlockMask per step.
_SCORE_KEYS_SOFTCAP = ("attend.flex_attention with score_mod softcap * tanh(score / softcap), then -inf at padded "
                       "keys (a decode step: no BlockMask; the Triton core's flex mode)")


class UnfusedFeatureWarning(UserWarning):
    """A transformers attention call that attend serves outside its fused kernels (warned once per reason)."""


_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, UnfusedFeatureWarning, stacklevel=3)


PAGED_NAME = "paged|" + NAME


@dataclass
class _Call:
    """How one attention call is served; ``str()`` says it."""

    route: str          # "sdpa", "varlen", "flex" or "unfused"
    mask_kind: str      # "none", "padding", "packed", "keys", "dense"
    causal: bool
    window: int | None  # keys per query, when it cuts any key
    features: list
    reason: str = ""
    # flex: a decode step's key padding goes into the score_mod as -inf scores (_flex_mask)
    score_keys: bool = False

    def __str__(self) -> str:
        w = f", sliding window {self.window}" if self.window else ""
        f = f", features {', '.join(self.features)}" if self.features else ""
        line = f"route: {self.route} (mask {self.mask_kind}, causal={self.causal}{w}{f})"
        return line + (f"; {self.reason}" if self.reason else "")

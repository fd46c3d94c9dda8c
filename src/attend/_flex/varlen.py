"""``varlen_attn``'s ``score_mod``: packed sequences with a flex score_mod.

The score_mod sees ``b`` the sequence's index, ``h`` the query head and ``q_idx`` / ``kv_idx``
the query's and key's positions in their own sequence (as FlashAttention's varlen kernels see a
softcap or ALiBi: per sequence, not in the packed buffer).

- ``fused``: eager inference calls (no tensor that autograd records) on attend's Triton kernels run
  the core's VARLEN forward with the mod's generated hooks, one launch for the whole batch, as
  ``varlen_attn`` without a mod runs (``launch.varlen_forward``'s ``score``).
- Every other call (gradients, torch.compile, the CPU blocked path) runs ``flex_attention`` once
  per sequence over that sequence's band of keys, so gradients and compilation follow flex's.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._hostcache import host_values
from .._layout import Band, Packed
from ..kernels import options as kernel_options
from . import codegen
from .trace import ModGraph, Ref, data_cells, trace_cached

# Calls each way ran (tests assert which one a call took).
PATHS = {"fused": 0, "per_sequence": 0}


def score_graph(score_mod: Callable, query: torch.Tensor) -> ModGraph | None:
    """``score_mod``'s trace, None for the identity; its captures must be on the query's device."""
    graph = trace_cached(score_mod, "score")
    if isinstance(graph.output, Ref) and graph.output.i == 0:
        return None
    for c in graph.captures:
        if c.tensor.device != query.device:
            raise ValueError(f"varlen_attn: score_mod captures a tensor of shape {tuple(c.tensor.shape)} on "
                             f"{c.tensor.device}; query is on {query.device}")
    return graph


def fused(graph: ModGraph, kernel: str, q, k, v) -> bool:
    """Whether the call runs on the core's score hooks: eager, attend's Triton kernels, and no
    input or capture that autograd would record."""
    if kernel != "triton" or torch.compiler.is_compiling():
        return False
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *(c.tensor for c in graph.captures)))
    return not recorded


def forward_fused(graph: ModGraph, q, k, v, packed: Packed, max_q: int, max_k: int, scale: float, band: Band):
    """(out (T, H, D), lse (H, T)) from the core's VARLEN forward with the score hooks."""
    from ..kernels import launch

    opts = kernel_options.current()
    fast = opts.flex_fast_tanh and not opts.interpret and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    hooks = codegen.hooks(graph, fast, codegen.wide_index(max_q, max_k))
    args = codegen.capture_args([c.tensor for c in graph.captures], q.device, grads=[], scalars=graph.scalars)
    PATHS["fused"] += 1
    return launch.varlen_forward(q, k, v, packed, max_q, max_k, scale, band, score=(hooks.functions, args))


def forward_per_sequence(score_mod: Callable, q, k, v, cu_q, cu_k, seqused_k, block_table, scale: float,
                         band: Band):
    """(out (T, H, D), lse (H, T)): ``flex_attention`` on each sequence's queries and keys (a paged
    pool's pages gathered), under the band's mask; rows that see no key are 0 with lse -inf."""
    from ..flex_attention import create_block_mask, flex_attention

    PATHS["per_sequence"] += 1
    T, H, _ = q.shape
    Dv = v.shape[-1]
    qv = host_values(cu_q)
    kv = host_values(cu_k) if cu_k is not None else None
    used = host_values(seqused_k) if seqused_k is not None else None
    outs, lses = [], []
    for b in range(len(qv) - 1):
        L = qv[b + 1] - qv[b]
        if L == 0:
            continue
        kb, vb = _keys(b, k, v, kv, used, block_table)
        S = kb.shape[0]
        if S == 0:
            outs.append(q.new_zeros(L, H, Dv))
            lses.append(torch.full((H, L), float("-inf"), dtype=torch.float32, device=q.device))
            continue
        qb = q[qv[b]:qv[b + 1]].transpose(0, 1)[None]  # (1, H, L, D)
        seq = b

        def mod(score, b_, h, q_idx, kv_idx):
            return score_mod(score, b_ + seq, h, q_idx, kv_idx)

        mask = _band_mask(band, L, S)
        block_mask = None if mask is None else create_block_mask(mask, 1, 1, L, S, device=q.device)
        out, lse = flex_attention(qb, kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                                  score_mod=data_cells(mod, "seq"), block_mask=block_mask, scale=scale,
                                  enable_gqa=H != kb.shape[1], return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].float())
    if not outs:
        return q.new_zeros(T, H, Dv), torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _keys(b: int, k, v, kv: list[int] | None, used: list[int] | None, block_table):
    """Sequence ``b``'s keys and values, (S, Hkv, D)."""
    if block_table is not None:  # a (pages, page_size, Hkv, D) pool: the sequence's pages in order
        page = k.shape[1]
        n = -(-used[b] // page)
        ids = block_table[b, :n].long()
        return (k[ids].flatten(0, 1)[:used[b]], v[ids].flatten(0, 1)[:used[b]])
    end = kv[b + 1] if used is None else kv[b] + used[b]
    return k[kv[b]:end], v[kv[b]:end]


def _band_mask(band: Band, L: int, S: int):
    """The mask_mod of a bottom-right ``band`` over one sequence's (L, S), or None for every key."""
    hi, lo = S - L + band.right, S - L - band.left  # key bounds relative to the query's position

    def below(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + hi

    def above(b, h, q_idx, kv_idx):
        return kv_idx >= q_idx + lo

    def between(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + hi) & (kv_idx >= q_idx + lo)

    if band.left < 0:
        return None if band.right < 0 else data_cells(below, "hi")
    return data_cells(above, "lo") if band.right < 0 else data_cells(between, "hi", "lo")

"""The blocked flex path in torch ops, with a backward (autograd).

Per query block of the BlockMask, the key blocks any (b, h) lists are gathered (positions past
KV_LEN dropped), scored in fp32 (fp64 for fp64 inputs), modded by evaluating the traced score
graph on the score tile, masked by the traced mask graph only where some (b, h) lists the block
as partial (full blocks take no mask work, unlisted ones are -inf), and reduced by one softmax
over the gathered keys. Memory per query block is linear in KV_LEN; under autograd each query
block is checkpointed, so the backward recomputes one block's tiles at a time instead of
keeping every block's probabilities (memory stays linear in KV_LEN overall).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import trace as _trace
from .block_mask import FULL, PARTIAL, _dense
from .lists import BlockLists


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(q, k, v, score: _trace.ModGraph | None, score_caps: list, mask: _trace.ModGraph | None,
              mask_caps: list, blocks: BlockLists, scale: float):
    """(out [B, Hq, L, Ev] in q's dtype, lse [B, Hq, L] fp32 natural log, max_scores [B, Hq, L] fp32)."""
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if B == 0 or Hq == 0 or L == 0:  # no query: empty outputs, joined to the inputs' graph (zero gradients)
        inputs = (q, k, v, *score_caps, *mask_caps)
        joined = sum((t.sum() for t in inputs if t.is_floating_point()), q.new_zeros(())) * 0
        empty = q.new_zeros(B, Hq, L, v.shape[-1]) + joined
        lse = torch.full((B, Hq, L), -float("inf"), dtype=torch.float32, device=q.device) + joined.float()
        return empty, lse, lse.detach()
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    k = k.expand(B, *k.shape[1:])
    v = v.expand(B, *v.shape[1:])
    # [B', H', NQ, NK] block status: 0 skip, PARTIAL, FULL (b / h dims 1 or full size)
    status = _dense(blocks.kv_num_blocks, blocks.kv_indices, blocks.n_kv) * PARTIAL
    if blocks.full_kv_num_blocks is not None:
        status = torch.maximum(status, _dense(blocks.full_kv_num_blocks, blocks.full_kv_indices, blocks.n_kv) * FULL)
    status = status[..., :blocks.n_q, :]
    BQ, BKV = blocks.BLOCK_SIZE
    i32 = dict(dtype=torch.int32, device=q.device)
    b_idx = torch.arange(B, **i32).view(B, 1, 1, 1, 1)
    h_idx = torch.arange(Hq, **i32).view(1, Hkv, G, 1, 1)
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in (q, k, v)) or any(c.requires_grad for c in score_caps + mask_caps))

    outs, lses, maxes = [], [], []
    for m in range(blocks.n_q):
        r0, r1 = m * BQ, min(L, (m + 1) * BQ)
        if r0 >= L:
            break
        st = status[:, :, m, :]  # [B', H', NK]
        cols = torch.nonzero(st.flatten(0, -2).amax(0) > 0).flatten()
        if cols.numel() == 0:
            outs.append(q.new_zeros(B, Hq, r1 - r0, v.shape[-1]))
            lses.append(torch.full((B, Hq, r1 - r0), -float("inf"), dtype=torch.float32, device=q.device))
            maxes.append(lses[-1])
            continue
        pos = (cols.view(-1, 1) * BKV + torch.arange(BKV, device=q.device).view(1, -1)).flatten()
        keep_pos = pos < S
        pos = pos[keep_pos]
        # per gathered key: its block's status for each (b', h')
        pst = st[:, :, pos // BKV]  # [B', H', K]
        pst = pst.reshape(pst.shape[0], Hkv if pst.shape[1] == Hq else 1, G if pst.shape[1] == Hq else 1, 1, -1)
        # (bound now: checkpoint calls this again in the backward, after the loop moved on)
        fn = lambda qb, kk, vv, *caps, pos=pos, pst=pst, r0=r0: _block(
            qb, kk, vv, pos, pst, r0, score, list(caps[:len(score_caps)]), mask, list(caps[len(score_caps):]), scale,
            G, cdt, b_idx, h_idx)
        if needs_grad:
            o, lse, mx = checkpoint(fn, q[:, :, r0:r1], k, v, *score_caps, *mask_caps, use_reentrant=False)
        else:
            o, lse, mx = fn(q[:, :, r0:r1], k, v, *score_caps, *mask_caps)
        outs.append(o)
        lses.append(lse)
        maxes.append(mx)
    return torch.cat(outs, 2), torch.cat(lses, 2), torch.cat(maxes, 2)


def _block(qb, k, v, pos, pst, r0, score, score_caps, mask, mask_caps, scale, G, cdt, b_idx, h_idx):
    """One query block against the gathered key positions ``pos``."""
    B, Hq, R, E = qb.shape
    Hkv = k.shape[1]
    qg = qb.reshape(B, Hkv, G, R, E).to(cdt)
    ks = k[:, :, pos].to(cdt)  # [B, Hkv, K, E]
    vs = v[:, :, pos].to(cdt)
    s = torch.einsum("bhgre,bhke->bhgrk", qg, ks) * scale  # [B, Hkv, G, R, K]
    q_idx = torch.arange(r0, r0 + R, dtype=torch.int32, device=qb.device).view(1, 1, 1, R, 1)
    kv_idx = pos.to(torch.int32).view(1, 1, 1, 1, -1)
    idx = dict(b=b_idx, h=h_idx, q_idx=q_idx, kv_idx=kv_idx)
    if score is not None:
        s, = _trace.evaluate(score, dict(idx, score=s), score_caps)
        s = torch.broadcast_to(torch.as_tensor(s, device=qb.device).to(cdt), (B, Hkv, G, R, pos.numel()))
    keep = pst == FULL if mask is not None else pst > 0  # no mask_mod: a partial block is kept whole
    if mask is not None and bool((pst == PARTIAL).any()):
        mk, = _trace.evaluate(mask, idx, mask_caps)
        keep = keep | ((pst == PARTIAL) & torch.as_tensor(mk, device=qb.device))
    s = torch.where(keep, s, -float("inf"))
    mx = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isinf(mx) & (mx < 0), 0.0, mx)
    p = torch.exp(s - m_safe)
    l = p.sum(-1, keepdim=True)
    out = torch.einsum("bhgrk,bhke->bhgre", p, vs) / torch.where(l > 0, l, 1.0)
    lse = (m_safe + torch.log(l)).squeeze(-1)  # log(0) = -inf for rows with nothing kept
    return (out.reshape(B, Hq, R, -1).to(qb.dtype), lse.reshape(B, Hq, R).float(),
            mx.squeeze(-1).reshape(B, Hq, R).float())

"""Blocked online-softmax attention in torch ops: the CPU FLASH / EFFICIENT path.

Memory is linear in the sequence length: scores exist one ``rows x BLOCK_N`` tile at a time,
and the backward recomputes them from the saved log-sum-exp instead of keeping the ``L x S``
probabilities. Dropout masks are regenerated per tile from ``(seed, tile)``.

Layout: q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``; GQA groups query heads
``h`` onto key head ``h // (Hq // Hkv)`` by viewing q as ``(B, Hkv, G, L, E)`` (no K/V copy).
``band``: a ``Band`` with no bound or a causal one (top-left or bottom-right; ``cpu.varlen``
passes windows as masks). ``mask``: None, bool (True = keep) or
additive float, broadcastable to ``(B, Hq, L, S)``; never expanded in memory.
"""

from __future__ import annotations

import torch

from .._layout import Band

# Each score tile holds at most this many elements (fp32: 2 MiB, about one core's L2), so the
# softmax passes over a tile stay in cache. Swept on a 2-core x86 CPU (1x8x4096x64 fp32
# causal forward): 2^19 elements with 256 keys per tile was fastest (2^17: +30%, 2^22: +15%).
TILE_ELEMENTS = 1 << 19
BLOCK_N_MIN, BLOCK_N_MAX = 32, 256


def _tiles(rows_per_l: int, L: int, S: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a problem with ``rows_per_l`` (batch*heads) score rows per query."""
    block_n = max(BLOCK_N_MIN, min(BLOCK_N_MAX, S))
    block_m = max(1, min(L, TILE_ELEMENTS // max(1, rows_per_l * block_n)))
    if block_m == L:  # every query in one row block (decode, short prefill): widen the key tiles to the
        # same budget (a GQA decode step, B=2, 16 / 4 heads, 1100 keys: one tile instead of five, 15% faster)
        block_n = max(block_n, min(S, TILE_ELEMENTS // max(1, rows_per_l * L)))
    return block_m, block_n


def _causal_offset(band: Band, L: int, S: int) -> int:
    # Query i may see key j iff j <= i + offset.
    return S - L if band.bottom_right else 0


def _causal(band: Band) -> bool:
    """Whether ``band`` bounds keys by the diagonal; a ValueError for what this path has no mode of."""
    if not band.is_causal_only:
        raise ValueError(f"the blocked kernel takes no band or a causal one (left -1, right 0); got {band}")
    return band.right == 0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask4(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask


def _mask_tile(mask4: torch.Tensor, B: int, Hkv: int, G: int, r0: int, r1: int, j0: int, j1: int) -> torch.Tensor:
    """The mask for rows [r0, r1) and keys [j0, j1) as a (B, Hkv, G, rows, cols) view."""
    m = mask4[_tile_index(mask4, r0, r1, j0, j1)]
    m = m.expand(B, Hkv * G, r1 - r0, j1 - j0)
    return m.unflatten(1, (Hkv, G))


def _tile_index(mask4: torch.Tensor, r0: int, r1: int, j0: int, j1: int) -> tuple:
    # A broadcast (size-1) row or key dim is indexed whole, not sliced.
    rows = slice(r0, r1) if mask4.shape[2] != 1 else slice(None)
    cols = slice(j0, j1) if mask4.shape[3] != 1 else slice(None)
    return (Ellipsis, rows, cols)


def _keep_tile(seed: int, tile: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15 * (tile + 1)) % (1 << 63))
    return torch.rand(shape, generator=gen) >= p


def _tile_plan(L: int, S: int, rows_per_l: int, band: Band):
    """Yield (tile_id, r0, r1, j0, j1, diag_rows): the tiles with any visible key.

    ``diag_rows`` counts the leading rows of the tile that need the causal mask applied.
    """
    block_m, block_n = _tiles(rows_per_l, L, S)
    causal = _causal(band)
    off = _causal_offset(band, L, S) if causal else 0
    tile = 0
    for r0 in range(0, L, block_m):
        r1 = min(L, r0 + block_m)
        for j0 in range(0, S, block_n):
            j1 = min(S, j0 + block_n)
            tile += 1
            if causal:
                if j0 > r1 - 1 + off:  # every row of the tile is left of this block
                    break
                j1 = min(j1, r1 + off)  # keys past the last row's diagonal: none of them visible
                lo = max(r0, j0 - off)  # rows before lo see none of these keys
                if lo >= r1:
                    continue
                diag = max(0, min(r1, j1 - 1 - off) - lo)
                yield tile, lo, r1, j0, j1, diag
            else:
                yield tile, r0, r1, j0, j1, 0


def _grouped_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` (B, Hkv, G, R, K) @ ``b`` (B, Hkv, K, N) -> (B, Hkv, G, R, N): the G query heads of a
    key head as G * R rows of one product. Broadcasting ``b`` over G instead makes matmul expand and
    copy it per head (a decode step's tile: 8.4 ms against 0.84, B=2, Hkv=4, G=4, 256 keys)."""
    B, Hkv, G, R, K = a.shape
    return torch.matmul(a.reshape(B, Hkv, G * R, K), b).view(B, Hkv, G, R, b.shape[-1])


def _heads_summed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over G of ``a``^T @ ``b`` for ``a`` (B, Hkv, G, R, N), ``b`` (B, Hkv, G, R, K): one
    product over the G * R rows -> (B, Hkv, N, K), a key head's gradient from its query heads."""
    B, Hkv, G, R, N = a.shape
    return torch.matmul(a.reshape(B, Hkv, G * R, N).transpose(-1, -2), b.reshape(B, Hkv, G * R, b.shape[-1]))


def _scores(qs, kt, r0, r1, j0, j1, diag, off, mask4, dims):
    """Masked scores of one tile from pre-scaled queries (B, Hkv, G, L, E) and transposed keys
    (B, Hkv, E, S): (B, Hkv, G, rows, cols)."""
    B, Hkv, G = dims
    s = _grouped_mm(qs[..., r0:r1, :], kt[..., j0:j1])
    if mask4 is not None:
        m = _mask_tile(mask4, B, Hkv, G, r0, r1, j0, j1)
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s += m
    if diag:
        i = torch.arange(r0, r0 + diag, device=s.device).unsqueeze(-1)
        j = torch.arange(j0, j1, device=s.device)
        s[..., :diag, :].masked_fill_(j > i + off, float("-inf"))
    return s


def forward(q, k, v, mask, dropout_p: float, band: Band, scale: float, seed: int):
    """Returns ``(out, lse)``: out ``(B, Hq, L, Ev)`` in q's dtype, lse ``(B, Hq, L)`` (natural log; fp64 for fp64 inputs, else fp32)."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    qs = (q.to(cdt) * scale).unflatten(1, (Hkv, G))  # [B, Hkv, G, L, E]
    kt = k.to(cdt).transpose(-1, -2)  # [B, Hkv, E, S] (a view: BLAS reads it transposed)
    vc = v.to(cdt)  # [B, Hkv, S, Ev]
    mask4 = _mask4(mask)
    off = _causal_offset(band, L, S) if _causal(band) else 0
    m = torch.full((B, Hkv, G, L), float("-inf"), dtype=cdt, device=q.device)
    denom = torch.zeros((B, Hkv, G, L), dtype=cdt, device=q.device)
    acc = torch.zeros((B, Hkv, G, L, Ev), dtype=cdt, device=q.device)
    for tile, r0, r1, j0, j1, diag in _tile_plan(L, S, B * Hq, band):
        s = _scores(qs, kt, r0, r1, j0, j1, diag, off, mask4, (B, Hkv, G))
        m_old = m[..., r0:r1]
        m_new = torch.maximum(m_old, s.amax(dim=-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        s.sub_(m_safe.unsqueeze(-1)).exp_()  # s is now p
        alpha = torch.exp(m_old - m_safe)
        denom[..., r0:r1] = denom[..., r0:r1] * alpha + s.sum(dim=-1)
        if dropout_p > 0.0:
            s.mul_(_keep_tile(seed, tile, tuple(s.shape), dropout_p)).mul_(1.0 / (1.0 - dropout_p))
        a = acc[..., r0:r1, :]
        a.mul_(alpha.unsqueeze(-1)).add_(_grouped_mm(s, vc[..., j0:j1, :]))
        m[..., r0:r1] = m_new
    empty = denom == 0
    out = acc / denom.masked_fill(empty, 1.0).unsqueeze(-1)
    lse = (m + torch.log(denom)).masked_fill(empty, float("-inf"))
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def backward(dout, q, k, v, out, lse, mask, dropout_p: float, band: Band, scale: float, seed: int, mask_grad: bool,
             dlse=None):
    """Returns ``(dq, dk, dv, dmask)``; dmask has the mask's shape, or is None unless ``mask_grad``.
    ``dlse``: gradient flowing into the returned log-sum-exp, if any (d lse / d s = p)."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    qg = q.to(cdt).unflatten(1, (Hkv, G))
    qs = qg * scale
    kc = k.to(cdt)  # [B, Hkv, S, E]
    kt = kc.transpose(-1, -2)
    vc = v.to(cdt)
    dog = dout.to(cdt).unflatten(1, (Hkv, G))  # [B, Hkv, G, L, Ev]
    delta = (dog * out.to(cdt).unflatten(1, (Hkv, G))).sum(-1)  # [B, Hkv, G, L]
    if dlse is not None:  # ds = p * (dp - delta + dlse)
        delta = delta - dlse.to(cdt).unflatten(1, (Hkv, G))
    lse_g = lse.to(cdt).unflatten(1, (Hkv, G))
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), float("inf"))  # empty rows: p = 0
    mask4 = _mask4(mask)
    off = _causal_offset(band, L, S) if _causal(band) else 0
    dq = torch.zeros_like(qg)
    dk = torch.zeros((B, Hkv, S, E), dtype=cdt, device=q.device)
    dv = torch.zeros((B, Hkv, S, Ev), dtype=cdt, device=q.device)
    dmask = torch.zeros(mask4.shape, dtype=cdt, device=q.device) if mask_grad else None
    for tile, r0, r1, j0, j1, diag in _tile_plan(L, S, B * Hq, band):
        s = _scores(qs, kt, r0, r1, j0, j1, diag, off, mask4, (B, Hkv, G))
        p = s.sub_(lse_g[..., r0:r1].unsqueeze(-1)).exp_()  # [B, Hkv, G, rows, cols]
        do = dog[..., r0:r1, :]
        dp = _grouped_mm(do, vc[..., j0:j1, :].transpose(-1, -2))
        if dropout_p > 0.0:
            z = _keep_tile(seed, tile, tuple(p.shape), dropout_p).to(cdt).mul_(1.0 / (1.0 - dropout_p))
            dv[..., j0:j1, :] += _heads_summed(p * z, do)
            dp.mul_(z)
        else:
            dv[..., j0:j1, :] += _heads_summed(p, do)
        ds = dp.sub_(delta[..., r0:r1].unsqueeze(-1)).mul_(p)  # dL/d(scaled score)
        dq[..., r0:r1, :] += _grouped_mm(ds, kc[..., j0:j1, :]) * scale
        dk[..., j0:j1, :] += _heads_summed(ds, qg[..., r0:r1, :]) * scale
        if dmask is not None:
            ds4 = ds.flatten(1, 2)
            red = [d for d in range(4) if mask4.shape[d] == 1 and ds4.shape[d] != 1]
            dmask[_tile_index(mask4, r0, r1, j0, j1)] += ds4.sum(dim=red, keepdim=True) if red else ds4
    dq = dq.flatten(1, 2).to(q.dtype)
    dmask_out = dmask.reshape(mask.shape).to(mask.dtype) if dmask is not None else None
    return dq, dk.to(k.dtype), dv.to(v.dtype), dmask_out


"""FlexAttention mods in the ring: ``score_mod`` / ``mask_mod`` evaluated at GLOBAL positions.

A ring block attends local query rows ``[q0, q1)`` to rows ``[k0, k1)`` of a visiting K/V shard;
its global positions are ``Block.q_runs`` / ``k_runs``. ``FlexBlocks`` gives every block the
user's mods through one pair of wrappers, traced once per call::

    score_mod'(score, b, h, i, j) = score_mod(score, b, h, qpos[i], kpos[j])
    mask_mod'(b, h, i, j)         = mask_mod(b, h, qpos[i], kpos[j]) & band(qpos[i], kpos[j])

``qpos`` / ``kpos`` are int32 tensors the wrappers capture (the block's global positions), so
each block passes its own as captured VALUES: one generated kernel serves every block, step,
rank and call with the same mods (flex generates code per mod structure, never per captured
value). ``band`` is the call's window / causal bound; documents and padding need no mask work,
since the plan already cut blocks at document ends and at ``seq_len``.

Per block, ``mask_mod'`` is classified into a BlockMask once (``_flex.block_mask.classify``) and
cached with the plan across calls (layers) with the same shapes and mods; a block whose
BlockMask is empty is dropped from the plan.

Two paths, as the fused op pair's kernels:
- "triton": attend's flex core, ``launch.flex_forward`` per block, and ``launch.flex_backward``
  given the GLOBAL ``out`` and ``lse`` of the block's rows (its ``Delta = rowsum(dO * O)`` and
  ``P = exp(s - lse)`` are then the whole row's, as the fused op pair's ring backward).
- "torch": the block in torch ops in float64 (float32 for other dtypes), the mods evaluated by
  flex's own graph evaluator; the lse stays in that precision so the ring's LSE merge is exact
  (flex's blocked path returns an fp32 lse, PyTorch's contract, which the merge would round).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .._hostcache import version
from .blocks import Block, StepPlan

# Placeholders the wrappers index: a traced load from one of them marks the slot a block fills
# with its own positions. Module-level, so a mod traced again fingerprints the same (flex's trace cache).
_QPOS = torch.zeros(1, dtype=torch.int32)
_KPOS = torch.zeros(1, dtype=torch.int32)

BLOCK_SIZE = 128  # the BlockMask's (and so the flex core's listed) block, flex's default
_PLAN_CACHE_SIZE = 32
_PLANS: OrderedDict = OrderedDict()  # plan key -> _BlockPlans
TORCH_TILE_ELEMENTS = 1 << 22  # the torch path's score tile: at most this many elements per row chunk


# ``.to(torch.int32)`` makes each position a value of the traced graph before the user's mod sees
# it: flex's tracer takes an index that is itself an unread capture element (``doc[qpos[q_idx]]``)
# for a tuple of indices.
def _global_score(user):
    def score_mod(score, b, h, q_idx, kv_idx):
        return user(score, b, h, _QPOS[q_idx].to(torch.int32), _KPOS[kv_idx].to(torch.int32))

    score_mod.__name__ = getattr(user, "__name__", type(user).__name__)
    return score_mod


def _global_mask(user, left: int, right: int):
    def mask_mod(b, h, q_idx, kv_idx):
        q_pos, kv_pos = _QPOS[q_idx].to(torch.int32), _KPOS[kv_idx].to(torch.int32)
        keep = user(b, h, q_pos, kv_pos) if user is not None else None
        for bound in ((kv_pos <= q_pos + right) if right >= 0 else None,
                      (kv_pos >= q_pos - left) if left >= 0 else None):
            if bound is not None:
                keep = bound if keep is None else torch.logical_and(keep, bound)
        return keep

    mask_mod.__name__ = getattr(user, "__name__", "band") if user is not None else "band"
    return mask_mod


def _uses(graph, name: str) -> bool:
    """Whether ``graph`` reads the input ``name`` (b, h, q_idx, kv_idx)."""
    from .._flex.trace import SCORE_INPUTS, Ref

    i = SCORE_INPUTS.index(name)
    return any(isinstance(a, Ref) and a.i == i for n in graph.nodes for a in n.args) or graph.output == Ref(i)


def _keeps_everything(graph) -> bool:
    from .._flex.trace import Ref

    o = graph.output
    return o is True or isinstance(o, Ref) and graph.nodes[o.i].op == "const" and graph.nodes[o.i].args[0] is True


def structure_checksum(graph) -> int:
    """A 31-bit checksum of a traced mod's structure (what the ranks compare), 0 for no mod."""
    return 0 if graph is None else zlib.crc32(repr(graph.key).encode()) & 0x7FFFFFFF


@dataclass
class Mods:
    """The traced mods of one call: the user's graphs (evaluated at global positions by the torch
    path), and the global wrappers' graphs (the flex core's hooks; None where nothing to do)."""

    score: object | None  # the user's score_mod graph
    mask: object | None  # the user's mask_mod graph
    score_global: object | None  # wrapper graphs, captures include the _QPOS / _KPOS placeholders
    mask_global: object | None
    left: int
    right: int

    @property
    def trained(self) -> list[torch.Tensor]:
        """The score_mod's captured float tensors that require grad (their gradients are summed)."""
        if self.score is None:
            return []
        return [c.tensor for c in self.score.captures if c.tensor.is_floating_point() and c.tensor.requires_grad]


def trace_mods(score_mod, mask_mod, left: int, right: int) -> Mods:
    """Trace the user's mods (flex's own errors surface unchanged, naming the op and the line) and
    their global wrappers."""
    from .._flex import trace as _trace

    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None and not callable(mod):
            raise TypeError(f"{name} must be a callable or None, got {type(mod).__name__}: {mod!r}")
    score = _trace.trace_cached(score_mod, "score") if score_mod is not None else None
    mask = _trace.trace_cached(mask_mod, "mask") if mask_mod is not None else None
    if mask is not None and _keeps_everything(mask):
        mask, mask_mod = None, None
    score_global = _trace.trace_cached(_global_score(score_mod), "score") if score is not None else None
    mask_global = None
    if mask is not None or left >= 0 or right >= 0:
        mask_global = _trace.trace_cached(_global_mask(mask_mod, left, right), "mask")
    return Mods(score, mask, score_global, mask_global, left, right)


def _positions(runs, device) -> torch.Tensor:
    return torch.cat([torch.arange(a, a + n, dtype=torch.int32) for a, n in runs]).to(device)


def _with_positions(graph, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> list[torch.Tensor]:
    """A wrapper graph's captures with the placeholders replaced by a block's positions."""
    return [q_pos if c.tensor is _QPOS else kv_pos if c.tensor is _KPOS else c.tensor for c in graph.captures]


def _lists(status: torch.Tensor, Lb: int, Sb: int):
    """The flex core's BlockLists of an int8 [B', H', NQ, NK] block status (1 partial, 2 full)."""
    from .._flex import lists as _lists_mod
    from .._flex.block_mask import BlockMask

    def ordered(keep):  # kept columns first, ascending
        keep = keep.to(torch.int8)
        return (keep.sum(-1, dtype=torch.int32).contiguous(),
                torch.argsort(keep, dim=-1, descending=True, stable=True).to(torch.int32).contiguous())

    bm = BlockMask.from_kv_blocks(*ordered(status == 1), *ordered(status == 2), BLOCK_SIZE=(BLOCK_SIZE, BLOCK_SIZE),
                                  seq_lengths=(Lb, Sb))
    return _lists_mod.from_block_mask(bm)


@dataclass
class _BlockPlans:
    steps: tuple  # StepPlans with the blocks whose BlockMask is empty dropped
    positions: dict  # Block -> (q positions, kv positions), int32 on the device
    lists: dict  # Block -> BlockLists
    keep_alive: tuple  # the mask's captures (the cache key holds their ids)


def block_plans(steps: tuple, key: tuple, mods: Mods, B: int, Hq: int, device) -> _BlockPlans:
    """Positions and BlockLists of every block of ``steps`` (one rank's ring), cached under ``key``
    (the plan's arguments) with the mask's structure and the identity and version of the tensors
    it reads: a layer calling again with the same shapes and mods reuses them."""
    from .._flex import lists as _lists_mod
    from .._flex.block_mask import classify

    graph = mods.mask_global
    caps = tuple(c.tensor for c in graph.captures if c.tensor is not _QPOS and c.tensor is not _KPOS) \
        if graph is not None else ()
    per_bh = graph is not None and (_uses(graph, "b"), _uses(graph, "h"))
    full_key = (key, str(device), None if graph is None else graph.key, tuple(graph.scalars) if graph else (),
                per_bh and (B if per_bh[0] else 1, Hq if per_bh[1] else 1),
                tuple((id(t), version(t)) for t in caps))
    keep = all(version(t) is not None for t in caps)  # an inference tensor may change unseen: no plan kept
    hit = _PLANS.get(full_key) if keep else None
    if hit is not None:
        _PLANS.move_to_end(full_key)
        return hit
    # never inference tensors (a first call under torch.inference_mode): a later training step
    # reuses the plan, and autograd cannot save an inference tensor for backward
    with torch.inference_mode(False):
        positions, lists, kept_steps = {}, {}, []
        for step in steps:
            kept = []
            for blk in step.blocks:
                q_pos, kv_pos = _positions(blk.q_runs, device), _positions(blk.k_runs, device)
                Lb, Sb = blk.q1 - blk.q0, blk.k1 - blk.k0
                if graph is None:  # no mask work: every block of the call full
                    bl = _lists_mod.dense(Lb, Sb, device, BLOCK_SIZE)
                else:
                    g = _graph_with(graph, _with_positions(graph, q_pos, kv_pos))
                    status = classify(g, B if per_bh[0] else 1, Hq if per_bh[1] else 1, Lb, Sb, BLOCK_SIZE, BLOCK_SIZE,
                                      device, impl="torch" if torch.device(device).type == "cpu" else None)
                    if not bool((status != 0).any()):
                        continue  # the mask_mod empties the block: no kernel call, forward or backward
                    bl = _lists(status, Lb, Sb)
                positions[blk], lists[blk] = (q_pos, kv_pos), bl
                kept.append(blk)
            kept_steps.append(StepPlan(step.source, tuple(kept), step.pairs, step.empty_pairs))
    plans = _BlockPlans(tuple(kept_steps), positions, lists, caps)
    if keep:
        _PLANS[full_key] = plans
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plans


def _graph_with(graph, captures: list[torch.Tensor]):
    import dataclasses

    from .._flex.trace import Capture

    return dataclasses.replace(graph, captures=[Capture(t) for t in captures])


class FlexBlocks:
    """A ``BlockAttention`` with FlexAttention mods at global positions (see the module docstring).

    ``kernel``: "triton" (attend's flex core) or "torch". ``plans``: ``block_plans``' result for
    this rank's ring. Gradients of the score_mod's trained captures (``Mods.trained``) accumulate
    over the blocks of a backward pass in ``capture_grads`` (fp32; float64 for float64 tables)."""

    def __init__(self, kernel: str, mods: Mods, plans: _BlockPlans):
        self.kernel, self.mods, self.plans = kernel, mods, plans
        self.capture_grads: list[torch.Tensor] = []

    def begin_backward(self) -> None:
        wide = self.kernel == "torch"  # the flex core scatters into fp32 buffers
        self.capture_grads = [torch.zeros(t.shape, dtype=torch.float64 if wide and t.dtype == torch.float64
                                          else torch.float32, device=t.device) for t in self.mods.trained]

    # -- the flex core
    def _args(self, graph, block: Block, device, grads: list | None):
        from .._flex import codegen

        q_pos, kv_pos = self.plans.positions[block]
        return codegen.hooks(graph).functions, codegen.capture_args(
            _with_positions(graph, q_pos, kv_pos), device, grads=grads, scalars=graph.scalars)

    def _score_grads(self, device) -> list[torch.Tensor]:
        """The flex core's gradient buffers for the score wrapper's captures: a trained capture's
        accumulator itself (the core adds into it, block after block), scratch for the others."""
        acc = {id(t): g for t, g in zip(self.mods.trained, self.capture_grads)}
        return [acc.get(id(c.tensor)) if id(c.tensor) in acc else
                torch.zeros(c.tensor.shape, dtype=torch.float32, device=device)
                for c in self.mods.score_global.captures]

    def _mods_for(self, block: Block, device, backward: bool):
        m = self.mods
        score = mask = None
        if m.score_global is not None:
            grads = self._score_grads(device) if backward and m.trained else []
            fns, args = self._args(m.score_global, block, device, grads)
            score = (fns, args, bool(m.trained)) if backward else (fns, args)
        if m.mask_global is not None:
            mask = self._args(m.mask_global, block, device, [])
        return score, mask

    def forward(self, q, k, v, block: Block, scale: float):
        if self.kernel == "torch":
            return self._torch_forward(q, k, v, block, scale)
        from ..kernels import launch

        score, mask = self._mods_for(block, q.device, backward=False)
        res = launch.flex_forward(q, k, v, self.plans.lists[block], scale, score, mask)
        if res is None:
            raise RuntimeError(f"context_parallel_attention: no flex core tile fits BLOCK_SIZE {BLOCK_SIZE}")
        return res[0], res[1]

    def backward(self, dout, q, k, v, out, lse, block: Block, scale: float):
        if self.kernel == "torch":
            return self._torch_backward(dout, q, k, v, out, lse, block, scale)
        from ..kernels import launch

        score, mask = self._mods_for(block, q.device, backward=True)
        res = launch.flex_backward(dout, q, k, v, out, lse.contiguous(), None, self.plans.lists[block],
                                   scale, score, mask)
        if res is None:
            raise RuntimeError(f"context_parallel_attention: no flex core backward tile fits BLOCK_SIZE {BLOCK_SIZE}")
        return res

    # -- torch ops
    def _scores(self, q, k, block: Block, rows: slice, scale: float, caps=None):
        """(modded scores, kept) of query rows ``rows`` of the block: [B, Hkv, G, R, Sb] each."""
        from .._flex.trace import evaluate

        m = self.mods
        q_pos, kv_pos = self.plans.positions[block]
        B, Hq, _, E = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        qr = q[:, :, rows]
        R = qr.shape[2]
        s = torch.einsum("bhgre,bhse->bhgrs", qr.reshape(B, Hkv, G, R, E), k) * scale
        i32 = dict(dtype=torch.int32, device=q.device)
        idx = dict(b=torch.arange(B, **i32).view(B, 1, 1, 1, 1), h=torch.arange(Hq, **i32).view(1, Hkv, G, 1, 1),
                   q_idx=q_pos[rows].view(1, 1, 1, R, 1), kv_idx=kv_pos.view(1, 1, 1, 1, -1))
        if m.score is not None:
            s, = evaluate(m.score, dict(idx, score=s), caps)
            s = torch.broadcast_to(torch.as_tensor(s, device=q.device).to(k.dtype), (B, Hkv, G, R, k.shape[2]))
        keep = torch.ones((), dtype=torch.bool, device=q.device)
        if m.mask is not None:
            keep, = evaluate(m.mask, idx)
            keep = torch.as_tensor(keep, device=q.device).to(torch.bool)
        if m.right >= 0:
            keep = keep & (idx["kv_idx"] <= idx["q_idx"] + m.right)
        if m.left >= 0:
            keep = keep & (idx["kv_idx"] >= idx["q_idx"] - m.left)
        return s, torch.broadcast_to(keep, s.shape)

    def _row_chunks(self, q, k):
        L = q.shape[2]
        per_row = max(1, q.shape[0] * q.shape[1] * k.shape[2])
        step = max(1, TORCH_TILE_ELEMENTS // per_row)
        return [slice(r, min(L, r + step)) for r in range(0, L, step)]

    def _torch_forward(self, q, k, v, block: Block, scale: float):
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, Hq, L, _ = q.shape
        Hkv, G = k.shape[1], Hq // k.shape[1]
        qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
        outs, lses = [], []
        for rows in self._row_chunks(q, k):
            s, keep = self._scores(qc, kc, block, rows, scale)
            s = torch.where(keep, s, float("-inf"))
            mx = s.amax(-1, keepdim=True)
            mx = torch.where(torch.isinf(mx), 0.0, mx)
            p = torch.exp(s - mx)
            den = p.sum(-1, keepdim=True)
            o = torch.einsum("bhgrs,bhse->bhgre", p, vc) / torch.where(den > 0, den, 1.0)
            outs.append(o.reshape(B, Hq, -1, v.shape[-1]))
            lses.append((mx + torch.log(den)).reshape(B, Hq, -1))  # log 0 = -inf: a row that sees nothing
        return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)

    def _torch_backward(self, dout, q, k, v, out, lse, block: Block, scale: float):
        """The block's gradients from the GLOBAL ``out`` / ``lse``: ``P = exp(s - lse)``,
        ``dS = P (dO V^T - rowsum(dO O))``, pulled back through the score_mod by autograd."""
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, Hq, L, E = q.shape
        Hkv, G = k.shape[1], Hq // k.shape[1]
        trained = self.mods.trained
        caps = None
        if self.mods.score is not None:
            caps = [c.tensor.detach().requires_grad_(c.tensor.is_floating_point() and c.tensor.requires_grad)
                    for c in self.mods.score.captures]
            leaves = {id(c.tensor): x for c, x in zip(self.mods.score.captures, caps)}
        qc = q.detach().to(cdt).requires_grad_()
        kc = k.detach().to(cdt).requires_grad_()
        vc = v.to(cdt)
        dq = torch.zeros(qc.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(kc.shape, dtype=cdt, device=q.device)
        dv = torch.zeros(vc.shape, dtype=cdt, device=q.device)
        for rows in self._row_chunks(q, k):
            R = qc[:, :, rows].shape[2]
            with torch.enable_grad():
                s, keep = self._scores(qc, kc, block, rows, scale, caps)
                s = torch.where(keep, s, 0.0)  # masked positions pass no gradient (and no NaN) to the mods
            lse_r = lse[:, :, rows].to(cdt).reshape(B, Hkv, G, R, 1)
            p = torch.where(keep, torch.exp(s.detach() - lse_r), 0.0)  # [B, Hkv, G, R, Sb]
            do = dout[:, :, rows].to(cdt).reshape(B, Hkv, G, R, -1)
            o = out[:, :, rows].to(cdt).reshape(B, Hkv, G, R, -1)
            dv += torch.einsum("bhgrs,bhgre->bhse", p, do)
            ds = p * (torch.einsum("bhgre,bhse->bhgrs", do, vc) - (do * o).sum(-1, keepdim=True))
            wants = [qc, kc] + [leaves[id(t)] for t in trained]
            got = torch.autograd.grad(s, wants, ds, allow_unused=True)
            if got[0] is not None:
                dq += got[0]
            if got[1] is not None:
                dk += got[1]
            for acc, g in zip(self.capture_grads, got[2:]):
                if g is not None:
                    acc.add_(g)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

"""attend.distributed: ring attention over gloo processes against the single-process attend call
on the gathered sequence (float64), plus the pieces that need no process group: the LSE merge,
the block plan and the layout functions.

Each world size spawns its processes once (``_ring_results``) and runs every case inside them;
the parametrized tests below read what each rank measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import tempfile
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attend
from attend._layout import Band
from attend.distributed import (context_parallel_attention, pad_for_sharding, padded_length, record_ring_stats, shard,
                                shard_positions, unshard)
from attend.distributed.blocks import FusedBlocks, Mask, merge_, plan
from attend.flex_attention import flex_attention
from attend.varlen import varlen_attn
from conftest import DEVICE, FLOOR, KERNELS, assert_matches_float64

F64 = torch.float64
TOL = FLOOR[F64]  # both sides float64: what remains is summation order


# ---------------------------------------------------------------------------------------------
# The cases every world size runs


@dataclass(frozen=True)
class Case:
    name: str
    is_causal: bool = False
    window: tuple[int, int] | None = None
    heads: tuple[int, int] = (2, 2)  # (query heads, key/value heads)
    layout: str = "zigzag"
    chunk: int = 5  # tokens per chunk of the layout
    unpadded: int = 0  # tokens of padding at the end (< 2N: pad_for_sharding's minimal padding)
    value_dim: int = 8
    scale: float | None = None
    docs: tuple[int, ...] | None = None  # document lengths; the last document takes the rest


CASES = [
    Case("noncausal"),
    Case("causal", is_causal=True),
    Case("causal-contiguous", is_causal=True, layout="contiguous"),
    Case("noncausal-contiguous-scale", layout="contiguous", scale=0.3, value_dim=6),
    Case("window-causal", window=(7, 0)),
    Case("window-two-sided", window=(3, 4)),
    Case("window-is-causal", is_causal=True, window=(6, -1), layout="contiguous"),
    Case("gqa-causal", is_causal=True, heads=(4, 2)),
    Case("gqa-window", window=(9, 0), heads=(6, 2)),
    Case("padded-noncausal", unpadded=3),
    Case("padded-causal-tiny-chunks", is_causal=True, chunk=1, unpadded=3),  # whole chunks of padding
    Case("padded-window-gqa", window=(4, 0), heads=(4, 1), unpadded=2),
    Case("docs-causal", is_causal=True, docs=(7, 1, 12)),
    Case("docs-noncausal-padded", docs=(4, 9), unpadded=3),
    Case("docs-window-gqa", window=(5, 0), heads=(4, 2), docs=(11, 0, 3)),
]


@dataclass(frozen=True)
class FlexCase:
    """FlexAttention mods in the ring, against ``attend.flex_attention`` on the gathered sequence."""

    name: str
    mod: str  # which mods (see _mods)
    is_causal: bool = False
    window: tuple[int, int] | None = None
    heads: tuple[int, int] = (2, 2)
    layout: str = "zigzag"
    chunk: int = 5
    unpadded: int = 0


FLEX_CASES = [
    FlexCase("alibi-causal-gqa", "alibi", is_causal=True, heads=(4, 2)),
    FlexCase("softcap-window-contiguous", "softcap", window=(6, 0), layout="contiguous"),
    FlexCase("docmask-causal-empty-rows", "docs", is_causal=True),
    FlexCase("relbias-trained-contiguous-padded", "relbias", layout="contiguous", unpadded=1),
]
FLEX_IDS = [c.name for c in FLEX_CASES]


def _mods(kind: str, H: int, S: int, g: torch.Generator, dtype=F64, device="cpu"):
    """(score_mod, mask_mod, trained tensors) of a FlexCase; positions are global, ``S`` the padded length."""
    if kind == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, dtype=dtype) / H).to(device)
        return (lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - q_idx)), None, []
    if kind == "softcap":
        return (lambda score, b, h, q_idx, kv_idx: 2.0 * torch.tanh(score / 2.0)), None, []
    if kind == "docs":
        # documents of S/2, S/4 + 1 and the rest tokens: chunk pairs across documents leave blocks
        # empty; rows with q_idx % 7 == 3 see no key at all (out 0, no gradient)
        doc = torch.tensor([0] * (S // 2) + [1] * (S // 4 + 1) + [2] * (S - S // 2 - S // 4 - 1), dtype=torch.int32)
        doc = doc.to(device)

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx % 7 != 3)
        return None, document, []
    table = torch.randn(H, 2 * S, generator=g, dtype=dtype).to(device).requires_grad_()
    return (lambda score, b, h, q_idx, kv_idx: score + table[h, q_idx - kv_idx + S]), None, [table]


def _flex_reference(Q, K, V, dO, n: int, left: int, right: int, score_mod, mask_mod, trained, scale=None,
                    block: int = 16):
    """attend.flex_attention on the first ``n`` tokens (the band and the mask_mod as one block mask):
    [out, dq, dk, dv] and the trained tensors' gradients."""
    from attend.flex_attention import and_masks, create_block_mask

    ins = [t[:, :, :n].detach().clone().requires_grad_() for t in (Q, K, V)]

    def band(b, h, q_idx, kv_idx):
        keep = q_idx >= 0
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        return keep

    mask = band if mask_mod is None else and_masks(mask_mod, band)
    bm = create_block_mask(mask, Q.shape[0], Q.shape[1], n, n, device=Q.device, BLOCK_SIZE=block)
    for t in trained:
        t.grad = None
    out = flex_attention(*ins, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=Q.shape[1] != K.shape[1])
    out.backward(dO[:, :, :n])
    got = [out.detach(), *(t.grad for t in ins)], [t.grad.clone() for t in trained]
    for t in trained:
        t.grad = None
    return got


def _global_inputs(case, world: int, seed: int, value_dim: int = 8):
    """(generator, S, n unpadded, Q, K, V, dO) of a case: the whole sequence, float64, B=2, E=8."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = case.heads
    S = 2 * world * case.chunk if case.layout == "zigzag" else world * case.chunk
    B, E = 2, 8
    Q = torch.randn(B, hq, S, E, generator=g, dtype=F64)
    K = torch.randn(B, hkv, S, E, generator=g, dtype=F64)
    V = torch.randn(B, hkv, S, value_dim, generator=g, dtype=F64)
    dO = torch.randn(B, hq, S, value_dim, generator=g, dtype=F64)
    return g, S, S - case.unpadded, Q, K, V, dO


def _run_flex_case(case: FlexCase, rank: int, world: int) -> dict:
    g, S, n, Q, K, V, dO = _global_inputs(case, world, 2000 + FLEX_CASES.index(case))
    hq, hkv = case.heads
    score_mod, mask_mod, trained = _mods(case.mod, hq, S, g)
    left, right = case.window or (-1, -1)
    right = 0 if case.is_causal else right
    ref, ref_caps = _flex_reference(Q, K, V, dO, n, left, right, score_mod, mask_mod, trained)
    want = [pad_for_sharding(t, dim=2, world_size=world, layout=case.layout) for t in ref]

    mine = [shard(t, dim=2, layout=case.layout).requires_grad_() for t in (Q, K, V)]
    with record_ring_stats() as stats:
        out = context_parallel_attention(*mine, is_causal=case.is_causal, enable_gqa=hq != hkv,
                                         window_size=case.window, layout=case.layout,
                                         seq_len=n if case.unpadded else None, score_mod=score_mod, mask_mod=mask_mod)
        out.backward(shard(dO, dim=2, layout=case.layout))
    got = [out, *(t.grad for t in mine)]
    errs = {name: (g_.detach() - shard(w, dim=2, layout=case.layout)).abs().max().item()
            for name, g_, w in zip(("out", "dq", "dk", "dv"), got, want)}
    for i, (t, w) in enumerate(zip(trained, ref_caps)):
        errs[f"capture{i}"] = (t.grad - w).abs().max().item()
    unmasked = sum(len(s.blocks) for s in plan(rank, world, S // world, case.layout, Mask(left, right, n)))
    finite = all(bool(torch.isfinite(t).all()) for t in got + [t.grad for t in trained])
    blind = shard_positions(S, rank=rank, world_size=world, layout=case.layout) % 7 == 3  # docs: rows that see nothing
    zero_blind = bool((out[:, :, blind] == 0).all() and (mine[0].grad[:, :, blind] == 0).all())
    return dict(errs=errs, finite=finite, blocks=stats[0].blocks, unmasked_blocks=unmasked, zero_blind=zero_blind)


def _cu(lengths, n: int) -> list[int]:
    """Document offsets for ``lengths`` (clipped to ``n``), the last document taking the rest."""
    cu = [0]
    for length in lengths:
        cu.append(min(n, cu[-1] + length))
    return cu + [n]


def _visible(n: int, left: int, right: int, cu: list[int] | None):
    """The (n, n) bool mask: the band, within each document."""
    p, r = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sees = ((r <= p + right) if right >= 0 else True) & ((r >= p - left) if left >= 0 else True)
    if cu is not None:
        doc = torch.bucketize(torch.arange(n), torch.tensor(cu[1:]), right=True)
        sees = sees & (doc[:, None] == doc[None, :])
    return sees
CASE_IDS = [c.name for c in CASES]
WORLD_SIZES = [2, 4]


def _reference(case: Case, q, k, v, n: int, via_varlen: bool = False):
    """The single-process attend call on the first ``n`` tokens of the gathered sequence: SDPA, with
    a window as its bool mask; or ``via_varlen``, ``varlen_attn`` with the same ``window_size``
    (whose convention the ring follows; its CPU path keeps a float32 lse, so its float64
    gradients are not a float64 reference)."""
    q, k, v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
    gqa = q.shape[1] != k.shape[1]
    left, right = case.window or (-1, -1)
    right = 0 if case.is_causal else right
    if via_varlen:
        B = q.shape[0]
        packed = [t.transpose(1, 2).reshape(B * n, t.shape[1], t.shape[3]) for t in (q, k, v)]
        cu = torch.arange(0, B * n + 1, n, dtype=torch.int32)
        out = varlen_attn(*packed, cu, cu, n, n, window_size=(left, right), scale=case.scale, enable_gqa=gqa)
        return out.reshape(B, n, q.shape[1], -1).transpose(1, 2)
    if case.window is None and case.docs is None:
        return attend.scaled_dot_product_attention(q, k, v, is_causal=case.is_causal, scale=case.scale, enable_gqa=gqa)
    sees = _visible(n, left, right, None if case.docs is None else _cu(case.docs, n))
    return attend.scaled_dot_product_attention(q, k, v, attn_mask=sees, scale=case.scale, enable_gqa=gqa)


def _run_case(case: Case, rank: int, world: int) -> dict:
    _, S, n, Q, K, V, dO = _global_inputs(case, world, 1000 + CASES.index(case), case.value_dim)
    hq, hkv = case.heads
    # The reference on the n real tokens; its padded rows (and their gradients) are 0.
    ref_in = [t[:, :, :n].clone().requires_grad_() for t in (Q, K, V)]
    ref = _reference(case, *ref_in, n)
    ref.backward(dO[:, :, :n])
    want = [pad_for_sharding(t, dim=2, world_size=world, layout=case.layout) for t in (ref, *(x.grad for x in ref_in))]

    mine = [shard(t, dim=2, layout=case.layout).requires_grad_() for t in (Q, K, V)]
    with record_ring_stats() as stats:
        out = context_parallel_attention(*mine, is_causal=case.is_causal, scale=case.scale,
                                         enable_gqa=hq != hkv, window_size=case.window, layout=case.layout,
                                         seq_len=n if case.unpadded and not case.docs else None,
                                         cu_seqlens=None if case.docs is None else _cu(case.docs, n))
        out.backward(shard(dO, dim=2, layout=case.layout))
    got = [out, *(t.grad for t in mine)]
    errs = {name: (g_.detach() - shard(w, dim=2, layout=case.layout)).abs().max().item()
            for name, g_, w in zip(("out", "dq", "dk", "dv"), got, want)}
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    return dict(errs=errs, finite=finite, stats=stats)


def _catch(fn) -> str:
    try:
        fn()
    except Exception as e:  # the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return "no error"


def _error_cases(rank: int, world: int) -> dict:
    """Each case leaves every rank at the same point of the group's collectives."""
    g = torch.Generator().manual_seed(7)
    t = lambda L, h=2: torch.randn(1, h, L, 4, generator=g, dtype=F64)  # noqa: E731
    cpa = context_parallel_attention
    out = {}
    L = 4 + (2 if rank == 1 else 0)
    out["unequal-shards"] = _catch(lambda: cpa(t(L), t(L), t(L)))
    out["bad-layout"] = _catch(lambda: cpa(t(4), t(4), t(4), layout="ring"))
    out["bad-layout-one-rank"] = _catch(lambda: cpa(t(4), t(4), t(4), layout="ring" if rank == 1 else "zigzag"))
    out["odd-zigzag-shard"] = _catch(lambda: cpa(t(5), t(5), t(5)))
    out["group-size-mismatch"] = _catch(lambda: cpa(t(4), t(4), t(4), seq_len=4 * world * 2 - 1))
    out["options-disagree"] = _catch(lambda: cpa(t(4), t(4), t(4), is_causal=rank == 0))
    out["cu-seqlens-decreasing"] = _catch(lambda: cpa(t(4), t(4), t(4), cu_seqlens=[0, 5, 3]))
    cu = [0, 2 + rank, 4 * world]
    out["cu-seqlens-disagree"] = _catch(lambda: cpa(t(4), t(4), t(4), cu_seqlens=torch.tensor(cu)))
    out["shard-world-size"] = _catch(lambda: shard(t(16), dim=2, world_size=world + 1, rank=0, group=dist.group.WORLD))
    out["shard-not-divisible"] = _catch(lambda: shard(t(2 * world * 2 + 1), dim=2))
    out["mod-not-callable"] = _catch(lambda: cpa(t(4), t(4), t(4), score_mod=3))
    out["mod-3d"] = _catch(lambda: cpa(t(4)[0], t(4)[0], t(4)[0], mask_mod=lambda b, h, q, kv: q >= kv))

    def sinh_mod(score, b, h, q_idx, kv_idx):
        return torch.sinh(score)
    out["mod-untranslatable"] = _catch(lambda: cpa(t(4), t(4), t(4), score_mod=sinh_mod))
    out["mod-untranslatable-flex"] = _catch(lambda: flex_attention(t(4), t(4), t(4), score_mod=sinh_mod))
    out["mods-disagree"] = _catch(lambda: cpa(t(4), t(4), t(4), score_mod=(lambda s, b, h, q, kv: s * 2.0)
                                              if rank == 0 else None))
    return out


def _hung_peer(rank: int, world: int) -> dict:
    """Rank 0 calls on a group with a 1.5 s timeout that rank 1 never calls on: the wait must end."""
    short = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=1.5))
    result = {}
    if rank == 0:
        x = torch.randn(1, 1, 4, 4, dtype=F64)
        start = time.monotonic()
        result["error"] = _catch(lambda: context_parallel_attention(x, x, x, group=short))
        result["seconds"] = time.monotonic() - start
    dist.barrier()  # rank 1 stays alive (its socket open) until rank 0 has timed out
    return result


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for case in CASES:
            try:
                results[case.name] = _run_case(case, rank, world)
            except Exception as e:  # reported per case by the parent
                results[case.name] = dict(exception=f"{type(e).__name__}: {e}")
        for case in FLEX_CASES:
            try:
                results[case.name] = _run_flex_case(case, rank, world)
            except Exception as e:  # reported per case by the parent
                results[case.name] = dict(exception=f"{type(e).__name__}: {e}")
        results["errors"] = _error_cases(rank, world)
        results["hung"] = _hung_peer(rank, world) if world == 2 else {}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Forked workers inherit the imported torch, Triton and attend: spawned ones import them again,
# about 13 s of the file's time on a loaded 2-core machine against 3 s forked. The workers touch
# no CUDA and run one thread each (torch.set_num_threads(1)), what forking after OpenMP use
# allows; not after this process used CUDA (a CUDA backward starts autograd's device threads, and
# PyTorch then refuses to run autograd in a forked child): spawn then.
def _start_method() -> str:
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


@pytest.fixture(scope="module")
def ring_results():
    """{world size: [rank 0's results, rank 1's, ...]}, one spawn per world size."""
    results = {}
    for world in WORLD_SIZES:
        with tempfile.TemporaryDirectory() as d:
            init = f"tcp://127.0.0.1:{_free_port()}"
            mp.start_processes(_worker, args=(world, init, d), nprocs=world, join=True, start_method=_start_method())
            results[world] = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return results


def _assert_rank_matches(rank: int, r: dict) -> None:
    """One rank's result: no exception, everything finite, every error within TOL."""
    assert "exception" not in r, f"rank {rank}: {r.get('exception')}"
    assert r["finite"], f"rank {rank}: non-finite output or gradient"
    for name, err in r["errs"].items():
        assert err <= TOL, f"rank {rank} {name}: max error {err:.3e} > {TOL:.0e}"


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"N{w}")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ring_matches_single_process(ring_results, world, case):
    for rank, res in enumerate(ring_results[world]):
        _assert_rank_matches(rank, res[case.name])


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"N{w}")
def test_causal_zigzag_skips_empty_pairs(ring_results, world):
    # Zigzag: each rank's two query chunks see r+1 and 2N-r chunks of the 4N it meets, so every rank
    # skips 2N-1 pairs, forward and backward alike; contiguous: rank r skips N-1-r of its N.
    for rank, res in enumerate(ring_results[world]):
        fwd, bwd = res["causal"]["stats"]
        assert (fwd.direction, bwd.direction) == ("forward", "backward")
        assert (fwd.steps, fwd.pairs, fwd.empty_pairs) == (world, 4 * world, 2 * world - 1)
        assert bwd == dataclasses.replace(fwd, direction="backward")
        fwd_c = res["causal-contiguous"]["stats"][0]
        assert (fwd_c.pairs, fwd_c.empty_pairs) == (world, world - 1 - rank)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"N{w}")
def test_errors_name_the_problem(ring_results, world):
    for rank, res in enumerate(ring_results[world]):
        e = res["errors"]
        assert "disagree on tokens per rank (dim -2): rank 0: 4, rank 1: 6" in e["unequal-shards"]
        assert "layout must be one of 'zigzag', 'contiguous'; got 'ring'" in e["bad-layout"]
        if rank == 1:
            assert "got 'ring'" in e["bad-layout-one-rank"]
        else:
            assert "rank(s) [1] of the group rejected their arguments" in e["bad-layout-one-rank"]
        assert "layout='zigzag' splits each rank's shard into 2 equal chunks, but q holds 5" in e["odd-zigzag-shard"]
        assert f"seq_len={8 * world - 1} over {world} ranks" in e["group-size-mismatch"]
        assert "shards made for a group of another size" in e["group-size-mismatch"]
        assert "disagree on window right (0: is_causal): rank 0: 0, rank 1: -1" in e["options-disagree"]
        assert "cu_seqlens must start at 0 and not decrease" in e["cu-seqlens-decreasing"]
        assert "got [0, 5, 3]" in e["cu-seqlens-decreasing"]
        assert "disagree on cu_seqlens (checksum)" in e["cu-seqlens-disagree"]
        assert f"world_size={world + 1} but group has {world} ranks" in e["shard-world-size"]
        assert f"layout='zigzag' over {world} ranks needs a multiple of {2 * world}" in e["shard-not-divisible"]


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"N{w}")
@pytest.mark.parametrize("case", FLEX_CASES, ids=FLEX_IDS)
def test_ring_with_mods_matches_flex_attention(ring_results, world, case):
    """Outputs and gradients of q, k, v and of a trained capture (summed over every rank's blocks)
    equal attend.flex_attention on the gathered sequence, float64."""
    for rank, res in enumerate(ring_results[world]):
        r = res[case.name]
        _assert_rank_matches(rank, r)
        if case.mod == "relbias":
            assert "capture0" in r["errs"]
        if case.mod == "docs":  # blocks across documents have an empty BlockMask: never computed
            assert r["blocks"] < r["unmasked_blocks"], (rank, r["blocks"], r["unmasked_blocks"])
            assert r["zero_blind"], f"rank {rank}: a row that sees no key has a nonzero output or dq"


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"N{w}")
def test_mod_errors_name_the_argument(ring_results, world):
    for rank, res in enumerate(ring_results[world]):
        e = res["errors"]
        assert "TypeError: score_mod must be a callable or None, got int: 3" in e["mod-not-callable"]
        assert "got q of shape (2, 4, 4)" in e["mod-3d"] and "(B, H, L, E)" in e["mod-3d"]
        # flex's own error, unchanged: the op and the mod's line
        assert e["mod-untranslatable"] == e["mod-untranslatable-flex"]
        assert "torch.sinh cannot be generated into Triton" in e["mod-untranslatable"]
        assert "return torch.sinh(score)" in e["mod-untranslatable"]
        assert "disagree on score_mod (structure checksum, 0: none)" in e["mods-disagree"]


def test_hung_peer_is_bounded_by_the_group_timeout(ring_results):
    hung = ring_results[2][0]["hung"]
    assert "Timed out waiting 1500ms" in hung["error"], hung
    assert hung["seconds"] < 10, hung  # 1.5 s and the time to raise, far below the group's own 60 s


# ---------------------------------------------------------------------------------------------
# Two GPUs: NCCL, bf16, against one GPU's attend call


def _nccl_worker(rank: int, init: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    try:
        g = torch.Generator(device="cuda").manual_seed(3)
        B, H, Hkv, S, D = 1, 8, 2, 4096, 128
        Q, K, V = (torch.randn(B, h, S, D, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
        dO = torch.randn(B, H, S, D, device="cuda", generator=g, dtype=torch.bfloat16)
        errs = {}
        for causal in (False, True):
            ins64 = [t.double().requires_grad_() for t in (Q, K, V)]
            ref64 = torch.nn.functional.scaled_dot_product_attention(*ins64, is_causal=causal, enable_gqa=True)
            ref64.backward(dO.double())
            one = [t.clone().requires_grad_() for t in (Q, K, V)]
            o1 = attend.scaled_dot_product_attention(*one, is_causal=causal, enable_gqa=True)
            o1.backward(dO)
            mine = [shard(t, dim=2).requires_grad_() for t in (Q, K, V)]
            out = context_parallel_attention(*mine, is_causal=causal, enable_gqa=True)
            out.backward(shard(dO, dim=2))
            for name, a, b, r in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in mine)),
                                     (o1, *(t.grad for t in one)), (ref64, *(t.grad for t in ins64))):
                r = shard(r.detach(), dim=2)
                errs[(causal, name)] = ((a.detach().double() - r).abs().max().item(),
                                        (shard(b.detach(), dim=2).double() - r).abs().max().item())
        # FlexAttention mods on the flex core: ALiBi and a trained relative bias, causal, against one
        # GPU's attend.flex_attention (both against float64 flex)
        table = (0.1 * torch.randn(H, 2 * S, device="cuda", generator=g)).requires_grad_()
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device="cuda") / H)
        table64 = table.detach().double().requires_grad_()

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx) + table[h, q_idx - kv_idx + S]

        def alibi64(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx) + table64[h, q_idx - kv_idx + S]

        (ref64, *g64), (t64,) = _flex_reference(Q.double(), K.double(), V.double(), dO.double(), S, -1, 0, alibi64,
                                                None, [table64], block=128)
        (o1, *g1), (t1,) = _flex_reference(Q, K, V, dO, S, -1, 0, alibi, None, [table], block=128)
        mine = [shard(t, dim=2).requires_grad_() for t in (Q, K, V)]
        out = context_parallel_attention(*mine, is_causal=True, enable_gqa=True, score_mod=alibi)
        out.backward(shard(dO, dim=2))
        for name, a, b, r in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in mine)), (o1, *g1),
                                 (ref64, *g64)):
            r = shard(r.detach(), dim=2)
            errs[("alibi", name)] = ((a.detach().double() - r).abs().max().item(),
                                     (shard(b.detach(), dim=2).double() - r).abs().max().item())
        errs[("alibi", "table")] = ((table.grad.double() - t64).abs().max().item(),
                                    (t1.double() - t64).abs().max().item())
        torch.save(errs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs two CUDA GPUs and NCCL")
def test_nccl_bf16_matches_one_gpu():
    """bf16 on two GPUs against one GPU, both against float64: the fused op pair (causal and not)
    and FlexAttention mods on the flex core (ALiBi with a trained relative bias, causal)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_nccl_worker, args=(f"tcp://127.0.0.1:{_free_port()}", d), nprocs=2, join=True)
        for rank in range(2):
            for key, (err_ring, err_one) in torch.load(os.path.join(d, f"rank{rank}.pt")).items():
                # the ring's bf16 error within a small multiple of one GPU's (both against float64)
                assert err_ring <= 3 * err_one + FLOOR[torch.bfloat16], (rank, key, err_ring, err_one)


# ---------------------------------------------------------------------------------------------
# Without processes


def test_merge_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=F64)
    k = torch.randn(2, 3, 9, 4, generator=g, dtype=F64)
    v = torch.randn(2, 3, 9, 6, generator=g, dtype=F64)

    def part(a, b):
        s = q @ k[:, :, a:b].transpose(-1, -2)
        lse = torch.logsumexp(s, -1)
        return torch.softmax(s, -1) @ v[:, :, a:b], lse

    out = torch.zeros(2, 3, 5, 6, dtype=F64)
    lse = torch.full((2, 3, 5), float("-inf"), dtype=F64)
    for a, b in ((4, 9), (0, 1), (1, 4)):
        merge_(out, lse, *part(a, b))
    want, want_lse = part(0, 9)
    assert (out - want).abs().max() <= TOL
    assert (lse - want_lse).abs().max() <= TOL


def test_merge_of_empty_rows_is_nothing_and_never_nan():
    out = torch.zeros(1, 1, 3, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    empty_out, empty_lse = torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), float("-inf"))
    merge_(out, lse, empty_out, empty_lse)  # nothing into nothing: still nothing
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    block = torch.randn(1, 1, 3, 2)
    block_lse = torch.tensor([[[0.5, float("-inf"), -2.0]]])
    merge_(out, lse, block, block_lse)
    merge_(out, lse, empty_out, empty_lse)  # nothing into something: unchanged
    assert torch.equal(out[..., [0, 2], :], block[..., [0, 2], :])
    assert torch.equal(out[..., 1, :], torch.zeros(1, 1, 2)) and lse[0, 0, 1] == float("-inf")
    assert torch.equal(lse[..., [0, 2]], block_lse[..., [0, 2]])


MASKS = {  # (left, right, padding, document lengths)
    "full": (-1, -1, 0, None), "causal": (-1, 0, 0, None), "window": (5, 0, 0, None), "two-sided": (2, 3, 0, None),
    "right-only": (-1, 4, 0, None), "causal-padded": (-1, 0, 5, None), "full-padded": (-1, -1, 3, None),
    "window-padded": (3, 0, 6, None), "wide-window": (40, 0, 0, None), "docs-causal": (-1, 0, 0, (3, 1, 9, 0, 2)),
    "docs-full-padded": (-1, -1, 4, (6, 5)), "docs-two-sided": (1, 2, 0, (2, 2, 13)),
}


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
def test_plan_covers_each_visible_pair_once(layout, world, mask):
    """The blocks of every rank's steps, drawn in global positions, are exactly the mask."""
    left, right, pad, docs = MASKS[mask]
    chunk = 4
    S = world * chunk * (2 if layout == "zigzag" else 1)
    n = max(1, S - pad)
    cu = None if docs is None else _cu(docs, n)
    m = Mask(left, right, n, None if cu is None else tuple(cu))
    want = torch.zeros(S, S, dtype=torch.bool)
    want[:n, :n] = _visible(n, left, right, cu)
    got = torch.zeros(S, S, dtype=torch.int64)
    L = S // world
    for rank in range(world):
        q_pos = shard_positions(S, rank=rank, world_size=world, layout=layout)
        for step in plan(rank, world, L, layout, m):
            k_pos = shard_positions(S, rank=step.source, world_size=world, layout=layout)
            for blk in step.blocks:
                assert [int(x) for x in q_pos[blk.q0:blk.q1]] == _positions(blk.q_runs)
                assert [int(x) for x in k_pos[blk.k0:blk.k1]] == _positions(blk.k_runs)
                i = torch.arange(blk.q1 - blk.q0)[:, None]
                j = torch.arange(blk.k1 - blk.k0)[None, :]
                band = torch.ones_like(i * j, dtype=torch.bool)
                if blk.band.right >= 0:
                    band &= j <= i + blk.band.right
                if blk.band.left >= 0:
                    band &= j >= i - blk.band.left
                assert band.any(dim=1).all(), f"{blk}: a row that sees nothing was not trimmed"
                got[q_pos[blk.q0:blk.q1, None], k_pos[None, blk.k0:blk.k1]] += band.long()
    assert torch.equal(got, want.long()), "some visible pair missed or counted twice"


def _positions(runs) -> list[int]:
    return [p for start, length in runs for p in range(start, start + length)]


def test_plan_coalesces_and_keeps_diagonals_causal():
    # Causal zigzag, 2 ranks, rank 0 (chunks 0 and 3): its own step is chunk 0 x 0 (diagonal),
    # 3 x 0 (full) and 3 x 3 (diagonal); from rank 1 (chunks 1, 2) chunk 3 sees both, one call.
    own, other = plan(0, 2, 8, "zigzag", Mask(-1, 0, 16))
    assert [(b.q0, b.q1, b.k0, b.k1, b.band) for b in own.blocks] == [
        (0, 4, 0, 4, Band.causal()), (4, 8, 0, 4, Band()), (4, 8, 4, 8, Band.causal())]
    assert [(b.q0, b.q1, b.k0, b.k1, b.band) for b in other.blocks] == [(4, 8, 0, 8, Band())]
    assert other.blocks[0].k_runs == ((4, 4), (8, 4))
    assert (own.empty_pairs, other.empty_pairs) == (1, 2)


@pytest.mark.parametrize("kernel", ["blocked", "triton"])
def test_steps_of_every_rank_in_one_process_match_attend(kernel):
    """The ring's arithmetic without communication: rank 1 of 2 attends to both shards' blocks
    (kernels and merge as in the ring), including window bands the blocked kernel gets as masks."""
    dtype = F64 if kernel == "blocked" else torch.float32
    if kernel == "triton" and not attend.backends._kernels.interpreter_on() and not torch.cuda.is_available():
        pytest.skip("attend's Triton core runs here only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(5)
    world, S, E = 2, 32, 16
    Q, K, V = (torch.randn(1, 2, S, E, generator=g, dtype=dtype).to(DEVICE) for _ in range(3))
    blocks = FusedBlocks(kernel)
    for left, right in ((-1, 0), (5, 0), (3, 6)):
        ref = _reference(Case("x", window=(left, right)), Q.double().cpu(), K.double().cpu(), V.double().cpu(), S,
                         via_varlen=True)
        for rank in range(world):
            q = shard(Q, dim=2, rank=rank, world_size=world)
            out = torch.zeros(1, 2, S // world, E, dtype=dtype, device=DEVICE)
            lse = torch.full(out.shape[:-1], float("-inf"), dtype=out.dtype, device=DEVICE)
            for step in plan(rank, world, S // world, "zigzag", Mask(left, right, S)):
                k, v = (shard(t, dim=2, rank=step.source, world_size=world) for t in (K, V))
                for blk in step.blocks:
                    o, l = blocks.forward(q[:, :, blk.q0:blk.q1], k[:, :, blk.k0:blk.k1], v[:, :, blk.k0:blk.k1],
                                          blk, E ** -0.5)
                    merge_(out[:, :, blk.q0:blk.q1], lse[:, :, blk.q0:blk.q1], o, l)
            want = shard(ref, dim=2, rank=rank, world_size=world)
            err = (out.double().cpu() - want).abs().max().item()
            tol = TOL if dtype == F64 else 50 * torch.finfo(torch.float32).eps
            assert err <= tol, f"band ({left}, {right}) rank {rank}: {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [(-1, 0), (5, 0), (3, 6)], ids=["causal", "window-gqa", "two-sided"])
def test_one_rank_ring_forward_and_backward(kernel, window, use_kernel):
    """The ring's autograd function with no communication (one rank, zigzag): its blocks are row
    slices of q, out and lse (diagonal, full and band blocks), forward and backward on each kernel,
    against the float64 reference with tolerances scaled by PyTorch's same-precision math SDPA."""
    from attend.distributed.ring import _Config, _RingAttention

    use_kernel(kernel)
    dtype = torch.float32
    left, right = window
    S, E = 48, 16
    hkv = 1 if window == (5, 0) else 2
    q = torch.randn(1, 2, S, E, dtype=dtype, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, hkv, S, E, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
    cfg = _Config(None, plan(0, 1, S, "zigzag", Mask(left, right, S)), FusedBlocks(kernel), E ** -0.5)
    out = _RingAttention.apply(q, k, v, cfg)
    p, r = torch.arange(S, device=DEVICE)[:, None], torch.arange(S, device=DEVICE)[None, :]
    sees = (r <= p + right) & ((r >= p - left) if left >= 0 else True)
    assert_matches_float64(out, q, k, v, what=f"{kernel} {window}", attn_mask=sees, enable_gqa=hkv != 2)


def _ring_in_one_process(Q, K, V, dO, world: int, layout: str, mask: Mask, mods, kernel: str, scale: float):
    """Every rank's ring in one process, without communication: each rank's forward (its blocks,
    merged by LSE), then each rank's backward from its GLOBAL out / lse, dK / dV added to the
    owner's shard. Returns the gathered out, dq, dk, dv, the trained captures' gradients summed
    over ranks, and the number of blocks computed."""
    from attend.distributed import flex as cp_flex

    L = Q.shape[2] // world
    acc = F64 if Q.dtype == F64 else torch.float32
    sh = lambda t, r: shard(t, dim=2, rank=r, world_size=world, layout=layout)  # noqa: E731
    ranks = []
    for rank in range(world):
        plans = cp_flex.block_plans(plan(rank, world, L, layout, mask), (rank, world, L, layout, mask), mods,
                                    Q.shape[0], Q.shape[1], Q.device)
        blocks = cp_flex.FlexBlocks(kernel, mods, plans)
        q = sh(Q, rank)
        out = torch.zeros(*q.shape[:-1], V.shape[-1], dtype=acc, device=Q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=Q.device)
        for step in plans.steps:
            k, v = sh(K, step.source), sh(V, step.source)
            for b in step.blocks:
                o, l = blocks.forward(q[:, :, b.q0:b.q1], k[:, :, b.k0:b.k1], v[:, :, b.k0:b.k1], b, scale)
                merge_(out[:, :, b.q0:b.q1], lse[:, :, b.q0:b.q1], o, l)
        ranks.append((blocks, out.to(Q.dtype), lse))
    dq = [torch.zeros_like(sh(Q, r), dtype=acc) for r in range(world)]
    dk = [torch.zeros_like(sh(K, r), dtype=acc) for r in range(world)]
    dv = [torch.zeros_like(sh(V, r), dtype=acc) for r in range(world)]
    caps, n_blocks = None, 0
    for rank, (blocks, out, lse) in enumerate(ranks):
        blocks.begin_backward()
        q, do = sh(Q, rank), sh(dO, rank)
        for step in blocks.plans.steps:
            k, v = sh(K, step.source), sh(V, step.source)
            for b in step.blocks:
                g = blocks.backward(do[:, :, b.q0:b.q1], q[:, :, b.q0:b.q1], k[:, :, b.k0:b.k1], v[:, :, b.k0:b.k1],
                                    out[:, :, b.q0:b.q1], lse[:, :, b.q0:b.q1], b, scale)
                dq[rank][:, :, b.q0:b.q1] += g[0]
                dk[step.source][:, :, b.k0:b.k1] += g[1]
                dv[step.source][:, :, b.k0:b.k1] += g[2]
                n_blocks += 1
        caps = blocks.capture_grads if caps is None else [a + c for a, c in zip(caps, blocks.capture_grads)]
    whole = lambda parts: unshard(parts, dim=2, layout=layout)  # noqa: E731
    return [whole([r[1] for r in ranks]), whole(dq), whole(dk), whole(dv)], caps, n_blocks


def test_flex_blocks_on_the_flex_core_generate_one_kernel():
    """FlexBlocks on attend's flex core (the path GPUs take; here under the interpreter), two ranks
    simulated in one process, causal zigzag with GQA, a document mask_mod and a trained
    relative-bias table: outputs and gradients against float64 attend.flex_attention, within a
    small multiple of float32 flex_attention's own error. Every block of every step runs the
    same two generated hooks, and a new table (another layer) generates nothing."""
    from attend._flex import codegen
    from attend.distributed import flex as cp_flex

    if not attend.backends._kernels.interpreter_on() and not torch.cuda.is_available():
        pytest.skip("attend's flex core runs here only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(11)
    world, S, E, (hq, hkv) = 2, 32, 16, (2, 1)
    Q, dO = (torch.randn(1, hq, S, E, generator=g).to(DEVICE) for _ in range(2))
    K, V = (torch.randn(1, hkv, S, E, generator=g).to(DEVICE) for _ in range(2))
    table = torch.randn(hq, 2 * S, generator=g).to(DEVICE).requires_grad_()
    doc = torch.tensor([0] * 13 + [1] * 19, dtype=torch.int32, device=DEVICE)

    def relative(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + S]

    def document(b, h, q_idx, kv_idx):  # rows with q_idx % 7 == 3 see no key: out 0, gradients 0 (no NaN)
        return (doc[q_idx] == doc[kv_idx]) & (q_idx % 7 != 3)

    mask = Mask(-1, 0, S)
    mods = cp_flex.trace_mods(relative, document, -1, 0)
    before = codegen.GENERATIONS["count"]
    got, got_caps, n_blocks = _ring_in_one_process(Q, K, V, dO, world, "zigzag", mask, mods, "triton", E ** -0.5)
    assert n_blocks >= 4 and codegen.GENERATIONS["count"] - before <= 2, "a block or step generated its own hooks"

    f64 = [t.double() for t in (Q, K, V, dO)]
    table64 = table.detach().double().requires_grad_()

    def relative64(score, b, h, q_idx, kv_idx):
        return score + table64[h, q_idx - kv_idx + S]

    want, want_caps = _flex_reference(*f64, S, -1, 0, relative64, document, [table64])
    same, same_caps = _flex_reference(Q, K, V, dO, S, -1, 0, relative, document, [table])
    for name, a, b, r in zip(("out", "dq", "dk", "dv", "table"), got + got_caps, same + same_caps, want + want_caps):
        err, err_ref = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        assert torch.isfinite(a).all() and err <= 4 * err_ref + FLOOR[torch.float32], (name, err, err_ref)

    table2 = torch.randn(hq, 2 * S, generator=g).to(DEVICE)  # another layer: new values, same structure
    mods2 = cp_flex.trace_mods(lambda score, b, h, q_idx, kv_idx: score + table2[h, q_idx - kv_idx + S], document,
                               -1, 0)
    count = codegen.GENERATIONS["count"]
    codegen.hooks(mods2.score_global), codegen.hooks(mods2.mask_global)
    assert mods2.score_global.key == mods.score_global.key and codegen.GENERATIONS["count"] == count


def test_block_plans_are_cached_until_the_mask_changes():
    from attend.distributed import flex as cp_flex

    doc = torch.tensor([0] * 8 + [1] * 8, dtype=torch.int32)

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    mask = Mask(-1, 0, 16)
    steps = plan(0, 2, 8, "zigzag", mask)
    first = cp_flex.block_plans(steps, (0, 2, 8, "zigzag", mask), cp_flex.trace_mods(None, document, -1, 0), 1, 2,
                                "cpu")
    again = cp_flex.block_plans(steps, (0, 2, 8, "zigzag", mask), cp_flex.trace_mods(None, document, -1, 0), 1, 2,
                                "cpu")
    assert again is first
    # rank 0 holds chunks 0 and 3 (documents 0 and 1): chunk 3 x chunks 0 and 1 crosses documents
    assert sum(len(s.blocks) for s in first.steps) < sum(len(s.blocks) for s in steps)
    doc[:] = 0  # changed in place: one document, nothing crosses
    changed = cp_flex.block_plans(steps, (0, 2, 8, "zigzag", mask), cp_flex.trace_mods(None, document, -1, 0), 1, 2,
                                  "cpu")
    assert changed is not first and sum(len(s.blocks) for s in changed.steps) == sum(len(s.blocks) for s in steps)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    x = torch.randn(2, 3, 2 * world * 3, 5)
    shards = [shard(x, dim=2, rank=r, world_size=world, layout=layout) for r in range(world)]
    assert torch.equal(unshard(shards, dim=2, layout=layout), x)
    for r, s in enumerate(shards):
        assert torch.equal(s, x[:, :, shard_positions(x.shape[2], rank=r, world_size=world, layout=layout)])
    assert torch.equal(unshard(shards, dim=-2, layout=layout, seq_len=x.shape[2] - 2), x[:, :, :-2])


def test_zigzag_shard_holds_chunks_r_and_2n_minus_1_minus_r():
    x = torch.arange(8)
    assert shard(x, dim=0, rank=0, world_size=2).tolist() == [0, 1, 6, 7]
    assert shard(x, dim=0, rank=1, world_size=2).tolist() == [2, 3, 4, 5]
    assert shard(x, dim=0, rank=1, world_size=2, layout="contiguous").tolist() == [4, 5, 6, 7]


def test_pad_for_sharding_reaches_the_layout_multiple():
    x = torch.randn(1, 2, 13, 4)
    padded = pad_for_sharding(x, dim=2, world_size=3)
    assert padded.shape[2] == padded_length(13, 3) == 18
    assert torch.equal(padded[:, :, :13], x) and not padded[:, :, 13:].any()
    assert pad_for_sharding(x, dim=2, world_size=13, layout="contiguous") is x


def test_shard_gradient_flows_back():
    x = torch.randn(8, 3, requires_grad=True)
    shard(x, dim=0, rank=1, world_size=2).sum().backward()
    assert x.grad[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


def test_layout_function_errors_name_the_argument():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match=r"layout must be one of 'zigzag', 'contiguous'; got 'zz'"):
        shard(x, dim=0, rank=0, world_size=2, layout="zz")
    with pytest.raises(ValueError, match=r"x has 10 tokens on dim 0; layout='zigzag' over 2 ranks needs a multiple "
                                         r"of 4\. Pad it first"):
        shard(x, dim=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\).*rank=2, world_size=2"):
        shard(x, dim=0, rank=2, world_size=2, layout="contiguous")
    with pytest.raises(ValueError, match=r"pass rank and world_size together \(got rank=0, world_size=None\)"):
        shard(x, dim=0, rank=0)
    with pytest.raises(ValueError, match=r"dim must be an int in \[-2, 2\) for a 2-D tensor; got 2"):
        shard(x, dim=2, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"every shard must have the same shape"):
        unshard([torch.zeros(4), torch.zeros(6)], dim=0)


def test_without_a_process_group_the_error_says_how_to_start_one():
    assert not dist.is_initialized()
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"context_parallel_attention: no process group is initialized; call "
                                           r"torch\.distributed\.init_process_group\(\) first"):
        context_parallel_attention(x, x, x)
    with pytest.raises(RuntimeError, match=r"shard: no process group is initialized"):
        shard(x, dim=2)


def test_benchmark_script_parses_and_plans_on_the_cpu(capsys):
    """benchmarks/context_parallel.py needs two GPUs to measure; its arguments and plan need none."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "context_parallel.py")
    spec = importlib.util.spec_from_file_location("context_parallel_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--seqs", "131072", "--kv-heads", "4", "--impls", "attend-ring", "one-gpu"])
    assert (args.heads, args.kv_heads, args.dim, args.dtype, args.causal) == (16, 4, 128, "bfloat16", True)
    assert bench.flops(args, 131072, False) == 4 * 16 * 131072 ** 2 * 128 / 2
    bench.main(["--dry-run", "--seqs", "131072"])
    assert "S=131072: forward 70.4 TFLOP, forward+backward 246.3 TFLOP" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--heads", "16", "--kv-heads", "3"])

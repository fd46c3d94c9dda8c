"""varlen_attn's score_mod (attend._flex.varlen) against a per-sequence float64 loop: the core's
score hooks for inference calls, flex_attention per sequence for calls that need gradients, packed
and paged keys, and the mod's indices (b the sequence, q_idx / kv_idx positions in it)."""

from __future__ import annotations

import pytest
import torch

from attend._flex import varlen as flex_varlen
from attend.varlen import AuxRequest, varlen_attn
from conftest import DEVICE, FLOOR, KERNEL_DTYPES, KERNELS, assert_scaled_close

# (id, query lengths, key lengths, Hq, Hkv, D)
SHAPES = [
    ("mixed", [3, 1, 17, 0, 9], [5, 30, 17, 4, 9], 4, 2, 16),
    ("decode", [1, 1, 1], [40, 7, 19], 4, 1, 32),
    ("L>S", [9, 6, 4], [5, 0, 4], 2, 2, 16),  # rows before the first key (causal) and a sequence with none
] + ([("uniform-d128", [64, 64, 64], [100, 37, 0], 4, 2, 128)] if DEVICE == "cuda" else [])  # the Gluon forward's
WINDOWS = [(-1, -1), (-1, 0), (3, 0), (2, 1)]
CAP = 5.0


def _mods(n_seq: int, S_max: int, H: int):
    """A softcap, ALiBi by head (a captured slope per head) and a bias per sequence and key
    position (a captured table): each index the mod reads matters. Returns (score_mod, the same as
    a function of float64 tensors for the loop)."""
    slopes = torch.rand(H, device=DEVICE)
    table = torch.randn(n_seq, S_max, device=DEVICE)

    def score_mod(score, b, h, q_idx, kv_idx):
        return CAP * torch.tanh(score / CAP) - slopes[h] * (q_idx - kv_idx).abs() + table[b, kv_idx]

    def reference(s, b, L, S):  # s (H, L, S) float64
        i = torch.arange(L, device=DEVICE)[:, None]
        j = torch.arange(S, device=DEVICE)[None, :]
        return (CAP * torch.tanh(s / CAP) - slopes.to(s.dtype)[:, None, None] * (i - j).abs()
                + table.to(s.dtype)[b, :S][None, None, :])

    return score_mod, reference


def _loop(q, k, v, lq, lk, window, dtype, reference):
    """Per-sequence attention with the mod, in ``dtype``: (out (T, H, D), lse (H, T))."""
    G = q.shape[1] // k.shape[1]
    cq, ck = [0] + torch.tensor(lq).cumsum(0).tolist(), [0] + torch.tensor(lk).cumsum(0).tolist()
    outs, lses = [], []
    for b in range(len(lq)):
        L, S = lq[b], lk[b]
        qb = q[cq[b]:cq[b + 1]].to(dtype).transpose(0, 1)
        kb = k[ck[b]:ck[b + 1]].to(dtype).transpose(0, 1).repeat_interleave(G, 0)
        vb = v[ck[b]:ck[b + 1]].to(dtype).transpose(0, 1).repeat_interleave(G, 0)
        s = reference((qb @ kb.transpose(-1, -2)) * q.shape[-1] ** -0.5, b, L, S)
        i = torch.arange(L, device=DEVICE)[:, None] + (S - L)
        j = torch.arange(S, device=DEVICE)[None, :]
        keep = torch.ones(L, S, dtype=torch.bool, device=DEVICE)
        if window[1] >= 0:
            keep &= j <= i + window[1]
        if window[0] >= 0:
            keep &= j >= i - window[0]
        s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        outs.append((p @ vb).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def _cu(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    return cu


# (kernel, grad, window): the core's hooks (the Triton kernels, inference) on every window; flex per
# sequence (the blocked kernel, or a gradient) on two, a causal one and one with keys on both sides
# of the diagonal
CASES = ([(k, False, w) for k in KERNELS if k == "triton" for w in WINDOWS]
         + [(k, g, w) for k, g in (("blocked", False), ("triton", True)) if k in KERNELS for w in ((-1, 0), (2, 1))])


@pytest.mark.parametrize("kernel,grad,window", CASES, ids=lambda c: str(c) if isinstance(c, tuple) else
                         {True: "grad", False: "inference"}.get(c, c))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_score_mod_matches_per_sequence_loop(grad, kernel, window, shape, use_kernel):
    """Inference calls on the Triton kernels run the core's score hooks in one launch; the rest
    (gradients, the blocked CPU path) flex_attention per sequence. Both match the float64 loop,
    with rows that see no key at 0 and lse -inf; the gradients too."""
    use_kernel(kernel)
    _, lq, lk, hq, hkv, D = shape
    score_mod, reference = _mods(len(lq), max(lk), hq)
    for dtype in KERNEL_DTYPES[kernel]:
        if dtype == torch.float64:
            continue
        q, k, v = (torch.randn(sum(n), h, D, dtype=dtype, device=DEVICE).requires_grad_(grad)
                   for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
        before = dict(flex_varlen.PATHS)
        out, lse = varlen_attn(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), window_size=window,
                               enable_gqa=hq != hkv, return_aux=AuxRequest(lse=True), score_mod=score_mod)
        path = "fused" if kernel == "triton" and not grad else "per_sequence"
        assert flex_varlen.PATHS[path] == before[path] + 1
        ref, ref_lse = _loop(q.detach(), k.detach(), v.detach(), lq, lk, window, torch.float64, reference)
        same, _ = _loop(q.detach(), k.detach(), v.detach(), lq, lk, window, dtype, reference)
        assert_scaled_close(out, ref, same, what=f"{dtype} out")
        empty = ref_lse == float("-inf")
        assert torch.equal(lse == float("-inf"), empty), "rows with no visible key must have lse -inf"
        assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= 2e-3
        if grad:  # against the float64 loop's, scaled by the same-dtype loop's error (as tests/test_varlen.py)
            g = torch.randn_like(out)
            got = torch.autograd.grad((out * g).sum(), (q, k, v))
            refs, sames = ([t.detach().to(dt).requires_grad_() for t in (q, k, v)] for dt in (torch.float64, dtype))
            want = torch.autograd.grad((_loop(*refs, lq, lk, window, torch.float64, reference)[0] * g.double()).sum(),
                                       refs)
            same = torch.autograd.grad((_loop(*sames, lq, lk, window, dtype, reference)[0] * g).sum(), sames)
            full = dtype == torch.float32  # dP - Delta cancels: its floor is of size |dO| |V| (test_varlen.py)
            scales = dict(q=(g.abs().max() * v.abs().max()).item(), k=(g.abs().max() * v.abs().max()).item(),
                          v=g.abs().max().item()) if full else {}
            for name, a, r, sm in zip("qkv", got, want, same):
                assert_scaled_close(a, r, sm, k=6.0, what=f"{dtype} d{name}", floor_scale=scales.get(name, 1.0))


@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_keys_with_a_score_mod_match_packed_ones(kernel, use_kernel):
    """A paged pool (block_table, seqused_k) gives what the same keys packed give, the mod reading
    each key's position in its sequence, not its slot in the pool (the core's hooks on the Triton
    kernels, flex per sequence on the blocked path)."""
    use_kernel(kernel)
    lq, lk, page = [3, 1, 17], [45, 16, 70], 16
    score_mod, _ = _mods(len(lq), max(lk), 4)
    dtype = torch.float16 if kernel == "triton" else torch.float32
    q = torch.randn(sum(lq), 4, 16, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(sum(lk), 2, 16, dtype=dtype, device=DEVICE) for _ in range(2))
    packed = varlen_attn(q, k, v, _cu(lq), _cu(lk), 17, 70, window_size=(20, 0), enable_gqa=True,
                         score_mod=score_mod)
    pages = [-(-n // page) for n in lk]
    order = torch.randperm(sum(pages), device=DEVICE)  # pages in a shuffled pool
    kp = torch.zeros(sum(pages), page, 2, 16, dtype=dtype, device=DEVICE)
    vp = torch.zeros_like(kp)
    table = torch.zeros(len(lk), max(pages), dtype=torch.int32, device=DEVICE)
    start = slot = 0
    for b, n in enumerate(lk):
        for p in range(pages[b]):
            pid, cnt = int(order[slot]), min(page, n - p * page)
            table[b, p] = pid
            kp[pid, :cnt], vp[pid, :cnt] = k[start + p * page:start + p * page + cnt], v[start + p * page:start + p * page + cnt]
            slot += 1
        start += n
    used = torch.tensor(lk, dtype=torch.int32, device=DEVICE)
    paged = varlen_attn(q, kp, vp, _cu(lq), None, 17, 70, window_size=(20, 0), enable_gqa=True, block_table=table,
                        seqused_k=used, score_mod=score_mod)
    assert (paged.double() - packed.double()).abs().max().item() <= 2 * FLOOR[dtype]


def test_identity_score_mod_runs_as_without_one():
    q, k, v = (torch.randn(12, 2, 16, device=DEVICE) for _ in range(3))
    cu = _cu([5, 7])
    before = dict(flex_varlen.PATHS)
    got = varlen_attn(q, k, v, cu, cu, 7, 7, score_mod=lambda score, b, h, q_idx, kv_idx: score)
    assert flex_varlen.PATHS == before
    assert torch.equal(got, varlen_attn(q, k, v, cu, cu, 7, 7))


def test_inference_only_arguments_and_forward_mode_ad_are_refused():
    import torch.autograd.forward_ad as forward_ad

    q, k, v = (torch.randn(12, 2, 16, device=DEVICE) for _ in range(3))
    cu = _cu([5, 7])
    mod = lambda score, b, h, q_idx, kv_idx: 0.5 * score  # noqa: E731
    with pytest.raises(RuntimeError, match="block_table and seqused_k are inference only"):
        varlen_attn(q.requires_grad_(), k, v, cu, cu, 7, 7, seqused_k=torch.tensor([5, 7], dtype=torch.int32,
                                                                                     device=DEVICE), score_mod=mod)
    slopes = torch.rand(2, device=DEVICE, requires_grad=True)  # a capture that records gradients
    with pytest.raises(RuntimeError, match="block_table and seqused_k are inference only.*one the score_mod captures"):
        varlen_attn(q.detach(), k, v, cu, cu, 7, 7, seqused_k=torch.tensor([5, 7], dtype=torch.int32, device=DEVICE),
                    score_mod=lambda score, b, h, q_idx, kv_idx: score + slopes[h] * kv_idx)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(q.detach(), torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            varlen_attn(dual, k, v, cu, cu, 7, 7, score_mod=mod)


def test_sequences_without_keys_give_zeros_in_the_graph():
    """Every sequence without keys: zeros, and a backward that gives zero gradients (the output stays
    in the inputs' graph, as the call without a score_mod keeps it)."""
    q = torch.randn(4, 2, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(0, 2, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    out = varlen_attn(q, k, v, _cu([4]), _cu([0]), 4, 0, score_mod=lambda score, b, h, q_idx, kv_idx: 0.5 * score)
    assert out.shape == (4, 2, 16) and torch.equal(out, torch.zeros_like(out)) and out.requires_grad
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_score_mod_argument_errors():
    q, k, v = (torch.randn(12, 2, 16, device=DEVICE) for _ in range(3))
    cu = _cu([5, 7])
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        varlen_attn(q, k, v, cu, cu, 7, 7, score_mod=3.0)
    elsewhere = torch.randn(2, device="meta")
    with pytest.raises(ValueError, match="score_mod captures a tensor of shape \\(2,\\) on meta"):
        varlen_attn(q, k, v, cu, cu, 7, 7, score_mod=lambda score, b, h, q_idx, kv_idx: score + elsewhere[h])

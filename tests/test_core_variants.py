"""The Triton core's backward strategies agree: dQ by separate programs (deterministic) and dQ by
atomics from the dK/dV programs (a tuning choice), and deterministic mode never takes atomics."""

from __future__ import annotations

import pytest
import torch

import attend
from attend.kernels import configs, launch
from attend.varlen import varlen_attn
from conftest import DEVICE, KERNEL_DTYPES, assert_matches_float64, rand

DTYPES = [d for d in KERNEL_DTYPES["triton"] if d != torch.float32] or [torch.float16]


@pytest.fixture
def dq_atomic(monkeypatch):
    def choose(flag: bool) -> None:
        monkeypatch.setattr(launch, "FORCE_DQ_ATOMIC", flag)
    return choose


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_dq_strategies_match_float64(atomic, causal, dq_atomic):
    dq_atomic(atomic)
    for dtype in DTYPES:
        q = rand(2, 4, 45, 32, dtype=dtype, requires_grad=True)
        k = rand(2, 2, 70, 32, dtype=dtype, requires_grad=True)
        v = rand(2, 2, 70, 32, dtype=dtype, requires_grad=True)
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert_matches_float64(out, q, k, v, what=f"{dtype} atomic={atomic}", is_causal=causal, enable_gqa=True)


def test_varlen_window_with_atomic_dq(dq_atomic):
    dq_atomic(True)
    lens = [33, 7, 50]
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    cu[1:] = torch.tensor(lens, device=DEVICE).cumsum(0)
    dtype = DTYPES[0]
    q, k, v = (rand(90, 2, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = varlen_attn(q, k, v, cu, cu, 50, 50, window_size=(9, 0))
    got = torch.autograd.grad(out.sum(), (q, k, v))
    dq_atomic(False)
    out2 = varlen_attn(q, k, v, cu, cu, 50, 50, window_size=(9, 0))
    want = torch.autograd.grad(out2.sum(), (q, k, v))
    assert torch.equal(out, out2)
    for name, a, b in zip("qkv", got, want):
        assert (a.float() - b.float()).abs().max().item() < 2e-2, f"d{name}"


def test_deterministic_mode_never_uses_atomics(dq_atomic):
    dq_atomic(True)
    q, k, v = (rand(1, 2, 40, 16, dtype=DTYPES[0], requires_grad=True) for _ in range(3))
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
                out = attend.scaled_dot_product_attention(q, k, v)
            grads.append(torch.autograd.grad(out.sum(), (q,))[0])
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])
    kept = configs.pruner("bwd")(configs.BWD_CONFIGS, {}, BLOCK_D=64, DETERMINISTIC=True)
    assert kept and not any(c.kwargs["DQ_ATOMIC"] for c in kept)
    assert any(c.kwargs["DQ_ATOMIC"] for c in configs.pruner("bwd")(configs.BWD_CONFIGS, {}, BLOCK_D=64))

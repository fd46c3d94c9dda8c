"""The ops layer: eager calls run the kernels through a plain autograd.Function (no custom-op
dispatch on the host path), traced calls through the ``attend::fused_*`` custom ops, and the ops
pass PyTorch's own registration checks."""

from __future__ import annotations

import pytest
import torch

import attend
from attend._layout import Band
from attend.ops import attention as ops
from conftest import DEVICE, KERNELS, assert_matches_float64, rand


@pytest.mark.parametrize("kernel", KERNELS)
def test_eager_path_skips_the_dispatcher_and_matches_float64(kernel, use_kernel):
    use_kernel(kernel)
    dt = torch.float16 if kernel == "triton" else torch.float32
    q, k, v = (rand(2, 2, 40, 16, dtype=dt, requires_grad=True) for _ in range(3))
    with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
        out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
    names, fn = [], out.grad_fn
    while fn is not None and len(names) < 4:  # past the views that restore the caller's shape
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert any("EagerFused" in n for n in names), names
    assert_matches_float64(out, q, k, v, what=kernel, is_causal=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_inference_calls_skip_autograd_and_match_grad_mode(kernel, use_kernel, monkeypatch):
    """No grad mode, or no input that requires grad: the eager path calls the op's function
    without the autograd.Function (host time only), with the same output as a recorded call."""
    use_kernel(kernel)
    dt = torch.float16 if kernel == "triton" else torch.float32
    q, k, v = (rand(2, 2, 40, 16, dtype=dt, requires_grad=True) for _ in range(3))
    with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
        recorded = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
        applied = []
        monkeypatch.setattr(ops._EagerFused, "apply", lambda *a: applied.append(a))
        with torch.no_grad():
            no_grad = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
        plain = attend.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert not applied
    assert no_grad.grad_fn is None and plain.grad_fn is None
    assert torch.equal(no_grad, recorded.detach()) and torch.equal(plain, recorded.detach())


def test_traced_calls_use_the_custom_op():
    q, k, v = (rand(1, 2, 24, 16) for _ in range(3))
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    def f(q, k, v):  # the CPU default priority puts FLASH first
        return attend.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    torch.compile(f, backend=backend, fullgraph=True)(q, k, v)
    assert any("attend.fused_fwd" in t for t in targets), targets


def test_fused_ops_pass_opcheck():
    q, k, v = (rand(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    causal = Band.causal().to_op()
    torch.library.opcheck(ops.fused_fwd, (q, k, v, None, 0.0, causal, 0.25, None, "blocked"))
    out, lse = ops.fused_fwd(q, k, v, None, 0.0, causal, 0.25, None, "blocked")
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.fused_bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                                          None, 0.0, causal, 0.25, None, "blocked", False))


def test_band_encoding_round_trips():
    """The ops carry a Band as ints (Band.to_op); from_op gives the same Band back."""
    for band in (Band(), Band.causal(), Band.causal(bottom_right=True), Band(5, 0, True), Band(3, 7, False)):
        assert Band.from_op(band.to_op()) == band


def test_one_kernel_registry_for_dense_and_packed_ops():
    """Both op pairs look their launchers up in ops.registry; an unknown kernel is a ValueError
    naming the known ones, from either."""
    from attend.ops import KERNELS, Kernel, launchers
    from attend.ops import varlen as vops

    assert launchers("blocked") is KERNELS[Kernel.BLOCKED] and "blocked" in KERNELS
    q = rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="unknown attend kernel 'nope'; known: .*blocked"):
        ops._fused_fwd(q, q, q, None, 0.0, Band().to_op(), 0.25, None, "nope")
    lens = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    qp = rand(8, 2, 16)
    with pytest.raises(ValueError, match="unknown attend kernel 'nope'; known: .*blocked"):
        vops._varlen_fwd(qp, qp, qp, lens, lens, None, None, 8, 8, 0.25, Band.causal(True).to_op(), "nope")


def test_varlen_ops_pass_opcheck():
    from attend.ops import varlen as vops

    lens = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    q, k, v = (rand(20, 2, 16, requires_grad=True) for _ in range(3))
    causal = Band.causal(bottom_right=True).to_op()
    torch.library.opcheck(vops.varlen_fwd, (q, k, v, lens, lens, None, None, 13, 13, 0.25, causal, "blocked"))

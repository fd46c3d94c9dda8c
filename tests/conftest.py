"""Shared test helpers: the oracle (PyTorch's own SDPA under its MATH backend, float64 for
references) and tolerances scaled by the same oracle in the inputs' precision."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

# Without a GPU, attend's Triton kernels run on CPU tensors under Triton's interpreter; that
# must be set before triton is imported. Tests use the fixed configs, not the autotuner.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTEND_AUTOTUNE", "0")

import attend  # noqa: E402
import attend.backends._kernels as _kernels  # noqa: E402

# The suite must test this checkout: setup.sh's editable install is shared by every clone on the
# machine, so without pyproject's pythonpath a run could import another (possibly mid-edit) tree.
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
assert os.path.abspath(attend.__file__).startswith(_SRC + os.sep), f"attend from {attend.__file__}, not {_SRC}"
# and so do the Python processes tests start (the CLI, the build check's workers, the benches)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH", "")) if p)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_gluon_build_turned_off():
    """A Gluon kernel that raises while it builds or launches is turned off for the rest of the
    process, and the core serves its calls (``versions.run_experimental``): the test that hit it
    still passes, and every later test of the process silently runs the core instead. Fail the test
    where it happened, with the error, and give the later tests the kernel back. (Tests that make a
    build fail on purpose patch ``versions._failed`` with a dict of their own.)"""
    from attend.kernels import versions

    failed = versions._failed
    before = dict(failed)
    yield
    new = {name: why for name, why in failed.items() if name not in before}
    if new:
        failed.clear()
        failed.update(before)
        pytest.fail(f"a Gluon kernel was turned off for the process: {new}")


def pytest_runtest_logstart(nodeid, location):
    """With ATTEND_TEST_REPORT_NOW naming a file (benchmarks/gpu_tests.sh), the test starting now is
    written there: a shard that its time limit kills never reaches pytest's summary, and this names
    the test it was in."""
    path = os.environ.get("ATTEND_TEST_REPORT_NOW")
    if path:
        with open(path, "w") as f:
            f.write(nodeid + "\n")


def pytest_runtest_logreport(report):
    """With ATTEND_TEST_REPORT_NOW set, each failure is also printed as it happens, for the same
    reason: a killed shard's failures would otherwise go unnamed."""
    if report.failed and os.environ.get("ATTEND_TEST_REPORT_NOW"):
        print(f"\nFAILED NOW {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}", flush=True)


@pytest.fixture(autouse=True)
def _fresh_dispatch_caches():
    """Each test starts with the dispatcher's decision and prepared-call tables empty, so a test
    that patches a check or a kernel never meets an earlier test's cached choice."""
    from attend import _dispatch

    _dispatch._decisions.clear()
    _dispatch._prepared.clear()
    yield
# Kernels behind FLASH/EFFICIENT that the suite can reach here: the blocked torch-ops path
# (CPU only) and the Triton core (GPU, or CPU under the interpreter).
KERNELS = ["blocked", "triton"] if DEVICE == "cpu" else ["triton"]
# Dtypes each kernel runs here (the interpreter's bf16 dot is wrong; the core has no fp64).
KERNEL_DTYPES = {
    "blocked": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    "triton": [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []),
}


@pytest.fixture
def use_kernel(monkeypatch):
    """Route CPU FLASH/EFFICIENT calls to one kernel: 'blocked' turns the interpreter route off;
    'triton' and None (MATH tests) keep the default route."""

    def choose(kernel: str | None) -> None:
        if kernel == "blocked":
            monkeypatch.setattr(_kernels, "interpreter_on", lambda: False)
    return choose
from torch.nn.attention import SDPBackend as TorchBackend  # noqa: E402
from torch.nn.attention import sdpa_kernel as torch_sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import CausalBias as TorchCausalBias  # noqa: E402

# Absolute error floor per dtype, for outputs where both errors are ~0.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def plain_mask(mask, L, S, device):
    """attend's or PyTorch's CausalBias as the (L, S) bool mask it stands for, by its definition
    (query i sees key j iff j <= i, or j <= i + S - L bottom-right), so the oracle never routes
    back into attend through CausalBias.__torch_function__; any other mask unchanged."""
    if isinstance(mask, (attend.bias.CausalBias, TorchCausalBias)):
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        return j <= i + (0 if int(mask.variant) == 1 else S - L)
    return mask


def _rows_without_keys(mask, is_causal, L, S, device):
    """Where a query row sees no key (bool, broadcastable to the output's (..., L, 1)), or None."""
    if mask is None or is_causal or L == 0 or S == 0:  # is_causal: row i sees key 0; L or S = 0: zeros already
        return None
    sees = mask if mask.dtype == torch.bool else mask > float("-inf")
    return ~sees.any(dim=-1, keepdim=True)


def torch_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The oracle: PyTorch's own ``scaled_dot_product_attention`` under its MATH backend, in the
    inputs' dtype. attend promises that a row which sees no key is 0 with 0 gradients; PyTorch's
    math does the same (its safe softmax, since 2.5), and this sets those rows to 0 explicitly so
    the oracle states the contract instead of relying on that."""
    L, S = q.shape[-2], k.shape[-2]
    mask = plain_mask(attn_mask, L, S, q.device)
    with torch_sdpa_kernel(TorchBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    empty = None if v.numel() == 0 else _rows_without_keys(mask, is_causal, L, S, q.device)
    return out if empty is None else out.masked_fill(empty, 0.0)


def reference(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dtype=torch.float64):
    """PyTorch's math SDPA in ``dtype`` (float64 = the oracle) on copies of the inputs; returns
    ``(out, inputs)`` with ``inputs.query`` / ``.key`` / ``.value`` / ``.attn_mask`` the copies
    (leaves that require grad where the originals do), for gradients against the oracle."""
    cast = lambda t: t.detach().to(dtype).requires_grad_(t.requires_grad)  # noqa: E731
    m = attn_mask
    if isinstance(m, torch.Tensor) and not isinstance(m, TorchCausalBias) and m.is_floating_point():
        m = cast(m)
    p = SimpleNamespace(query=cast(q), key=cast(k), value=cast(v), attn_mask=m)
    return torch_sdpa(p.query, p.key, p.value, m, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa), p


def same_precision(q, k, v, **kw):
    """The error yardstick: PyTorch's own math SDPA in the inputs' dtype."""
    return torch_sdpa(q, k, v, **kw)


def assert_scaled_close(out, ref64, ref_same, k=4.0, what="output", floor_scale=1.0):
    """err(out) <= k * err(same-precision reference) + floor, both against float64. The floor is
    FLOOR[dtype] times ``floor_scale``: the size of terms that cancel in the exact result, where the
    same-precision reference may cancel them exactly and a kernel that sums in another order
    leaves their rounding (a gradient through a one-key softmax, whose true value is 0)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_same.double() - ref64).abs().max().item() if ref_same.numel() else 0.0
    floor = FLOOR[out.dtype] * max(1.0, float(floor_scale))
    tol = k * base + floor
    assert err <= tol, f"{what}: max error {err:.3e} > {k} * {base:.3e} + {floor:.1e}"


def assert_matches_float64(out, q, k, v, what: str = "", k_grad: float = 6.0, **kw) -> None:
    """``out = SDPA(q, k, v, **kw)`` and its input gradients against the float64 reference, with
    tolerances scaled by PyTorch's same-precision math SDPA."""
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref, p = reference(q, k, v, **kw)
    refs = torch.autograd.grad((ref * g.double()).sum(), (p.query, p.key, p.value))
    same = same_precision(q, k, v, **kw)
    sames = torch.autograd.grad((same * g).sum(), (q, k, v))
    assert_scaled_close(out, ref, same, what=f"{what} out")
    for name, a, r, s in zip("qkv", grads, refs, sames):
        assert_scaled_close(a, r, s, k=k_grad, what=f"{what} d{name}")


def rand(*shape, dtype=torch.float32, requires_grad=False, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def growing_layouts(B_, Hk, S_max, D, device="cpu", dtype=torch.float32):
    """Each way a decode loop's K / V of length S arrive, as a function S -> (k, v): a cache grown
    by ``torch.cat`` (contiguous, its strides grow with S), a static cache's slice (fixed strides),
    (B, S, H, D) rows viewed as (B, H, S, D), and K / V packed in one (B, S, 2, H, D) tensor."""
    def new(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    static, rows, packed = new(2, B_, Hk, S_max, D), new(2, B_, S_max, Hk, D), new(B_, S_max, 2, Hk, D)
    return {
        "grown by cat": lambda S: (static[0, :, :, :S].contiguous(), static[1, :, :, :S].contiguous()),
        "static cache slice": lambda S: (static[0, :, :, :S], static[1, :, :, :S]),
        "(B, S, H, D) rows": lambda S: (rows[0, :, :S].transpose(1, 2), rows[1, :, :S].transpose(1, 2)),
        "packed K / V": lambda S: (packed[:, :S, 0].transpose(1, 2), packed[:, :S, 1].transpose(1, 2)),
    }

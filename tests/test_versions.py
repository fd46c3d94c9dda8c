"""The supported torch / Triton range, the Gluon API shims, and the fallback that keeps a call
correct when an experimental Gluon kernel fails to build on the installed Triton."""

import pathlib
import re
import warnings

import pytest
import torch
import triton

import attend
from attend import _versions
from attend.kernels import launch, versions
from attend.kernels.options import kernel_options

from conftest import DEVICE, assert_matches_float64, assert_scaled_close, rand, reference, same_precision

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_bounds_are_the_supported_range():
    """pyproject.toml's bounds and _versions.SUPPORTED (what `attend info` checks) say the same."""
    deps = re.search(r"dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    for name, (lo, hi) in _versions.SUPPORTED.items():
        assert f'"{name}>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"' in deps, (name, deps)


@pytest.mark.parametrize("torch_v, triton_v, outside", [
    ("2.11.0+cu130", "3.6.0", []),
    ("2.15.1", "3.9.0", []),
    ("2.10.0", "3.10.0", ["torch", "triton"]),
    ("2.16.0.dev20261201", "3.5.1", ["torch", "triton"]),
], ids=["oldest", "newest", "both-above-below", "dev-build"])
def test_out_of_range_names_each_package(monkeypatch, torch_v, triton_v, outside):
    monkeypatch.setattr(_versions, "installed", lambda: {"torch": torch_v, "triton": triton_v})
    found = _versions.out_of_range()
    assert [s.split()[0] for s in found] == outside
    for s in found:
        assert "outside the supported" in s


def test_gluon_kernels_use_only_the_shimmed_tma_names():
    """Triton 3.9 removed tma.async_copy_global_to_shared / async_copy_shared_to_global: the Gluon
    kernels must call the names versions.py binds for the installed Triton."""
    for name in ("ws.py", "ws_bwd.py", "ws_common.py"):
        src = (ROOT / "src" / "attend" / "kernels" / name).read_text()
        assert "async_copy_" not in src, name
        assert "triton.experimental" not in src, f"{name} imports Gluon around versions.py"
    if versions.GLUON_ERROR is None:
        tma = versions.tma
        assert versions.tma_load is getattr(tma, "async_load", getattr(tma, "async_copy_global_to_shared", None))
        assert versions.tma_store is getattr(tma, "async_store", getattr(tma, "async_copy_shared_to_global", None))
        # Triton 3.9's own TMA reduce-add where it has one; 3.6's builder op otherwise (the build check
        # compiles both to cp.reduce.async.bulk.tensor ... .add)
        assert (versions.tma_atomic_add is getattr(tma, "async_atomic_add", None)) == hasattr(tma, "async_atomic_add")
        assert "async_atomic_add" not in (ROOT / "src" / "attend" / "kernels" / "ws_common.py").read_text()


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9, reason="TMA: sm_90")
def test_tma_reduce_add_accumulates_a_tile():
    """versions.tma_atomic_add (ws_common.tma_add_tile) adds an fp32 [64, 128] tile into the first
    box of a larger tensor, twice, and leaves the rest untouched."""
    from attend.kernels import ws_common

    torch.manual_seed(0)
    src = torch.randn(64, 128, device="cuda")
    dst = torch.randn(128, 256, device="cuda")
    want = dst.clone()
    want[:64, :128] += 2 * src
    for _ in range(2):
        ws_common.tma_add_tile[(1,)](ws_common.descriptor(src, 64, 128), ws_common.descriptor(dst, 64, 128))
    torch.cuda.synchronize()
    torch.testing.assert_close(dst, want, rtol=0, atol=1e-5)


def test_info_prints_versions_range_and_experimental_kernels(capsys):
    from attend.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"triton              {triton.__version__}" in out
    assert _versions.supported_range() in out
    for label in versions.EXPERIMENTAL.values():
        assert label in out


@pytest.fixture
def gluon_on_this_device(monkeypatch):
    """Route calls here (CPU under the interpreter, or any GPU) to the Gluon kernels' gate, as on
    an sm_90 GPU, with fresh experimental-kernel state."""
    if launch.ws is None:
        pytest.skip(f"Gluon is unusable on this Triton: {versions.GLUON_ERROR}")
    monkeypatch.setattr(versions, "_failed", {})
    monkeypatch.setattr(launch, "_gluon_device", lambda t: True)
    monkeypatch.setattr(launch, "_ensure_allocator", lambda: None)
    from attend.kernels import ws_common

    monkeypatch.setattr(ws_common, "sm_count", lambda index: 4)


def _build_failure(*args, **kwargs):
    # what Triton 3.9 raised when it built the 3.6-era Gluon forward
    raise RuntimeError("async_copy_shared_to_global has been removed; call async_store instead")


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9,
                    reason="on sm_90 the real Gluon kernels run; their float64 tests are in test_core_variants")
@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-programs", "fused-dq"])
def test_failed_gluon_build_falls_back_to_the_core_with_one_warning(gluon_on_this_device, monkeypatch, fused_dq):
    """A Gluon kernel whose build raises never fails the call: the core serves it (float64-checked,
    forward and backward), one RuntimeWarning names the kernel and the versions, and the kernel is
    off for the rest of the process (``explain`` / ``attend info`` say so). With the dK / dV kernel's
    fused dQ (KernelOptions.bwd_ws_fused_dq), the core's backward then writes a dQ of its own."""
    monkeypatch.setattr(launch.ws, "_LAUNCH", _build_failure)
    monkeypatch.setattr(launch.ws_bwd, "_LAUNCH", _build_failure)
    # take the Gluon dK / dV kernel's route at any length (it serves long sequences only)
    monkeypatch.setattr(launch, "ws_backward", lambda block_d, seq_bucket, min_seq_bucket: triton.Config({}))
    dtype = torch.float16
    q, k, v = (rand(1, 2, 24, 128, dtype=dtype, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught, kernel_options(bwd_ws_fused_dq=fused_dq):
        warnings.simplefilter("always")
        with attend.sdpa_kernel([attend.SDPBackend.FLASH_ATTENTION]):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert_matches_float64(out, q, k, v, what="fallback", is_causal=True)
            attend.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()  # warns no more
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "experimental" in str(w.message)]
    # the forward's once, the dK / dV kernel's once (with the fused dQ: its fused build's, then the plain one's)
    failed = ["gluon_forward", *(["gluon_dkdv_fused_dq"] if fused_dq else []), "gluon_dkdv"]
    assert len(ours) == len(failed), [str(w.message) for w in ours]
    for w, name in zip(ours, failed):
        assert versions.EXPERIMENTAL[name] in str(w.message) and f"Triton {triton.__version__}" in str(w.message)
        assert "async_copy_shared_to_global has been removed" in str(w.message)
    status = versions.experimental_status()  # the flex variants too: they run only where these do
    assert all(s.startswith("off: failed to build on Triton") for s in status.values()), status


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9,
                    reason="on sm_90 the real Gluon kernels run; their float64 tests are in test_core_variants")
def test_a_failed_fused_dq_build_keeps_the_plain_gluon_dkdv_kernel(gluon_on_this_device, monkeypatch):
    """KernelOptions.bwd_ws_fused_dq whose build fails turns off only the fused variant: one warning
    names it, the same backward launches the plain dK / dV kernel (recorded here) and the core's dQ
    programs, whose dQ matches float64, and the plain kernel stays available."""
    launched = []

    def launch_(grid, args, constexprs, num_warps, num_stages):
        if constexprs["FUSED_DQ"]:
            raise RuntimeError("an unsupported TMA reduce-add")
        launched.append(constexprs["FUSED_DQ"])

    monkeypatch.setattr(launch.ws_bwd, "_LAUNCH", launch_)
    q, k, v = (rand(1, 2, 24, 128, dtype=torch.float16, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught, kernel_options(bwd_ws_fused_dq=True, fwd_ws=False,
                                                                        bwd_ws_min_seq_bucket=0):
        warnings.simplefilter("always")
        with attend.sdpa_kernel([attend.SDPBackend.FLASH_ATTENTION]):
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
        g = torch.randn_like(out)
        (dq,) = torch.autograd.grad((out * g).sum(), (q,))
    ours = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "experimental" in str(w.message)]
    assert len(ours) == 1 and versions.EXPERIMENTAL["gluon_dkdv_fused_dq"] in ours[0], ours
    assert launched == [False], launched
    status = versions.experimental_status()
    assert status["gluon_dkdv_fused_dq"].startswith("off:") and status["gluon_dkdv"].startswith("available"), status
    ref, p = reference(q, k, v, is_causal=True)
    (ref_dq,) = torch.autograd.grad((ref * g.double()).sum(), (p.query,))
    (same_dq,) = torch.autograd.grad((same_precision(q, k, v, is_causal=True) * g).sum(), (q,))
    assert_scaled_close(dq, ref_dq, same_dq, k=6.0, what="dQ from the dQ programs")


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9,
                    reason="on sm_90 the real Gluon kernels run; their float64 tests are in test_flex_band")
def test_failed_flex_hooks_build_turns_off_only_the_flex_variant(gluon_on_this_device, monkeypatch):
    """A flex score_mod's hooks that the Gluon forward fails to build send that call (and later flex
    calls) to the core's score hooks with one warning, float64-checked; the dense calls keep the
    Gluon forward (``gluon_forward`` stays usable)."""
    import attend.flex_attention as flex
    from attend._flex import dispatch
    from test_flex import dense_reference

    real = launch.ws._LAUNCH

    def fails_with_hooks(grid, args, constexprs, *rest):
        if constexprs.get("HAS_SCORE"):
            _build_failure()
        return real(grid, args, constexprs, *rest)

    monkeypatch.setattr(launch.ws, "_LAUNCH", fails_with_hooks)
    n = launch.ws.BLOCK_M  # the route takes at least one tile of queries
    q, k, v = (rand(1, 2, n, 128, dtype=torch.float16) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25], device=q.device)
    alibi = lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki)
    causal = lambda b, h, qi, ki: qi >= ki
    bm = flex.create_block_mask(causal, None, None, n, n, device=q.device)
    before = dict(dispatch.PATHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = flex.flex_attention(q, k, v, alibi, bm)
    assert dispatch.PATHS["band_hooks"] == before["band_hooks"] + 1, "the core's score hooks served it"
    ours = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "experimental" in str(w.message)]
    assert len(ours) == 1 and versions.EXPERIMENTAL["gluon_flex_forward"] in ours[0], ours
    assert not versions.usable("gluon_flex_forward") and versions.usable("gluon_forward")
    ref64, ref16 = (dense_reference(q, k, v, alibi, causal, dt)[0] for dt in (torch.float64, torch.float32))
    from conftest import assert_scaled_close

    assert_scaled_close(out, ref64, ref16, what="flex on the core after the hooks' Gluon build failed")


def test_experimental_kernel_runs_when_it_builds(monkeypatch):
    """The guard passes a working launch through, and reports it ran."""
    monkeypatch.setattr(versions, "_failed", {})
    if versions.GLUON_ERROR is not None:
        assert not versions.run_experimental("gluon_forward", lambda: None)
        return
    seen = []
    assert versions.run_experimental("gluon_forward", seen.append, 7)
    assert seen == [7] and versions.usable("gluon_forward")


def test_a_missing_triton_is_reported_not_raised(monkeypatch):
    from importlib import metadata

    def version(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_versions.metadata, "version", version)
    assert _versions.installed()["triton"] == "not installed"
    assert _versions.out_of_range() == ["triton is not installed (attend's Triton kernels need 3.6-3.9)"]


@pytest.mark.parametrize("cuda_build", [False, True])
def test_triton_cache_key_is_hashed_while_attend_loads(cuda_build):
    """On a CUDA build of torch, loading attend's launchers starts hashing Triton's install (the
    key of every compile and disk-cache load), then the main kernels' own keys, on a daemon thread,
    so the first launch does not wait for them; a fork waits for it first; a CPU build (or the
    interpreter) starts nothing. In a fresh process each."""
    import subprocess
    import sys

    from attend._child import child_env

    code = ("import torch\n"
            f"torch.version.cuda = {'12.8' if cuda_build else None!r}\n"
            "import attend\n"
            "from attend.kernels import versions\n"
            "from triton.runtime.cache import triton_key\n"
            "t = versions.KEY_THREAD\n"
            "import os\n"
            "pid = os.fork()  # a fork right after import waits for the thread first\n"
            "pid == 0 and os._exit(0)\n"
            "os.waitpid(pid, 0)\n"
            "assert t is None or not t.is_alive(), 'forked beside the live thread'\n"
            "versions.await_compile_key()  # what a first compile does: waits for the thread, never hashes twice\n"
            "from attend.kernels import core, launch\n"
            "kernels = [core.attn_fwd, core.attn_bwd_preprocess, core.attn_bwd]"
            " + ([launch.ws.attn_fwd_ws, launch.ws_bwd.attn_bwd_dkdv_ws] if launch.ws is not None else [])\n"
            "print(int(t is not None), triton_key.cache_info().currsize, int(t is not None and t.is_alive()),"
            " int(all(k.hash is not None for k in kernels)))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=child_env(TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr[-2000:]
    started, hashed, alive, kernel_keys = map(int, res.stdout.split()[-4:])
    assert (started, hashed, alive, kernel_keys) == ((1, 1, 0, 1) if cuda_build else (0, 0, 0, 0)), res.stdout


def test_assume_constant_result_marks_as_torch_does(monkeypatch):
    """attend marks its trace-time constants without importing torch._dynamo
    (``_versions.assume_constant_result``): the mark is exactly what PyTorch's decorator sets."""
    import sys

    def theirs():
        return 1

    def ours():
        return 1

    assert torch.compiler.assume_constant_result(theirs) is theirs  # (imports torch._dynamo)
    assert vars(theirs) == {_versions.DYNAMO_CONSTANT: True}, vars(theirs)
    monkeypatch.delitem(sys.modules, "torch._dynamo")  # as in a process that never compiled
    assert _versions.assume_constant_result(ours) is ours and vars(ours) == vars(theirs)


def test_import_attend_leaves_dynamo_unimported():
    """``import attend`` (and its flex module) imports no torch._dynamo, about a second of start-up
    that a process which never compiles does not need. In a fresh process."""
    import subprocess
    import sys

    from attend._child import child_env

    code = ("import sys\nimport attend, attend.flex_attention, attend.varlen\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == "[]", res.stdout[-2000:]


def test_a_kernel_key_that_fails_on_the_thread_is_left_to_the_first_launch(monkeypatch):
    """Triton leaves a placeholder key in a kernel whose hashing raised; the load-time thread
    (``versions.warm_compile_key``) clears it, so the first launch hashes the kernel again and
    reports the error, and the next kernel is still hashed."""
    class Kernel:
        def __init__(self, fails):
            self.hash, self.fails = None, fails

        @property
        def cache_key(self):
            self.hash = "recursion:placeholder"  # as Triton's JITFunction.cache_key, before it hashes
            if self.fails:
                raise SyntaxError("a kernel Triton cannot parse")
            self.hash = "key"
            return self.hash

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(versions, "KEY_THREAD", None)
    bad, good = Kernel(True), Kernel(False)
    versions.warm_compile_key((bad, good))
    versions.await_compile_key()
    assert versions.KEY_THREAD is not None and (bad.hash, good.hash) == (None, "key")

"""The direct launcher (attend/kernels/fastlaunch.py) must never reuse a compiled kernel for
arguments Triton would have compiled differently."""

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from attend.kernels import core, launch, options  # noqa: E402
from attend._layout import Band  # noqa: E402
from attend.kernels.fastlaunch import Launcher, int_class, scalar_class  # noqa: E402

INT_SAMPLES = list(range(-20, 70)) + [
    2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, -(2**31) - 16,
    2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, -(2**63), 2**40, 2**40 + 3]


def test_int_class_matches_triton():
    """Equal int_class <=> equal Triton specialization, for every pair of sample ints."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for a, b in itertools.combinations(INT_SAMPLES, 2):
        same_triton = native_specialize_impl(backend, a, False, True, True) == \
            native_specialize_impl(backend, b, False, True, True)
        assert (int_class(a) == int_class(b)) == same_triton, (a, b)


def test_scalar_class_matches_triton():
    """Equal scalar_class <=> equal Triton specialization, over ints, floats, bools and None."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    samples = INT_SAMPLES[::7] + [0.0, 1.0, -2.5, 1e30, 0.125, True, False, None]
    for a, b in itertools.combinations(samples, 2):
        same_triton = native_specialize_impl(backend, a, False, True, True) == \
            native_specialize_impl(backend, b, False, True, True) and type(a) is type(b)
        assert (scalar_class(a) == scalar_class(b)) == same_triton, (a, b)


def _launcher(n_ptr, volatile=(), nested=(), unspecialized=()):
    """A Launcher's key logic without a compiled kernel (the interpreter has none)."""
    lau = Launcher.__new__(Launcher)
    lau.n_ptr, lau.volatile, lau.nested, lau.unspecialized = n_ptr, volatile, nested, unspecialized
    return lau


def test_key_separates_what_triton_specializes():
    lau = _launcher(2)
    t = torch.empty(64, dtype=torch.float16)
    u = torch.empty(64, dtype=torch.float16)
    key = lau._key((t, u, 64, 0.5))
    assert key == lau._key((torch.empty(8, dtype=torch.float16), u, 64, 0.5))  # another aligned tensor
    assert key != lau._key((t[1:], u, 64, 0.5))  # a 2-byte offset: not 16-byte aligned
    assert key != lau._key((t.float(), u, 64, 0.5))  # dtype
    assert key != lau._key((t, u, 65, 0.5))  # scalars by exact value
    assert key != lau._key((t, u, 64, 0.25))


def test_class_key_merges_only_what_triton_merges():
    """A new length of a known class finds the kernel compiled for an earlier one."""
    lau = _launcher(1)
    t = torch.empty(8)
    assert lau._class_key((t, 1040, 0.5)) == lau._class_key((t, 1056, 0.25))  # both divisible by 16
    assert lau._class_key((t, 1041, 0.5)) == lau._class_key((t, 1043, 0.5))
    assert lau._class_key((t, 1040, 0.5)) != lau._class_key((t, 1041, 0.5))
    assert lau._class_key((t, 1040, 0.5)) != lau._class_key((t, 1, 0.5))  # Triton makes 1 a constant
    assert lau._class_key((t, 1040, 0.5)) != lau._class_key((t, 2**40, 0.5))  # i64
    assert lau._class_key((t, 1040, 0.5)) != lau._class_key((t[1:], 1040, 0.5))  # alignment


def test_unspecialized_ints_classed_by_width_as_triton_does():
    """An int the kernel does not specialize on its value (``do_not_specialize``: the Gluon kernels'
    tile counts) is classed by its width alone, as Triton specializes it; the launcher learns which
    from the kernel's parameters."""
    from triton.backends.compiler import BaseBackend

    lau = _launcher(1, unspecialized=(2,))
    t = torch.empty(8)
    spec = lambda a: native_specialize_impl(BaseBackend, a, False, False, True)
    for a, b in itertools.combinations([1, 16, 61, 64, 2**31 - 1, 2**31, 2**40 + 3, 2**63], 2):
        assert (lau._class_key((t, 7, a)) == lau._class_key((t, 7, b))) == (spec(a) == spec(b)), (a, b)
    assert lau._class_key((t, 16, 61)) != lau._class_key((t, 17, 61))  # the other int keeps its classes

    from attend.kernels import versions

    for mod, count in zip(versions.gluon_kernels(), ("n_m", "n_n")):
        if mod is None:
            continue
        kernel = getattr(mod, "attn_fwd_ws", None) or mod.attn_bwd_dkdv_ws
        lau = Launcher(kernel)
        assert {kernel.arg_names[i] for i in lau.unspecialized} == {"n_tiles", count, "sec"}


def test_volatile_ints_keyed_by_class():
    lau = _launcher(1, volatile=(2,))
    t = torch.empty(8)
    assert lau._key((t, 7, 12345)) == lau._key((t, 7, 54321))  # a new seed: same kernel
    assert lau._key((t, 7, 12345)) != lau._key((t, 7, 1))  # Triton makes 1 a constant
    assert lau._key((t, 7, 16)) != lau._key((t, 7, 17))


def test_nested_arguments_keyed_by_their_tensors():
    """flex's tuples of block lists and captures (``nested``): tensors by dtype and alignment, ints
    in them by value (exact key) or class, never by the tensors' identity or values."""
    lau = _launcher(1, nested=(2,))
    t = torch.empty(8)
    lists = lambda: (torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.int32), 32)  # noqa: E731
    key = lau._key((t, 7, lists(), 0.5))
    assert key == lau._key((t, 7, lists(), 0.5))  # new tensors alike
    assert key != lau._key((t, 7, (torch.empty(4, dtype=torch.int64),) + lists()[1:], 0.5))  # a dtype
    assert key != lau._key((t, 7, (torch.empty(5, dtype=torch.int32)[1:],) + lists()[1:], 0.5))  # alignment
    assert key != lau._key((t, 7, lists()[:2] + (48,), 0.5))  # an int in the tuple, by value
    assert lau._class_key((t, 7, lists(), 0.5)) == lau._class_key((t, 7, lists()[:2] + (48,), 0.5))  # % 16
    assert lau._class_key((t, 7, lists(), 0.5)) != lau._class_key((t, 7, lists()[:2] + (33,), 0.5))
    assert lau._key((t, 7, None, 0.5)) != key  # the dense call's None


def _stand_in_launcher(monkeypatch):
    """(Launcher, list of Triton-path calls) for a tiny kernel whose compile and driver are
    stand-ins (CPU): every call that reaches Triton's own path appends to the list."""
    from triton.runtime.jit import JITFunction

    from attend.kernels import fastlaunch

    def k(X, n, BLOCK: triton.language.constexpr):
        pass

    class Compiled:
        function = packed_metadata = None

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            pass

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

    kernel = JITFunction(k)  # not the interpreter's: the direct path
    slow = []
    monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, **kw: slow.append(a) or Compiled())
    monkeypatch.setattr(fastlaunch, "driver", type("D", (), {"active": Driver()})())
    return Launcher(kernel), slow


def test_debug_knob_selects_another_kernel(monkeypatch):
    """Triton's debug knob turned on after a kernel's first launch sends the next call through
    Triton's path (which builds the debug kernel), not to the kernel launched before."""
    from triton import knobs

    lau, slow = _stand_in_launcher(monkeypatch)
    x = torch.empty(16)
    lau((1,), dict(X=x, n=16), dict(BLOCK=16), 4, 2)
    lau((1,), dict(X=x, n=16), dict(BLOCK=16), 4, 2)
    assert len(slow) == 1
    monkeypatch.setattr(knobs.runtime, "debug", True)
    lau((1,), dict(X=x, n=16), dict(BLOCK=16), 4, 2)
    lau((1,), dict(X=x, n=32), dict(BLOCK=16), 4, 2)  # a new value of its class: the debug kernel, direct
    assert len(slow) == 2


@pytest.mark.parametrize("first", ["tensor", "parameter"])
def test_a_parameter_is_a_pointer_like_its_tensor(first, monkeypatch):
    """An ``nn.Parameter`` (a model's weight as q, or a capture of a score_mod) keys as the tensor it
    is, whichever comes first: one Triton-path call for both, then direct launches."""
    lau, slow = _stand_in_launcher(monkeypatch)
    x = torch.empty(16)
    calls = [x, torch.nn.Parameter(torch.empty(16))]
    if first == "parameter":
        calls.reverse()
    for t in calls + calls:
        lau((1,), dict(X=t, n=16), dict(BLOCK=16), 4, 2)
    assert lau.n_ptr == 1 and len(slow) == 1, (lau.n_ptr, len(slow))


def test_both_caches_are_bounded(monkeypatch):
    """Past MAX_KEYS entries each of the launcher's two caches starts over: the class cache too
    (a Gluon kernel's host descriptors key their shapes, so each new length is a new class there).
    CPU: Triton's path and the driver are stand-ins; 7 int classes against MAX_KEYS = 3."""
    from attend.kernels import fastlaunch

    lau, slow = _stand_in_launcher(monkeypatch)
    monkeypatch.setattr(fastlaunch, "MAX_KEYS", 3)
    assert lau.direct
    x = torch.empty(16)
    values = [1, 16, 17, 2**31, 2**31 + 1, 2**63, 2**63 + 1]
    assert len({int_class(n) for n in values}) == len(values)
    for n in values:
        lau((1,), dict(X=x, n=n), dict(BLOCK=16), 4, 2)
        assert len(lau.by_class) <= 3 and len(lau.cache) <= 3, (len(lau.by_class), len(lau.cache))
    assert len(slow) == len(values)  # every new class went through Triton's path
    lau((1,), dict(X=x, n=2**63 + 33), dict(BLOCK=16), 4, 2)  # a new value of the last class: direct
    assert len(slow) == len(values)


def test_launcher_falls_back_under_interpreter():
    """Under TRITON_INTERPRET the kernels are interpreted functions: Launcher uses Triton's path."""
    if not options.current().interpret:
        pytest.skip("interpreter only")
    assert not Launcher(core.attn_fwd).direct


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need a GPU")
def test_launcher_rejects_constexpr_before_runtime_args():
    @triton.jit
    def k(X, N: triton.language.constexpr, M):
        pass

    with pytest.raises(TypeError, match="constexpr parameters must come last"):
        Launcher(k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need a GPU")
def test_direct_launch_respects_alignment():
    """Same kernel, aligned then misaligned q, twice each: the misaligned calls must not reuse
    the aligned kernel, and the repeats go direct."""
    torch.manual_seed(0)
    buf = torch.randn(2 * 64 * 64 + 1, dtype=torch.float16, device="cuda")
    before = len(launch._FWD_LAUNCH.cache)
    for offset in (0, 1, 0, 1):
        q = buf[offset:offset + 2 * 64 * 64].view(1, 2, 64, 64)
        k = torch.randn(1, 2, 64, 64, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        out, _ = launch.forward(q, k, v, None, 0.0, Band(), 0.1234, 0)  # a scale no other test uses: fresh keys
        ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.1234, -1) @ v.double()
        assert (out.double() - ref).abs().max().item() < 5e-3
    assert len(launch._FWD_LAUNCH.cache) == before + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need a GPU")
def test_new_length_of_a_known_class_launches_direct():
    """A decode loop's next length (here 96 -> 112 -> 128 keys: one class) reuses the kernel compiled
    for the first without Triton's path, from the exact cache (the length and K / V's batch and head
    strides are keyed by class: no new key either), and each result matches float64."""
    torch.manual_seed(0)
    lau = launch._FWD_LAUNCH
    q = torch.randn(2, 4, 1, 64, dtype=torch.float16, device="cuda")
    for i, S in enumerate((96, 112, 128)):  # one query: never EVEN, so the constexprs stay the same
        k, v = (torch.randn(2, 4, S, 64, dtype=torch.float16, device="cuda") for _ in range(2))
        out, _ = launch.forward(q, k, v, None, 0.0, Band(), 0.1367, 0)  # a scale no other test uses
        ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.1367, -1) @ v.double()
        assert (out.double() - ref).abs().max().item() < 5e-3, S
        if i == 0:
            classes, keys = len(lau.by_class), len(lau.cache)
    assert len(lau.by_class) == classes and len(lau.cache) == keys  # no new key, no new kernel


def test_decode_volatile_arguments_are_runtime_ints_of_the_forward():
    """The forward launchers key a decode step's changing arguments by class (launch._DECODE_VOLATILE):
    each must be a runtime (not constexpr) parameter of core.attn_fwd, or the launcher would not
    find it (checked here on the CPU too, where the interpreter's launcher reads no names)."""
    import inspect

    params = inspect.signature(core.attn_fwd.fn).parameters
    runtime = [n for n, p in params.items() if p.annotation is inspect.Parameter.empty]
    assert set(launch._DECODE_VOLATILE) <= set(runtime), set(launch._DECODE_VOLATILE) - set(runtime)
    assert runtime.index("seed") > runtime.index("SEQUSED_K")  # after the leading pointers
    key_range = inspect.signature(core.key_range_kernel.fn).parameters  # the key-padding span's launcher
    assert {"S", "stride_mb", "stride_mh"} <= {n for n, p in key_range.items()
                                              if p.annotation is inspect.Parameter.empty}


def test_descriptor_key_separates_what_a_descriptor_fixes():
    """Gluon host tensor descriptors (ws.attn_fwd_ws's leading arguments) are keyed by their base's
    dtype and alignment, shape, strides, box and layout: another tensor alike reuses the kernel."""
    from attend.kernels import ws

    lau = _launcher(2)
    t = torch.empty(256, 128, dtype=torch.bfloat16)
    out = torch.empty(8)
    key = lau._key((ws.descriptor(t, 64, 128), out, 3))
    assert key == lau._key((ws.descriptor(torch.empty(256, 128, dtype=torch.bfloat16), 64, 128), out, 3))
    assert key != lau._key((ws.descriptor(t, 128, 128), out, 3))  # box (and its layout)
    assert key != lau._key((ws.descriptor(t[:128], 64, 128), out, 3))  # shape
    assert key != lau._key((ws.descriptor(t.half(), 64, 128), out, 3))  # dtype
    assert key != lau._key((ws.descriptor(torch.empty(128, 256, dtype=torch.bfloat16)[:, :128], 64, 128), out, 3))
    flat = torch.empty(256 * 128 + 8, dtype=torch.bfloat16)
    moved = ws.descriptor(flat[8:].view(256, 128), 64, 128)  # 16 bytes in: still aligned
    assert key == lau._key((moved, out, 3))


def test_descriptors_built_without_validation_match_tritons():
    """``ws_common.build_descriptor`` (no dataclass validation per launch) gives the descriptor
    Triton's own constructor gives, field for field, and refuses what it refuses, naming the shape,
    strides and base."""
    import dataclasses

    from attend.kernels import ws_bwd, ws_common
    from attend.kernels.versions import TensorDescriptor

    cases = [torch.empty(256, 128, dtype=torch.bfloat16),
             torch.empty(2, 3, 64, 128, dtype=torch.float16),  # leading dims as rows
             torch.empty(128, 384, dtype=torch.bfloat16)[:, 128:256]]  # strided rows, 256 bytes in
    for t in cases:
        fast = ws_common.descriptor(t, 64, 128)
        t2 = t.reshape(-1, 128)
        own = TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [64, 128], ws_common.smem_layout(64, 128, t.dtype))
        for f in dataclasses.fields(TensorDescriptor):
            a, b = getattr(fast, f.name), getattr(own, f.name)
            # the base: the same memory and dtype (a contiguous tensor's own, not a reshaped view)
            assert (a.data_ptr(), a.dtype) == (b.data_ptr(), b.dtype) if f.name == "base" else a == b, f.name
    stat = torch.empty(2, 4, 256)
    assert ws_bwd._row_descriptor(stat).shape == [2048] and ws_bwd._row_descriptor(stat).strides == [1]
    flat = torch.empty(256 * 128 + 8, dtype=torch.bfloat16)
    bad = [flat[4:256 * 128 + 4].view(256, 128),  # 8 bytes in: a misaligned base
           torch.empty(256, 132, dtype=torch.bfloat16)[:, :128],  # 264-byte rows
           torch.empty(128, 256, dtype=torch.bfloat16).t()[:128]]  # a column stride of 256
    for t in bad:
        with pytest.raises(AssertionError):
            TensorDescriptor(t, list(t.shape), list(t.stride()), [64, 128], ws_common.smem_layout(64, 128, t.dtype))
        with pytest.raises(ValueError, match=r"16-byte aligned base and strides.*shape \[\d+, \d+\], strides"):
            ws_common.descriptor(t, 64, 128)
    with pytest.raises(ValueError, match="nonempty"):
        ws_common.descriptor(torch.empty(0, 128, dtype=torch.bfloat16), 64, 128)


def test_descriptor_class_is_tritons_specialization():
    """``descriptor_class`` (the class key of a Gluon launch) separates host tensor descriptors
    exactly where Triton's own specialization does: by dtype, box and layout, not by shape,
    strides or alignment (the launch passes those), so a new length launches directly."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from attend.kernels import ws
    from attend.kernels.fastlaunch import descriptor_class

    def both(d):
        return descriptor_class(d), native_specialize_impl(BaseBackend, d, False, True, True)[0]

    base = ws.descriptor(torch.empty(256, 128, dtype=torch.bfloat16), 64, 128)
    flat = torch.empty(300 * 128 + 8, dtype=torch.bfloat16)
    same = [ws.descriptor(torch.empty(272, 128, dtype=torch.bfloat16), 64, 128),  # another length
            ws.descriptor(torch.empty(128, 256, dtype=torch.bfloat16)[:, :128], 64, 128),  # strided rows
            ws.descriptor(flat[8:].view(300, 128), 64, 128)]  # 16 bytes in
    other = [ws.descriptor(torch.empty(256, 128, dtype=torch.bfloat16), 128, 128),  # box (and layout)
             ws.descriptor(torch.empty(256, 128, dtype=torch.float16), 64, 128)]  # dtype
    for d in same:
        assert descriptor_class(d) == descriptor_class(base)
        assert both(d)[1] == both(base)[1]
    for d in other:
        assert descriptor_class(d) != descriptor_class(base) and both(d)[1] != both(base)[1]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon forward runs on sm_90")
def test_gluon_forward_launches_direct():
    """The second call of a shape reuses the compiled Gluon kernel without Triton's path, with fresh
    descriptors for new tensors, and so does a new length of the same classes (descriptors are
    classed without their shape): all match float64 (outputs and the gradients from their LSE)."""
    import attend
    from attend.kernels import ws
    from conftest import assert_matches_float64

    before = len(ws._LAUNCH.cache)
    for seed, n in ((0, 192), (1, 192), (2, 208)):  # 208: a new length of 192's classes (n_m 2, L % 16 == 0)
        torch.manual_seed(seed)
        q, k, v = (torch.randn(1, 2, n, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
                   for _ in range(3))
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):  # a scale no other test uses: a fresh key
            out = attend.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.0771)
        assert_matches_float64(out, q, k, v, what=f"call {seed}", is_causal=True, scale=0.0771)
        if seed == 0:
            classes = len(ws._LAUNCH.by_class)
    assert len(ws._LAUNCH.cache) == before + 2  # the two lengths' exact keys
    assert len(ws._LAUNCH.by_class) == classes, "the new length went through Triton's path"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon kernels run on sm_90")
def test_gluon_tile_counter_is_back_to_zero_after_each_launch():
    """The persistent Gluon kernels share one tile counter per stream (``ws_common.persistent``):
    each launch leaves it at 0 (the last take resets it), so launches of other tile counts in a row,
    forward and backward (the Gluon dK / dV kernel), on the default stream and on another, each
    match float64."""
    import attend
    from attend.kernels import ws_common
    from conftest import assert_matches_float64

    side = torch.cuda.Stream()
    for i, (n, stream) in enumerate(((384, None), (1024, None), (128, side), (640, side), (256, None))):
        torch.manual_seed(i)
        q, k, v = (torch.randn(2, 3, n, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
                   for _ in range(3))
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
                out = attend.scaled_dot_product_attention(q, k, v, is_causal=True)
            key = (torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert key in ws_common._COUNTERS, "the Gluon forward did not take this call"
        assert ws_common._COUNTERS[key].item() == 0, f"call {i}: the counter was left at {ws_common._COUNTERS[key].item()}"
        with options.kernel_options(bwd_ws_min_seq_bucket=0):  # the Gluon dK / dV kernel at these lengths too
            assert_matches_float64(out, q, k, v, what=f"call {i} (S={n})", is_causal=True)
        torch.cuda.synchronize()
        left = {k: c.item() for k, c in ws_common._COUNTERS.items() if c.item() != 0}
        assert not left, f"after call {i}'s backward, counters left at {left}"

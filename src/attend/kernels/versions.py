"""The shims for Triton's experimental Gluon API and the state of the experimental (Gluon)
kernels: all Triton-version-dependent code in one place (the supported range itself is
``attend._versions``, which needs no Triton).

Gluon (``triton.experimental.gluon``) changes its API between Triton releases: Triton 3.8 renamed
the TMA copies ``async_copy_global_to_shared`` / ``async_copy_shared_to_global`` to
``async_load`` / ``async_store`` and 3.9 removed the old names. The Gluon kernels (``ws.py``,
``ws_bwd.py``) use the names bound here, never the versioned ones. The ``tl`` core needs no shim.

An experimental kernel is a fast path, never a requirement: where Gluon does not import, or a
Gluon kernel fails to build on the installed Triton, ``run_experimental`` records the failure,
warns once naming the kernel and the versions, and the caller serves the call with the core.
``python -m attend info`` and ``attend.explain`` print ``experimental_status()``.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import triton

GLUON_ERROR: str | None = None  # why Gluon is unusable on this Triton, or None
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception as e:  # noqa: BLE001 - any failure means "no Gluon here", never a failed import of attend
    GLUON_ERROR = f"Gluon does not import on Triton {triton.__version__}: {type(e).__name__}: {e}"
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    TensorDescriptor = None
    tma_load = tma_store = tma_atomic_add = thread_barrier = None
else:
    # A barrier over the calling partition's warps: gl.thread_barrier through Triton 3.8, gl.barrier from 3.9
    # (which removed the old name).
    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # TMA copies: async_load / async_store from Triton 3.8 on, the async_copy_* names before.
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # A TMA reduce-add of a shared-memory tile into global memory (cp.reduce.async.bulk.tensor: what
    # FlashAttention 3 accumulates dQ with). Triton 3.9's Gluon names it tma.async_atomic_add; 3.6's
    # builder has the op (create_async_tma_reduce) with no Gluon function, so it is made here.
    tma_atomic_add = getattr(tma, "async_atomic_add", None)
    if tma_atomic_add is None:
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def tma_atomic_add(tensor_desc, coord, src, _semantic=None):
            """Add the shared-memory tile ``src`` into ``tensor_desc``'s box at ``coord`` by TMA,
            atomically per element (``tma.async_atomic_add`` of later Tritons); ``tma_store_wait``
            (``tma.store_wait``) waits for it as for a TMA store."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                       src.handle)

KEY_THREAD: threading.Thread | None = None  # warm_compile_key's thread, once started


def warm_compile_key(kernels: tuple = ()) -> None:
    """Hash Triton's own install on a daemon thread (``KEY_THREAD``; ``triton.runtime.cache.triton_key``:
    part of the key of every compile and of every load from Triton's disk cache, computed once per
    process; it reads libtriton, 0.3-0.9 s on a 2-core host), so that a process's first kernel launch
    finds it done; then each of ``kernels``' own key (``JITFunction.cache_key``: a hash of its source
    and of every function it calls, 10-33 ms each for attend's kernels on that host, also computed at
    a process's first launch of each). Started as the launchers load, only where kernels will compile:
    a CUDA build of torch, outside the interpreter. A Triton without the function, or any failure
    there, leaves the first launch to compute it as before."""
    if torch.version.cuda is None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return

    def run():
        try:
            triton_key()
        except Exception:  # noqa: BLE001 - the first compile computes it again and reports any error
            return
        for kernel in kernels:  # in this order in every process (the keys depend on it: await_compile_key)
            try:
                kernel.cache_key  # noqa: B018 - computed once, kept by the kernel
            except Exception:  # noqa: BLE001
                kernel.hash = None  # (Triton leaves a placeholder there): the first launch hashes it and reports the error

    global KEY_THREAD
    KEY_THREAD = threading.Thread(target=run, name="attend-triton-key", daemon=True)
    KEY_THREAD.start()


def await_compile_key() -> None:
    """Wait for ``warm_compile_key``'s thread where it still runs: before any compile, disk-cache load
    or warmup of attend's kernels through Triton's own path (``fastlaunch.Launcher``'s first launch of
    a key, the autotuned launches, the flex backward's and the warmups), rather than hash Triton's
    install a second time beside it (the thread then has the GIL to itself: a busy main thread slows
    its 1 MiB reads, each of which takes the GIL back), and before a fork. The kernels' own keys
    depend on the order they are hashed in (Triton merges a called function's globals into its
    caller's as it goes), so a kernel hashed beside the thread could get a key of its own in one
    process, and miss the disk cache that another process filled."""
    t = KEY_THREAD
    if t is not None and t.is_alive():
        t.join()


if hasattr(os, "register_at_fork"):
    # a fork (a DataLoader's workers) right after import waits for the thread: a child forked beside
    # a live thread gets no copy of it, and Python 3.12 warns that such a fork may deadlock
    os.register_at_fork(before=await_compile_key)


# Triton's hook for compiling on an executor (``_do_compile`` hands the compile to the
# ``AsyncCompileMode`` active on the thread): private, so looked up here; None where absent.
# ``forkcompile`` uses it to build a warmup's kernels in forked children.
try:
    from triton.runtime import _async_compile as ASYNC_COMPILE

    if not (hasattr(ASYNC_COMPILE, "AsyncCompileMode") and hasattr(ASYNC_COMPILE, "active_mode")):
        ASYNC_COMPILE = None
except ImportError:
    ASYNC_COMPILE = None


# Options every compile passes, so that builds agree across the range: FMA contraction on, as
# Triton's default has been through 3.9 (3.9 warns that 3.10's default turns it off).
COMPILE_OPTIONS = {"enable_fp_fusion": True}

# The experimental kernels, by name: what each serves (``explain`` / ``attend info`` print it).
EXPERIMENTAL = {
    "gluon_forward": "Hopper warp-specialized forward (kernels/ws.py)",
    "gluon_dkdv": "Hopper warp-specialized dK / dV (kernels/ws_bwd.py)",
    # the same kernels with a flex score_mod's generated hooks: a hook they fail to build turns off
    # only these (flex's score hooks then run on the core), never the dense calls' kernels
    "gluon_flex_forward": "Hopper warp-specialized forward with flex score hooks (kernels/ws.py)",
    "gluon_flex_dkdv": "Hopper warp-specialized dK / dV with flex score hooks (kernels/ws_bwd.py)",
    # the dK / dV kernel adding dQ too (FUSED_DQ): a failed build turns off only these, and the
    # backward keeps the plain dK / dV kernel and the dQ programs
    "gluon_dkdv_fused_dq": "Hopper warp-specialized dK / dV with dQ fused (kernels/ws_bwd.py)",
    "gluon_flex_dkdv_fused_dq": "Hopper warp-specialized dK / dV with flex's hooks and dQ fused (kernels/ws_bwd.py)",
    # the kernels walking a BlockMask's lists with a mask_mod's hooks (LISTS): a mask_mod they fail
    # to build turns off only these, never the band's score hooks
    "gluon_flex_lists_forward": "Hopper warp-specialized forward over a BlockMask's lists (kernels/ws.py)",
    "gluon_flex_lists_dkdv": "Hopper warp-specialized dK / dV over a BlockMask's lists (kernels/ws_bwd.py)",
    "gluon_flex_lists_dkdv_fused_dq": "Hopper warp-specialized dK / dV over a BlockMask's lists with dQ fused "
                                      "(kernels/ws_bwd.py)",
}
# the kernels a variant builds on: it runs only where each of them does (followed to the end: flex's
# fused dQ needs the flex dK / dV kernel and the fused dQ, each of which needs the plain kernel)
_BASE = {"gluon_flex_forward": ("gluon_forward",), "gluon_flex_dkdv": ("gluon_dkdv",),
         "gluon_dkdv_fused_dq": ("gluon_dkdv",), "gluon_flex_dkdv_fused_dq": ("gluon_flex_dkdv", "gluon_dkdv_fused_dq"),
         "gluon_flex_lists_forward": ("gluon_forward",), "gluon_flex_lists_dkdv": ("gluon_dkdv",),
         "gluon_flex_lists_dkdv_fused_dq": ("gluon_flex_lists_dkdv", "gluon_dkdv_fused_dq")}
_failed: dict[str, str] = {}  # kernel -> why it is off in this process (a build failed)


def experimental_status() -> dict[str, str]:
    """kernel name -> "available on sm_90 GPUs" or "off: <why>" for this process."""
    status = {}
    for name in EXPERIMENTAL:
        why = GLUON_ERROR or next((_failed[n] for n in _CHAINS[name] if n in _failed), None)
        status[name] = f"off: {why}" if why else "available on sm_90 GPUs"
    return status


def _chain(name: str):
    """``name`` and every kernel it builds on (``_BASE``, followed to the end), nearest first."""
    seen, todo = set(), [name]
    while todo:
        name = todo.pop(0)
        if name not in seen:
            seen.add(name)
            yield name
            todo.extend(_BASE.get(name, ()))


_CHAINS = {name: tuple(_chain(name)) for name in EXPERIMENTAL}  # (asked on every launch: walked once here)


def gluon_kernels():
    """The modules of the Gluon kernels, ``(ws, ws_bwd)``, or ``(None, None)`` where Gluon does
    not import or they fail to (then ``GLUON_ERROR`` says why)."""
    global GLUON_ERROR
    if GLUON_ERROR is not None:
        return None, None
    try:
        from . import ws, ws_bwd
    except Exception as e:  # noqa: BLE001 - a Gluon API this Triton lacks: the core serves every call
        GLUON_ERROR = f"the Gluon kernels do not import on Triton {triton.__version__}: {type(e).__name__}: {e}"
        return None, None
    return ws, ws_bwd


def usable(name: str) -> bool:
    return GLUON_ERROR is None and not any(n in _failed for n in _CHAINS[name])


def run_experimental(name: str, launch, *args, **kwargs) -> bool:
    """Run ``launch(*args, **kwargs)`` for the experimental kernel ``name``; True if it ran. If it raises
    (its build failed on this Triton), the kernel is turned off for the process with one warning
    naming it and the versions, and False tells the caller to serve the call with the core. The
    launch writes nothing before it compiles, so the core's result is the whole answer."""
    if not usable(name):
        return False
    try:
        launch(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise  # not a build failure: the core would need the memory too
    except Exception as e:  # noqa: BLE001 - any build failure: the core serves, correctness first
        _failed[name] = f"failed to build on Triton {triton.__version__} (torch {torch.__version__}): " \
                        f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"attend: the experimental {EXPERIMENTAL[name]} {_failed[name]}; attend's Triton core serves "
                      "these calls instead", RuntimeWarning, stacklevel=3)
        return False
    return True

"""Triton compiles in forked processes: a warmup's kernels build beside the caller's own compile
instead of taking turns with it on the GIL.

Triton's compiler holds the GIL through its AST-to-IR pass, in Python: about 0.77 of the 1.83 s
that the causal Gluon dK / dV kernel takes for sm_90 on a 2-core CPU (its MLIR and LLVM passes and
ptxas release it). Threads take turns on that part, and on a GIL that the caller's own Python
wants too. The causal Gluon forward and dK / dV kernels for sm_90 on a 2-core CPU (Triton 3.6,
2026-12-06): 2.59 s one after the other, 1.80 s on two threads, 1.30 s in two forked children
(each kernel handed back through the cache). A new mod's first forward + backward compiles three
kernels.

``compiling_elsewhere()`` turns it on for the calling thread. Inside, each compile that Triton's JIT
starts there goes through Triton's async-compile hook (``versions.ASYNC_COMPILE``) to
``ForkExecutor``: a child forked from this thread runs the compile, which writes Triton's on-disk
cache, and exits; then, on a reaper thread, the parent runs the very same compile, which is now a
cache hit (a read of a few files). Leaving the block waits for every compile started in it and puts
each kernel in its JIT cache, as a compile on the thread would. The JIT hashes the kernel's source
before it submits the compile, so parent and child agree on the cache key (a hash first computed in
the child can differ: Triton caches its dependencies' keys per process).

Nothing depends on the child: where it fails, cannot fork, or looks hung (``_wait``), the
parent's compile does the whole work (and raises the compiler's own error, if there is one). The
child touches no CUDA and runs no code but Triton's compiler (a forked child of a CUDA process may
not use CUDA); it exits by ``os._exit``, running no handler of the parent's.

Where it is off: no ``os.fork`` (Windows), no async-compile hook in the installed Triton, Triton told
to always compile (no disk cache to hand the kernel back through), and
``KernelOptions.compile_fork`` off.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import signal
import threading
import time
import warnings
from typing import Callable, Iterator

from triton import knobs

from .versions import ASYNC_COMPILE

# A child that has not exited after CHILD_TIMEOUT_S, and used less than a tenth of that in CPU time
# over the last such interval (with its own children: ptxas), is taken for hung: it is killed, with
# its descendants, and the parent compiles instead. A compile that hangs must cost time, never the
# call. A child holds a copy of every lock as it was at the fork, and Triton releases the GIL through
# its MLIR / LLVM passes, so a thread of the user's compiling at that moment could leave one taken; a
# child stuck on a lock sleeps. attend's own threads are not: the forward waits for the warmup's forks
# before it compiles. A child still computing is left to finish, up to CHILD_LIMIT_S (a runaway
# build's bound): killing a long build would make the parent start it over. Builds grow with the
# tile's area where fp32 dots run in IEEE precision (docs/kernels.md, "Tuning: fp32 with IEEE
# dots": 11 s for the shipped backward on the 2-core CPU, a minute at 64x64). Where the CPU time
# cannot be read (no /proc), CHILD_TIMEOUT_S alone decides. The flex backward's largest bf16 build
# takes about 3 s on the 2-core CPU; a hung child costs the first backward CHILD_TIMEOUT_S.
CHILD_TIMEOUT_S = 30.0
CHILD_LIMIT_S = 600.0

# What the children did in this process: "forked", "built" (the child exited cleanly; the parent's
# compile then finds its kernel in the cache), "failed" (the parent compiled itself). Tests and
# benchmarks read it.
COUNTS = {"forked": 0, "built": 0, "failed": 0}
_COUNTS_LOCK = threading.Lock()

# Python 3.12+ warns that a fork beside live threads may deadlock the child: the child runs only the
# compiler, and CHILD_TIMEOUT_S bounds a hang. Filtered for this module's fork alone, once (a
# catch_warnings around each fork would race with other threads' filters).
warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning,
                        module=__name__)


def available() -> bool:
    """Whether compiles can be handed to forked children here (see the module docstring)."""
    return hasattr(os, "fork") and ASYNC_COMPILE is not None and not knobs.compilation.always_compile


def _count(what: str) -> None:
    with _COUNTS_LOCK:
        COUNTS[what] += 1


class ForkExecutor(concurrent.futures.Executor):
    """An executor for Triton's async-compile hook: each ``submit(compile_fn)`` forks a child that
    runs ``compile_fn`` and exits; the returned Future resolves to ``compile_fn()`` run again in the
    parent once the child is gone (a disk-cache hit where the child succeeded)."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        work = lambda: fn(*args, **kwargs)  # noqa: E731
        pid = _fork(work)
        try:
            threading.Thread(target=_reap, args=(pid, work, fut), daemon=True, name="attend-compile-reaper").start()
        except RuntimeError:  # no thread (a limit, or the interpreter shutting down): reap here
            _reap(pid, work, fut)
        return fut


def _fork(work: Callable[[], object]) -> int | None:
    """Fork a child that runs ``work`` and exits (0 where it returned); its pid, or None where the
    fork failed (then the parent does the work)."""
    try:
        pid = os.fork()
    except OSError:  # no memory for the child's page tables, a process limit
        return None
    if pid == 0:  # the child: compile, and leave without running anything of the parent's
        code = 1
        try:
            _quiet_child()
            work()
            code = 0
        except BaseException:  # noqa: BLE001 - the parent's compile reports the error
            pass
        finally:
            os._exit(code)
    _count("forked")
    return pid


def _quiet_child() -> None:
    """In a forked child: no Python signal handler of the parent's (a checkpoint on SIGTERM, a
    KeyboardInterrupt) and no collection of the parent's garbage (finalizers of its files and
    tensors) runs here. A signal then ends the child; the parent compiles instead."""
    gc.disable()
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)


def _reap(pid: int | None, work: Callable[[], object], fut: concurrent.futures.Future) -> None:
    """Wait for child ``pid`` (killed where ``_wait`` takes it for hung), then resolve ``fut`` with ``work()``
    run here: a cache hit where the child built the kernel, the whole compile where it did not.
    ``fut`` is resolved whatever happens while waiting."""
    try:
        if pid is not None:
            _count("built" if _wait(pid, CHILD_TIMEOUT_S) else "failed")
    except BaseException:  # noqa: BLE001 - the child is the parent's to redo, not to fail on
        _count("failed")
    finally:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(work())
            except BaseException as e:  # noqa: BLE001 - the compile's own error, for whoever waits
                fut.set_exception(e)


def _wait(pid: int, timeout: float) -> bool:
    """Whether child ``pid`` exited with status 0: killed, with its descendants, where it looks hung,
    that is past ``timeout`` seconds with less than a tenth of that in CPU time over the last
    ``timeout`` seconds, or at CHILD_LIMIT_S (the module comment above CHILD_TIMEOUT_S)."""
    start = time.monotonic()
    limit = start + CHILD_LIMIT_S
    deadline, cpu = min(start + timeout, limit), _cpu_seconds(pid)
    delay = 0.001
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): its cache entry may be there
            return False
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        now = time.monotonic()
        if now >= deadline:
            used = _cpu_seconds(pid)
            if cpu is not None and used is not None and used - cpu >= 0.1 * timeout and now < limit:
                deadline, cpu = min(now + timeout, limit), used  # still computing: another interval
                continue
            for p in [pid] + _descendants(pid):  # (ptxas, where the child was in it)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)


def _descendants(pid: int) -> list[int]:
    """The live descendants of process ``pid``, parents before their children, from Linux's
    /proc/<pid>/task/<tid>/children; empty where that cannot be read."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", "rb") as f:
                    kids = [int(c) for c in f.read().split()]
                out += kids
                todo += kids
        except (OSError, ValueError):  # gone, or no such file (a kernel built without it)
            continue
    return out


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds used by process ``pid`` and its live descendants (ptxas, under the compile), from
    Linux's /proc; None where ``pid``'s own entry cannot be read. The descendants are read before
    ``pid``, children before their parents: one that exits meanwhile moves its time to its parent's
    waited-for children's, read after it, so a race counts time twice, never drops it."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for p in reversed([pid] + _descendants(pid)):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime (stat fields 14-17)
        except (OSError, ValueError, IndexError):
            if p == pid:
                return None
    return total / tick


@contextlib.contextmanager
def compiling_elsewhere(enabled: bool = True) -> Iterator[bool]:
    """On this thread, hand each compile Triton's JIT starts to a forked child (``ForkExecutor``);
    yields whether it does (``enabled`` and ``available()``; otherwise compiles run here as usual).
    Leaving waits for those compiles and caches their kernels, raising the first compile error.
    The thread's async-compile mode is cleared however the block ends (Triton 3.6's mode, leaving on
    a failed compile, raises before it clears itself, and a pool thread would keep it)."""
    if not (enabled and available()):
        yield False
        return
    mode = ASYNC_COMPILE.AsyncCompileMode(ForkExecutor())
    try:
        with mode:
            yield True
    finally:
        if ASYNC_COMPILE.active_mode.get() is mode:
            ASYNC_COMPILE.active_mode.set(None)

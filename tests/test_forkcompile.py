"""Compiles in forked children (``attend.kernels.forkcompile``): the child builds the kernel into
Triton's disk cache and the parent's own compile then finds it there; a child that fails, hangs or
cannot fork leaves the whole compile to the parent. Runs on the CPU: the kernels compile for an
sm_90 target, which needs no GPU, in a process of their own (compiling needs real JIT functions, not
the interpreter's that the suite runs with)."""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attend.kernels import forkcompile, versions


@triton.jit
def _scale(x_ptr, n, C: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * C, mask=offs < n)


@triton.jit
def _broken(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), undefined_name)  # noqa: F821 - a compile error on purpose


def _compile(fn):
    """An sm_90 compile of ``fn``, new to any cache (a random constant), as Triton's JIT would start it."""
    if fn is _scale:
        constexprs = {"C": random.random(), "BLOCK": 128}
        sig = {"x_ptr": "*fp32", "n": "i32", "C": "constexpr", "BLOCK": "constexpr"}
    else:
        constexprs, sig = {"BLOCK": 128}, {"x_ptr": "*fp32", "BLOCK": "constexpr"}
    src = ASTSource(fn, sig, constexprs=constexprs)
    # Triton's JIT hashes the source before handing the compile to an executor, so a child
    # inherits the hash (computed in the child, a kernel's hash can differ with what the parent
    # hashed before: Triton caches its dependencies' keys in each process)
    src.hash()
    return lambda: triton.compile(src, target=GPUTarget("cuda", 90, 32))


def _scenarios() -> dict:
    """Each scenario's observations, in this process (real JIT functions, an empty cache)."""
    seen = []  # the parent's compiles: (cache_hit, pid)
    knobs.compilation.listener = lambda *, cache_hit, **_: seen.append((cache_hit, os.getpid()))
    counts = lambda: dict(forkcompile.COUNTS)
    res = {"pid": os.getpid()}

    before = counts()
    kernel = forkcompile.ForkExecutor().submit(_compile(_scale)).result(timeout=120)
    res["one"] = dict(seen=list(seen), before=before, after=counts(), entry=".visible .entry _scale" in
                      kernel.asm["ptx"], cubin=len(kernel.asm["cubin"]))

    seen.clear()
    ex = forkcompile.ForkExecutor()
    futs = [ex.submit(_compile(_scale)) for _ in range(3)]
    res["three"] = dict(hashes=len({f.result(timeout=180).hash for f in futs}), seen=list(seen))

    before = counts()
    try:
        forkcompile.ForkExecutor().submit(_compile(_broken)).result(timeout=120)
        res["broken"] = dict(error=None)
    except Exception as e:  # noqa: BLE001 - reported to the test
        res["broken"] = dict(error=f"{type(e).__name__}: {e}", before=before, after=counts())

    seen.clear()
    fork = os.fork

    def refuse():
        raise OSError(12, "Cannot allocate memory")

    os.fork, before = refuse, counts()
    try:
        kernel = forkcompile.ForkExecutor().submit(_compile(_scale)).result(timeout=120)
    finally:
        os.fork = fork
    res["no_fork"] = dict(seen=list(seen), before=before, after=counts(), cubin=len(kernel.asm["cubin"]))

    parent = os.getpid()

    def hang():
        if os.getpid() != parent:  # the child hangs
            time.sleep(60)
        return "parent's"

    forkcompile.CHILD_TIMEOUT_S, before, t = 0.3, counts(), time.perf_counter()
    out = forkcompile.ForkExecutor().submit(hang).result(timeout=30)
    res["hung"] = dict(out=out, s=time.perf_counter() - t, before=before, after=counts())

    # a child that computes past CHILD_TIMEOUT_S (itself, or in a process of its own, as ptxas) is
    # left to finish, up to CHILD_LIMIT_S
    spin = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < {s}:\n    pass\n"

    def busy(grandchild: bool, seconds: float):
        def work():
            if os.getpid() != parent:
                if grandchild:
                    subprocess.run([sys.executable, "-c", spin.format(s=seconds)], check=True)
                else:
                    exec(spin.format(s=seconds), {})
            return "parent's"
        return work

    for name, grandchild, seconds, limit in (("busy", False, 1.5, 600.0), ("busy_grandchild", True, 1.5, 600.0),
                                             ("past_limit", False, 20.0, 1.0)):
        forkcompile.CHILD_LIMIT_S, before, t = limit, counts(), time.perf_counter()
        out = forkcompile.ForkExecutor().submit(busy(grandchild, seconds)).result(timeout=60)
        res[name] = dict(out=out, s=time.perf_counter() - t, before=before, after=counts())
    # a hung child's own children (ptxas) go with it
    pid_file = os.path.join(os.environ["TRITON_CACHE_DIR"], "grandchild.pid")

    def hung_with_a_grandchild():
        if os.getpid() != parent:
            kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            with open(pid_file, "w") as f:
                f.write(str(kid.pid))
            time.sleep(60)
        return "parent's"

    forkcompile.CHILD_LIMIT_S = 600.0
    out = forkcompile.ForkExecutor().submit(hung_with_a_grandchild).result(timeout=60)
    with open(pid_file) as f:
        kid = int(f.read())
    time.sleep(0.5)
    try:
        with open(f"/proc/{kid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    res["hung_grandchild"] = dict(out=out, state=state)
    forkcompile.CHILD_TIMEOUT_S, forkcompile.CHILD_LIMIT_S = 30.0, 600.0

    # the parent's Python signal handlers do not run in a child: SIGTERM ends it, the parent redoes
    marker = os.path.join(os.environ["TRITON_CACHE_DIR"], "handler-ran")
    signal.signal(signal.SIGTERM, lambda *_: open(marker, "w").close())

    def terminated():
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return "parent's"

    before = counts()
    out = forkcompile.ForkExecutor().submit(terminated).result(timeout=30)
    res["signal"] = dict(out=out, handler_ran=os.path.exists(marker), before=before, after=counts())

    # no reaper thread can start: the submitting thread reaps
    start = threading.Thread.start

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    threading.Thread.start = no_thread
    try:
        out = forkcompile.ForkExecutor().submit(lambda: "reaped inline").result(timeout=30)
    finally:
        threading.Thread.start = start
    res["no_thread"] = dict(out=out)
    return res


@pytest.fixture(scope="module")
def observed():
    if not forkcompile.available():
        pytest.skip("no os.fork or no async-compile hook in the installed Triton")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache)
        res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_the_child_builds_and_the_parent_loads_from_the_cache(observed):
    one = observed["one"]
    assert one["seen"] == [[True, observed["pid"]]]  # the parent's one compile was a cache hit
    assert one["after"]["forked"] == one["before"]["forked"] + 1
    assert one["after"]["built"] == one["before"]["built"] + 1
    assert one["entry"] and one["cubin"] > 0


def test_side_by_side_compiles_each_come_back(observed):
    assert observed["three"]["hashes"] == 3
    assert [hit for hit, _ in observed["three"]["seen"]] == [True] * 3


def test_a_compile_error_is_the_parents_own(observed):
    broken = observed["broken"]
    assert broken["error"] is not None and broken["error"].startswith("CompilationError")
    assert "undefined_name" in broken["error"]
    assert broken["after"]["failed"] == broken["before"]["failed"] + 1


def test_no_fork_compiles_in_the_parent(observed):
    no_fork = observed["no_fork"]
    assert no_fork["seen"] == [[False, observed["pid"]]] and no_fork["cubin"] > 0
    assert no_fork["after"] == no_fork["before"]


def test_a_hung_child_is_killed_and_the_parent_does_the_work(observed):
    hung = observed["hung"]
    assert hung["out"] == "parent's" and hung["s"] < 10
    assert hung["after"]["failed"] == hung["before"]["failed"] + 1


@pytest.mark.parametrize("name", ["busy", "busy_grandchild"])
def test_a_child_still_computing_is_left_to_finish(observed, name):
    """A long compile is not a hang: the child (or its ptxas) uses CPU, so it outlives
    CHILD_TIMEOUT_S (0.3 s here) and builds, instead of being killed and started over."""
    busy = observed[name]
    assert busy["out"] == "parent's" and busy["s"] >= 1.4
    assert busy["after"]["built"] == busy["before"]["built"] + 1
    assert busy["after"]["failed"] == busy["before"]["failed"]


def test_a_child_past_the_limit_is_killed(observed):
    past = observed["past_limit"]
    assert past["out"] == "parent's" and 1.0 <= past["s"] < 10  # CHILD_LIMIT_S 1 s: not the 0.3 s timeout,
    # nor the child's 20 s
    assert past["after"]["failed"] == past["before"]["failed"] + 1


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the processes from Linux's /proc")
def test_a_hung_childs_own_children_are_killed_with_it(observed):
    hung = observed["hung_grandchild"]
    assert hung["out"] == "parent's" and hung["state"] in ("gone", "Z"), hung  # dead (a zombie until reaped)


def test_a_signal_ends_the_child_and_not_the_parents_handler(observed):
    sig = observed["signal"]
    assert sig["out"] == "parent's" and not sig["handler_ran"]
    assert sig["after"]["failed"] == sig["before"]["failed"] + 1


def test_no_reaper_thread_reaps_on_the_submitting_thread(observed):
    assert observed["no_thread"]["out"] == "reaped inline"


@pytest.mark.skipif(not forkcompile.available(), reason="no os.fork or no async-compile hook in the installed Triton")
def test_compiling_elsewhere_is_off_where_it_cannot_hand_kernels_back(monkeypatch):
    active = versions.ASYNC_COMPILE.active_mode
    with forkcompile.compiling_elsewhere(enabled=False) as on:
        assert not on and active.get() is None
    monkeypatch.setattr(knobs.compilation, "always_compile", True)  # no cache hit to hand a kernel back
    with forkcompile.compiling_elsewhere() as on:
        assert not on and active.get() is None
    monkeypatch.undo()
    with forkcompile.compiling_elsewhere() as on:
        assert on and isinstance(active.get(), versions.ASYNC_COMPILE.AsyncCompileMode)
    assert active.get() is None


@pytest.mark.skipif(not forkcompile.available(), reason="no os.fork or no async-compile hook in the installed Triton")
def test_a_failed_compile_leaves_the_thread_without_a_mode():
    """Triton 3.6's mode raises a failed compile's error before it clears itself: a warmup thread of
    the pool would keep it, and refuse every later warmup. compiling_elsewhere clears it."""
    active = versions.ASYNC_COMPILE.active_mode

    def fail():
        raise ValueError("a compile error")

    with pytest.raises(ValueError, match="a compile error"):
        with forkcompile.compiling_elsewhere():
            mode = active.get()
            extra = len(inspect.signature(mode.submit).parameters) - 3  # Triton 3.9 adds a cleanup callback
            mode.submit("key", fail, lambda kernel: None, *[lambda f: None] * extra)
    assert active.get() is None
    with forkcompile.compiling_elsewhere() as on:  # and the thread can start another
        assert on


if __name__ == "__main__":
    print(json.dumps(_scenarios()))

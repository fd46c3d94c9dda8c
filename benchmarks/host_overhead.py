"""Host time per call of attend's layers next to PyTorch's, on a shape too small for the GPU to
matter (B=1, H=2, S=128, D=128, bf16, causal): what a call costs before the GPU has work. When
it exceeds the kernels' time (the S=1024 rows of the bench), the bench measures the host.

The decode rows time one KV-cache decode step's attention call as a 32-head GQA model makes it
(query (1, 32, 1, 128) a view of the (1, 1, 32 * 128) projection, key / value (1, 8, 256, 128),
bf16), without a mask and with a bool key-padding mask (1, 1, 1, 256): through attend's dispatcher,
through the transformers integration's attention function (as ``attn_implementation="attend"``
calls it, mask as ``mask_for_attend`` builds it) and, for comparison, PyTorch's SDPA and
transformers' ``sdpa`` attention function. Generation at this size is host-bound
(benchmarks/RESULTS.md, Models), so these rows are what a decode step's attention costs; the
flex row is Gemma 2's call (a softcap over a causal band, through ``attend.flex_attention``).
The "growing S" rows time a decode loop's call, whose key length grows by one per call, as the
models bench's Gemma 2 makes it, next to eager's ops and transformers' sdpa function.

    PYTHONPATH=src python benchmarks/host_overhead.py
    PYTHONPATH=src python benchmarks/host_overhead.py --profile "FLASH forward (no grad)"
    PYTHONPATH=src python benchmarks/host_overhead.py --parts

``--parts`` times each part of one Gluon forward launch on its own (S=1024's route, Hopper only): the
whole SDPA call (on FLASH, and in the default order), ``launch.forward`` with the launch stubbed, the direct launcher's key, Triton's
launcher (with its per-call TMA encoding), the descriptors, and the tensors a call allocates.

``--profile PATTERN`` times only the calls whose names match PATTERN (a regular expression), then runs each under
``cProfile`` and prints the functions that hold its host time (own time, per call), to find
what to cut. The S=1024 row's call takes the route of the bench's S=1024 cells (the persistent
Gluon forward on Hopper) at a size whose kernel takes a few microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import itertools
import pstats
import re
import time

import torch

import attend
from attend import bench
from attend._child import row_toolchain
from attend._layout import Band
from attend.kernels import launch

SCALE = 128 ** -0.5


def host_us(fn, n: int = 200, reps: int = 5) -> float:
    """Best-of-``reps`` mean host time of ``fn`` over ``n`` back-to-back calls (no sync inside)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return best


CAUSAL = Band.causal()


def profile(name: str, fn, n: int = 2000, top: int = 25) -> None:
    """``fn``'s host time under cProfile over ``n`` calls: the ``top`` functions by own time, in us per call."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, fn): (calls, ncalls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"\n{name}: cProfile, {n} calls (profiled time is inflated; the order is what counts)")
    print("| function | calls per call | own us | cumulative us |\n|---|---|---|---|")
    for (file, line, func), (_, ncalls, own, cum, _) in rows:
        where = f"{file.rsplit('/', 2)[-2]}/{file.rsplit('/', 1)[-1]}:{line}" if "/" in file else file
        print(f"| {func} ({where}) | {ncalls / n:.1f} | {own / n * 1e6:.2f} | {cum / n * 1e6:.2f} |")


def launch_parts() -> None:
    """``--parts``: each part of the Gluon forward's launch at B=1, H=2, S=1024, D=128, bf16, causal."""
    from triton.backends.nvidia.driver import make_tensordesc_arg
    from triton.runtime import driver

    from attend.kernels import ws, ws_common

    q, k, v = (torch.randn(1, 2, 1024, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    fwd = lambda: launch.forward(q, k, v, None, 0.0, CAUSAL, SCALE, 0)  # noqa: E731
    fwd()
    lau = ws._LAUNCH
    if not lau.cache:
        print("(no Gluon forward launched: --parts needs an sm_90 GPU)")
        return
    seen = {}
    ws._LAUNCH = lambda grid, args, ce, nw, ns: seen.update(grid=grid, args=args, ce=ce, nw=nw, ns=ns)
    try:
        stubbed = host_us(fwd, n=2000)
    finally:
        ws._LAUNCH = lau
    args = lau.ordered(seen["args"])
    compiled = lau.cache[next(iter(lau.cache))]
    tail = tuple([{**lau.defaults, **seen["ce"]}[n] for n in lau.constexpr_names])
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    descs = [a for a in args if type(a).__name__ == "TensorDescriptor"]
    meta = getattr(compiled.metadata, "tensordesc_meta", None) or [None] * len(descs)
    extra = (None,) * (len(inspect.signature(make_tensordesc_arg).parameters) - 2)  # Triton 3.9 takes a third
    sdpa = lambda: attend.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    rows = {
        "attend SDPA, no grad, FLASH (the whole call)": sdpa,
        "attend SDPA, no grad, the default order (cuDNN first on Hopper)": sdpa,
        "launch.forward": fwd,
        "launch.forward, the launch stubbed": None,
        "Launcher (key, lookup, Triton's launcher)": lambda: lau(seen["grid"], seen["args"], seen["ce"], seen["nw"],
                                                                 seen["ns"]),
        "Launcher's key": lambda: lau._key(args),
        "Triton's launcher (compiled.run, TMA encoding included)": lambda: compiled.run(
            seen["grid"][0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail),
        f"TMA encoding of the {len(descs)} descriptors (make_tensordesc_arg)": lambda: [
            make_tensordesc_arg(d, m, *extra) for d, m in zip(descs, meta)],
        "current device and stream": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        "one descriptor (ws_common.descriptor)": lambda: ws_common.descriptor(q, 128, 128),
        "torch.zeros(1) (a counter)": lambda: torch.zeros(1, dtype=torch.int32, device="cuda"),
        "torch.empty of out and lse": lambda: (torch.empty_like(q), torch.empty(1, 2, 1024, device="cuda")),
        "torch flash SDPA, no grad (the whole call)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True),
    }
    print("| part | host us |\n|---|---|")
    for name, fn in rows.items():
        with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION) if "FLASH" in name else contextlib.nullcontext():
            print(f"| {name} | {stubbed if fn is None else host_us(fn, n=2000):.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None, help="time and cProfile only the calls whose names match this regular expression")
    ap.add_argument("--parts", action="store_true", help="time each part of one Gluon forward launch")
    opts = ap.parse_args()
    pattern = opts.profile
    if opts.parts:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, attend {attend.__version__}")
        launch_parts()
        return
    q, k, v = (torch.randn(1, 2, 128, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, lse = launch.forward(qd, kd, vd, None, 0.0, CAUSAL, SCALE, 0)
    q1k, k1k, v1k = (torch.randn(1, 2, 1024, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))

    def fwd_bwd(fn):
        def step():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v, True, 1).backward(dout)
        return step

    cases = {
        "attend launch.forward": lambda: launch.forward(qd, kd, vd, None, 0.0, CAUSAL, SCALE, 0),
        "attend launch.backward": lambda: launch.backward(dout, qd, kd, vd, out, lse, None, 0.0, CAUSAL, SCALE, 0, False),
        "attend FLASH forward (no grad)": lambda: bench.IMPLS["attend"](qd, kd, vd, True, 1),
        "attend FLASH forward (no grad), S=1024": lambda: bench.IMPLS["attend"](q1k, k1k, v1k, True, 1),
        "attend FLASH forward+backward": fwd_bwd(bench.IMPLS["attend"]),
        "torch flash forward (no grad)": lambda: bench.IMPLS["torch-flash"](qd, kd, vd, True, 1),
        "torch flash forward+backward": fwd_bwd(bench.IMPLS["torch-flash"]),
        "torch flash forward (no grad), S=1024": lambda: bench.IMPLS["torch-flash"](q1k, k1k, v1k, True, 1),
        "flex compiled forward+backward": fwd_bwd(bench.IMPLS["flex-compiled"]),
    }
    cases.update(decode_cases())
    cases.update(growing_cases())
    if pattern is not None:
        cases = {name: fn for name, fn in cases.items() if re.search(pattern, name)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, attend {attend.__version__}")
    print("| call | host us |\n|---|---|")
    for name, fn in cases.items():
        with _toolchain(name):
            print(f"| {name} | {host_us(fn, n=500):.1f} |", flush=True)
    if pattern is not None:
        for name, fn in cases.items():
            with _toolchain(name):
                profile(name, fn)


def _toolchain(name: str):
    """The row's toolchain: attend's calls build with the ptxas the script started with, after
    compiled flex's row too."""
    return row_toolchain("attend" if re.search(r"\battend\b", name) else name)


def flex_decode(q, k, v):
    """attend.flex_attention as a decode step calls it: a softcap score_mod over a causal mask of the
    one query at the end of the keys, the BlockMask made once (as the integration's cache keeps it)."""
    from attend.flex_attention import create_block_mask, flex_attention

    L, S = q.shape[2], k.shape[2]
    cap, off = 50.0, S - L

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + off  # noqa: E731
    bm = create_block_mask(causal, None, None, L, S, device=q.device)
    return lambda: flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True)


def _attention_functions(groups: int):
    """(transformers' sdpa attention function, attend's, an attention module as both read it:
    causal, ``groups`` query heads per key head), or None without transformers (said once)."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from attend.integrations.transformers import attention_forward
    except ImportError as e:
        print(f"(no transformers rows: {e})")
        return None

    class Layer(torch.nn.Module):  # what the attention functions read of the attention module
        is_causal = True
        num_key_value_groups = groups

    return sdpa_attention_forward, attention_forward, Layer().eval()


def decode_cases() -> dict:
    """One decode step's attention call (B=1, Hq=32, Hk=8, L=1, S=256, D=128, bf16), each way it is made."""
    B, Hq, Hk, S, D = 1, 32, 8, 256, 128
    torch.manual_seed(0)
    q = torch.randn(B, 1, Hq * D, dtype=torch.bfloat16, device="cuda").view(B, 1, Hq, D).transpose(1, 2)
    k, v = (torch.randn(B, Hk, S, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    keys = torch.rand(B, 1, 1, S, device="cuda") > 0.1  # key padding: a left-padded batch row
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cases = {
        "decode: torch SDPA": lambda: sdpa(q, k, v, enable_gqa=True),
        "decode: attend SDPA": lambda: attend.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "decode, padding mask: torch SDPA": lambda: sdpa(q, k, v, attn_mask=keys, enable_gqa=True),
        "decode, padding mask: attend SDPA": lambda: attend.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                                                                         enable_gqa=True),
        # Gemma 2's decode call: a softcap score_mod over a causal band (the band hooks)
        "decode: attend flex_attention, softcap + causal": flex_decode(q, k, v),
    }
    fns = _attention_functions(Hq // Hk)
    if fns is None:
        return cases
    sdpa_attention_forward, attention_forward, layer = fns
    scaling = D ** -0.5
    cases.update({
        "decode: transformers sdpa attention function": lambda: sdpa_attention_forward(layer, q, k, v, None,
                                                                                       scaling=scaling),
        "decode: attend attention function": lambda: attention_forward(layer, q, k, v, None, scaling=scaling),
        "decode, padding mask: transformers sdpa attention function": lambda: sdpa_attention_forward(
            layer, q, k, v, keys, scaling=scaling),
        "decode, padding mask: attend attention function": lambda: attention_forward(layer, q, k, v, keys,
                                                                                     scaling=scaling),
    })
    return cases


def _plans_off(fn, *args, **kwargs):
    """``fn`` with KernelOptions.flex_plans off: every flex call takes the full path (_flex/plan.py)."""
    from attend.kernels import options

    global _OFF
    if _OFF is None:
        _OFF = options.current().replace(flex_plans=False)
    with options.use(_OFF):
        return fn(*args, **kwargs)


_OFF = None


def growing_cases() -> dict:
    """A decode loop's attention call as the models bench's Gemma 2 makes it (B=2, Hq=16, Hk=4, L=1,
    D=128, bf16, softcap 50), its key length one longer at each call (1024 to 1413, then again):
    through attend's transformers attention function (a flex call per layer and token), the same
    function without the softcap (SDPA), transformers' sdpa attention function (which drops the
    softcap) and eager's ops (repeated K / V, two matmuls, the softcap, a float softmax). The flex
    call also with its decode plans off (the options block's own cost, a context variable set, included),
    and with a left-padded batch's key vector, new at each step and shared by 4 calls (a step's layers)."""
    B, Hq, Hk, D, S0, n = 2, 16, 4, 128, 1024, 390
    torch.manual_seed(0)
    q = torch.randn(B, 1, Hq * D, dtype=torch.bfloat16, device="cuda").view(B, 1, Hq, D).transpose(1, 2)
    kc, vc = (torch.randn(B, Hk, S0 + n, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    scaling, cap = D ** -0.5, 50.0

    def growing(call):
        lengths = itertools.cycle(range(S0, S0 + n))

        def step():
            S = next(lengths)
            return call(kc[:, :, :S], vc[:, :, :S])
        return step

    def eager(k, v):
        k, v = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
        s = torch.tanh((q @ k.transpose(-1, -2)) * scaling / cap) * cap
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    keys = torch.ones(B, 1, 1, S0 + n, dtype=torch.bool, device="cuda")
    keys[1, ..., :100] = False  # row 1 left-padded

    def padded(call, layers: int = 4):
        """As ``growing``, with a left-padded batch's key vector (mask_for_attend's form): a new mask
        tensor per step, shared by the step's ``layers`` calls, as a model's layers share it."""
        lengths = itertools.cycle(range(S0, S0 + n))
        state = {"calls": 0}

        def step():
            if state["calls"] % layers == 0:
                state["S"] = S = next(lengths)
                state["mask"] = keys[..., :S].clone()
            state["calls"] += 1
            S = state["S"]
            return call(kc[:, :, :S], vc[:, :, :S], state["mask"])
        return step

    cases = {"decode, growing S: eager ops with the softcap": growing(eager)}
    fns = _attention_functions(Hq // Hk)
    if fns is None:
        return cases
    sdpa_attention_forward, attention_forward, layer = fns
    cases.update({
        "decode, growing S, key padding: attend attention function, softcap (flex)": padded(
            lambda k, v, m: attention_forward(layer, q, k, v, m, scaling=scaling, softcap=cap)),
        "decode, growing S, key padding: transformers sdpa attention function (no softcap)": padded(
            lambda k, v, m: sdpa_attention_forward(layer, q, k, v, m, scaling=scaling)),
        "decode, growing S: attend attention function, softcap (flex)": growing(
            lambda k, v: attention_forward(layer, q, k, v, None, scaling=scaling, softcap=cap)),
        "decode, growing S: attend attention function, softcap (flex), decode plans off": growing(
            lambda k, v: _plans_off(attention_forward, layer, q, k, v, None, scaling=scaling, softcap=cap)),
        "decode, growing S: attend attention function, no softcap (SDPA)": growing(
            lambda k, v: attention_forward(layer, q, k, v, None, scaling=scaling)),
        "decode, growing S: transformers sdpa attention function (no softcap)": growing(
            lambda k, v: sdpa_attention_forward(layer, q, k, v, None, scaling=scaling)),
    })
    return cases


if __name__ == "__main__":
    main()

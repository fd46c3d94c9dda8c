"""Flex benchmark: ``attend.flex_attention`` against compiled PyTorch flex, in one process.

``python -m attend bench --suite flex --device cuda`` times, at B=2, H=16, S=8192, D=128 in bf16
(the ``full`` preset), forward and backward (ms, median) of each case for:

- ``attend``: ``attend.flex_attention`` with attend's ``create_block_mask``;
- ``flex-compiled``: ``torch.compile(torch.nn.attention.flex_attention.flex_attention)`` with
  PyTorch's own ``create_block_mask``;
- ``attend-causal-flash`` (the causal case only): attend's ``is_causal`` FLASH, the reference
  the causal mask_mod is held to;
- ``attend-flex-kernel`` (the band cases, causal and the sliding window): attend with
  ``KernelOptions.flex_bands`` off, the core's flex mode where attend's default runs its dense
  kernels over the band (docs/flex.md, "Band masks"). attend's rows say which path ran
  (``path``: band, fused or blocked).

Then, per implementation: the first call (forward + backward) of a mod never seen in the process,
the compiles a new length and a new captured value cost (counted), and for attend
``create_block_mask``'s time and peak memory at 32k and 131072 (causal). A failing peer gives a
row with its error. Rows go to a JSON file, one per case. The ``tiny`` preset (the default on
the CPU; attend under TRITON_INTERPRET=1 there) runs the same code at toy sizes, as a smoke test.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch

from ._child import row_toolchain

PRESETS = {
    "full": dict(B=2, H=16, S=8192, D=128, window=1024, docs=8, prefix=1024, reps=20, mask_lengths=(32768, 131072)),
    "tiny": dict(B=1, H=2, S=64, D=16, window=16, docs=4, prefix=16, reps=1, mask_lengths=(256,)),
}
IMPLS = ("attend", "flex-compiled")
CASES = ("causal", "sliding_window", "document", "prefix_lm", "alibi_causal", "softcap_causal",
         "rel_bias_grad_causal", "alibi_no_mask")
BAND_CASES = ("causal", "sliding_window")  # band mask_mods alone: attend runs them on its dense kernels


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def case_mods(name: str, p: dict, device):
    """(score_mod, mask_mod, captured tensors that require grad) of case ``name``."""
    H, S = p["H"], p["S"]
    slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32, device=device) * 8 / H)
    window, prefix = p["window"], p["prefix"]
    doc = (torch.arange(S, device=device) * p["docs"] // S).view(1, S).expand(p["B"], S).contiguous()

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    if name == "causal":
        return None, _causal, []
    if name == "sliding_window":
        return None, lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= window), []
    if name == "document":
        return None, lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx], []
    if name == "prefix_lm":
        from torch.nn.attention.flex_attention import or_masks

        return None, or_masks(lambda b, h, q_idx, kv_idx: kv_idx < prefix, _causal), []
    if name == "alibi_causal":
        return alibi, _causal, []
    if name == "softcap_causal":
        return softcap, _causal, []
    if name == "rel_bias_grad_causal":
        table = (0.1 * torch.randn(H, 2 * S, device=device)).requires_grad_()
        return (lambda score, b, h, q_idx, kv_idx: score + table[h, q_idx - kv_idx + S]), _causal, [table]
    if name == "alibi_no_mask":
        return alibi, None, []
    raise ValueError(f"case {name!r}: expected one of {', '.join(CASES)}")


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device, reps: int) -> float:
    if str(device).startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=max(reps, 20) * 5, return_mode="median")
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


_COMPILED: dict = {}


def _impl(impl: str):
    """(flex_attention, create_block_mask) of ``impl``."""
    if impl in ("attend", "attend-flex-kernel"):
        import attend.flex_attention as af

        return af.flex_attention, af.create_block_mask
    if impl == "flex-compiled":
        import torch._dynamo
        from torch.nn.attention import flex_attention as tf

        if "fn" not in _COMPILED:
            torch._dynamo.config.cache_size_limit = 1024
            torch._dynamo.config.recompile_limit = 1024
            _COMPILED["fn"] = torch.compile(tf.flex_attention)
        return _COMPILED["fn"], tf.create_block_mask
    raise ValueError(f"impl {impl!r}: expected one of {', '.join(IMPLS)}")


def make_inputs(p: dict, device, dtype, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (p["B"], p["H"], p["S"], p["D"])
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _fwd_bwd(flex, q, k, v, score_mod, block_mask, caps, device, reps: int) -> tuple[float, float]:
    run = lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
    dout = torch.randn_like(q)
    leaves = [q, k, v, *caps]
    with torch.no_grad():
        fwd = median_ms(run, device, reps)

    def step():
        for t in leaves:
            t.grad = None
        run().backward(dout)

    both = median_ms(step, device, reps)
    fwd_graph = median_ms(run, device, reps)
    return fwd, max(both - fwd_graph, 1e-6)


def _compiles(impl: str) -> int:
    """Kernel compiles so far: attend's forward and backward variants, the core's and the Gluon
    kernels' (0 under the interpreter), or dynamo's unique graphs for compiled flex."""
    if impl == "attend":
        from attend.kernels import core, versions

        fns = [core.attn_fwd, core.attn_bwd, *(m for m in versions.gluon_kernels() if m is not None)]
        fns = [getattr(f, "attn_fwd_ws", getattr(f, "attn_bwd_dkdv_ws", f)) for f in fns]
        return sum(len(c[0]) for f in fns for c in getattr(f, "device_caches", {}).values())
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _row(case: str, impl: str, fn) -> dict:
    try:
        with row_toolchain(impl):
            return dict(case=case, impl=impl, **fn())
    except Exception as e:  # a failing peer is a result too (out of memory, a compile error)
        return dict(case=case, impl=impl, error=f"{type(e).__name__}: {str(e)[:500]}")


def run(preset: str = "full", impls=IMPLS, device: str = "cuda", dtype=torch.bfloat16, cases=CASES,
        emit=None) -> list[dict]:
    """Every row, each passed to ``emit`` as soon as it is measured (so a time limit keeps the rows
    done)."""
    p = PRESETS[preset]
    rows = _Rows(emit)
    if "attend" in impls:  # first: cheap, and the target (131072 keys)
        for n in p["mask_lengths"]:
            rows.append(_row(f"create_block_mask_{n}", "attend", lambda n=n: _block_mask_cost(n, device)))
    for case in cases:
        band_kernel = ("attend-flex-kernel",) if "attend" in impls and case in BAND_CASES else ()
        for impl in (*impls, *band_kernel):
            def measure(case=case, impl=impl):
                from attend._flex import dispatch
                from attend.kernels.options import kernel_options

                flex, cbm = _impl(impl)
                score_mod, mask_mod, caps = case_mods(case, p, device)
                bm = None if mask_mod is None else cbm(mask_mod, None, None, p["S"], p["S"], device=device)
                q, k, v = make_inputs(p, device, dtype)
                with kernel_options(flex_bands=impl != "attend-flex-kernel"):
                    before = dict(dispatch.PATHS)
                    for _ in range(2):  # compile / generate outside the timing
                        flex(q, k, v, score_mod=score_mod, block_mask=bm).sum().backward()
                    sync(device)
                    fwd, bwd = _fwd_bwd(flex, q, k, v, score_mod, bm, caps, device, p["reps"])
                row = dict(fwd_ms=fwd, bwd_ms=bwd)
                if impl.startswith("attend"):  # which of attend's paths ran the forward
                    row["path"] = next((k_ for k_ in ("band", "fused", "blocked") if dispatch.PATHS[k_] > before[k_]), "")
                return row
            rows.append(_row(case, impl, measure))
        if case == "causal" and str(device).startswith("cuda"):
            def flash():
                import attend

                q, k, v = make_inputs(p, device, dtype)
                with attend.sdpa_kernel(attend.SDPBackend.FLASH_ATTENTION):
                    run_ = lambda: attend.scaled_dot_product_attention(q, k, v, is_causal=True)
                    fwd, bwd = _fwd_bwd(lambda q, k, v, **kw: run_(), q, k, v, None, None, [], device, p["reps"])
                return dict(fwd_ms=fwd, bwd_ms=bwd)
            rows.append(_row(case, "attend-causal-flash", flash))
    for impl in impls:
        rows.append(_row("first_call_new_mod", impl, lambda impl=impl: _first_call(impl, p, device, dtype)))
        rows.append(_row("compiles_new_length_and_value", impl, lambda impl=impl: _recompiles(impl, p, device, dtype)))
    return list(rows)


class _Rows(list):
    """A list that hands each appended row to ``emit``."""

    def __init__(self, emit):
        super().__init__()
        self.emit = emit

    def append(self, row: dict) -> None:
        super().append(row)
        if self.emit is not None:
            self.emit(row)


def _first_call(impl: str, p: dict, device, dtype) -> dict:
    """Forward + backward of a mod whose structure the process has not used (the constant is runtime
    data, not structure; Triton's disk cache may still hold the kernels from an earlier process:
    benchmarks/flex_first_call.py times it from an empty cache)."""
    flex, cbm = _impl(impl)
    c = float(time.time_ns() % 997 + 3)
    bm = cbm(_causal, None, None, p["S"], p["S"], device=device)
    q, k, v = make_inputs(p, device, dtype)
    sync(device)
    t = time.perf_counter()
    flex(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 0.5 + torch.tanh(s / c), block_mask=bm).sum().backward()
    sync(device)
    return dict(first_call_s=time.perf_counter() - t)


def _recompiles(impl: str, p: dict, device, dtype) -> dict:
    """Compiles caused by a new sequence length, by a new captured value, and by the first length
    whose end is ragged (not a multiple of the tiles: a class of its own, compiled once), counted
    over every kernel (``_compiles``)."""
    flex, cbm = _impl(impl)
    S = p["S"]
    big = S > 1024
    steps = (("warm", S, 1.0), ("new_length", S - 384 if big else S // 2, 1.0),
             ("first_ragged_length", S - 48 if big else S - 8, 1.0),
             ("new_ragged_length", S - 80 if big else S - 24, 1.0), ("new_value", S, 2.0))
    out = {}
    for what, n, scale in steps:
        bias = torch.full((p["H"],), scale, device=device)
        bm = cbm(_causal, None, None, n, n, device=device)
        q, k, v = (t[:, :, :n].detach().contiguous().requires_grad_() for t in make_inputs(p, device, dtype))
        before = _compiles(impl)
        flex(q, k, v, score_mod=lambda s, b, h, qi, ki: s + bias[h], block_mask=bm).sum().backward()
        sync(device)
        if what != "warm":
            out[f"compiles_{what}"] = _compiles(impl) - before
    return out


def _block_mask_cost(n: int, device) -> dict:
    import attend.flex_attention as af

    af.create_block_mask(_causal, None, None, n, n, device=device)  # generated and compiled once
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    af.create_block_mask(_causal, None, None, n, n, device=device)
    sync(device)
    ms = (time.perf_counter() - t) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return dict(ms=ms, peak_mib=peak)


def main(preset: str, impls=IMPLS, json_path: str = "bench_flex.json", device: str = "cuda",
         dtype=torch.bfloat16, cases=CASES) -> list[dict]:
    meta = dict(preset=preset, params=PRESETS[preset], device=str(device), dtype=str(dtype).split(".")[-1],
                torch=torch.__version__, python=platform.python_version())
    if str(device).startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    done = []

    def emit(row: dict) -> None:  # printed and saved as each row finishes
        done.append(row)
        print(json.dumps(row), flush=True)
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=done), f, indent=1)

    return run(preset, impls, device, dtype, cases, emit=emit)

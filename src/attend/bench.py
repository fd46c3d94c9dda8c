"""GPU benchmark: attend's Triton core against PyTorch SDPA (flash, efficient, cuDNN) and
``torch.compile(flex_attention)``, all in one process (DESIGN.md section 4).

Shapes: hidden 2048 (``H = 2048 / D``), 16384 tokens per batch (``B = 16384 / S``). Layouts:
contiguous ``(B, H, S, D)`` tensors, and (``views`` rows) the ``.transpose(1, 2)`` views of
``(B, S, H, D)`` projections that every transformers model passes.
FLOPs: forward ``4*B*H*S*S*D`` (halved when causal), backward 2.5x forward. Decode rows
(L=1) report the bandwidth of reading K and V once. Times are medians of
``triton.testing.do_bench``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import attend

from ._child import row_toolchain

PEERS = ("attend", "torch-flash", "torch-efficient", "torch-cudnn", "flex-compiled")
# attend's own backends and flash implementations, for the every-backend table (--impls backends)
BACKEND_IMPLS = ("attend", "attend-efficient", "attend-cudnn", "attend-fa2", "attend-fa4")


@dataclass
class Row:
    kind: str  # "prefill" or "decode"
    D: int
    S: int
    causal: bool
    gqa: int  # query heads per KV head
    B: int
    H: int
    L: int
    layout: str = "contiguous"  # or "views": (B, H, S, D) views of (B, S, H, D) tensors, as models pass them
    results: dict = field(default_factory=dict)  # impl -> {"fwd": x, "bwd": y} (TFLOP/s or GB/s) or error


def _torch_sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal, gqa):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa > 1)
    return run


def _attend_backend(name: str):
    backend = getattr(attend.SDPBackend, name)

    def run(q, k, v, causal, gqa):
        with attend.sdpa_kernel(backend):
            return attend.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa > 1)
    return run


_attend = _attend_backend("FLASH_ATTENTION")


@contextlib.contextmanager
def _impl_active(impl: str):
    """attend-fa2 / attend-fa4 run attend's FLASH backend with that flash implementation active."""
    name = {"attend-fa2": "FA2", "attend-fa4": "FA4"}.get(impl)
    if name is None:
        yield
        return
    attend.activate_flash_attention_impl(name)
    try:
        yield
    finally:
        attend.restore_flash_attention_impl()

_flex_cache: dict = {}


def _flex(q, k, v, causal, gqa):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex_cache:
        import torch._dynamo

        # One compiled graph per shape, as a user with fixed shapes gets; never the eager fallback.
        torch._dynamo.config.cache_size_limit = 1024
        torch._dynamo.config.recompile_limit = 1024
        _flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        key = (q.shape[-2], k.shape[-2])
        if key not in _flex_cache:
            off = k.shape[-2] - q.shape[-2] if q.shape[-2] == 1 else 0
            _flex_cache[key] = create_block_mask(lambda b, h, i, j: j <= i + off, None, None, *key, device=q.device)
        block_mask = _flex_cache[key]
    return _flex_cache["fn"](q, k, v, block_mask=block_mask, enable_gqa=gqa > 1)


IMPLS = {
    "attend": _attend,
    "attend-efficient": _attend_backend("EFFICIENT_ATTENTION"),
    "attend-cudnn": _attend_backend("CUDNN_ATTENTION"),
    "attend-fa2": _attend,
    "attend-fa4": _attend,
    "torch-flash": _torch_sdpa("FLASH_ATTENTION"),
    "torch-efficient": _torch_sdpa("EFFICIENT_ATTENTION"),
    "torch-cudnn": _torch_sdpa("CUDNN_ATTENTION"),
    "flex-compiled": _flex,
}


def time_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def backward_ms(run, inputs, dout) -> float:
    """Backward time of ``run()`` = (forward with graph + backward) - forward with graph:
    compiled flex frees its saved buffers after one backward, so no retain_graph replays."""
    fwd_graph_ms = time_ms(run, grad_to_none=inputs)
    both_ms = time_ms(lambda: run().backward(dout), grad_to_none=inputs)
    return max(both_ms - fwd_graph_ms, 1e-6)


def _tuned_configs() -> dict:
    """The configs attend's autotuner picked so far, per kernel and key."""
    from attend.kernels import launch

    out = {}
    for name in ("_fwd", "_bwd"):
        tuner = getattr(launch, name)
        out[name.strip("_")] = {str(k): str(v) for k, v in tuner.cache.items()}
    return out


def measure(impl: str, row: Row, dtype: torch.dtype, backward: bool) -> dict:
    fn = IMPLS[impl]
    torch.manual_seed(0)
    hkv = row.H // row.gqa
    q, k, v = (_tensor(row.B, h, n, row.D, dtype, row.layout, backward)
               for h, n in ((row.H, row.L), (hkv, row.S), (hkv, row.S)))
    res = {}
    try:
        with _impl_active(impl), row_toolchain(impl):
            _measure_into(res, fn, impl, row, q, k, v, dtype, backward)
    except Exception as e:  # a peer that refuses a shape is reported, not fatal
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return res


def _tensor(B: int, H: int, S: int, D: int, dtype, layout: str, grad: bool) -> torch.Tensor:
    """A fresh (B, H, S, D) leaf: contiguous, or the .transpose(1, 2) view of a (B, S, H, D) one."""
    if layout == "views":
        t = torch.randn(B, S, H, D, dtype=dtype, device="cuda").transpose(1, 2)
    else:
        t = torch.randn(B, H, S, D, dtype=dtype, device="cuda")
    return t.requires_grad_(grad)


def _measure_into(res: dict, fn, impl: str, row: Row, q, k, v, dtype, backward: bool) -> None:
    """Time ``fn`` on one row; fills ``res`` with fwd/bwd (TFLOP/s, or GB/s for decode)."""
    if impl.startswith("attend"):  # a correctness guard on every timed shape
        with torch.no_grad():
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=row.causal,
                                                                   enable_gqa=row.gqa > 1)
            ours = fn(q, k, v, row.causal, row.gqa)
            res["max_abs_diff_vs_torch"] = (ours.float() - ref.float()).abs().max().item()
    with torch.no_grad():
        fwd_ms = time_ms(lambda: fn(q, k, v, row.causal, row.gqa))
    if row.kind == "decode":
        bytes_kv = 2 * k.numel() * k.element_size()
        res["fwd"] = bytes_kv / (fwd_ms * 1e-3) / 1e9  # GB/s
        return
    flops = 4.0 * row.B * row.H * row.L * row.S * row.D * (0.5 if row.causal else 1.0)
    res["fwd"] = flops / (fwd_ms * 1e-3) / 1e12
    if backward:
        dout = _tensor(row.B, row.H, row.L, row.D, dtype, row.layout, False)  # as the model's backward hands it
        bwd_ms = backward_ms(lambda: fn(q, k, v, row.causal, row.gqa), [q, k, v], dout)
        res["bwd"] = 2.5 * flops / (bwd_ms * 1e-3) / 1e12


def plan(seqs=(512, 1024, 2048, 4096, 8192, 16384), dims=(64, 128), gqa=True, decode=True,
         views=True) -> list[Row]:
    """The rows to time; ``views``: each prefill row again on a model's (B, S, H, D) views."""
    rows = []
    layouts = ("contiguous", "views") if views else ("contiguous",)
    for D in dims:
        H = 2048 // D
        for layout in layouts:
            for causal in (False, True):
                for S in seqs:
                    rows.append(Row("prefill", D, S, causal, 1, 16384 // S, H, S, layout))
            if gqa:
                for causal in (False, True):
                    rows.append(Row("prefill", D, 4096, causal, 8, 4, H, 4096, layout))
    if decode:
        for S in (4096, 16384, 65536):
            rows.append(Row("decode", 128, S, False, 1, 32, 16, 1))
    return rows


def _ratio(ours: dict, peers: list[dict]) -> str:
    """"fwd / bwd" of attend over the best of ``peers`` (what each measured), "" if nothing to compare."""
    parts = []
    for d in ("fwd", "bwd"):
        vals = [p[d] for p in peers if d in p]
        if d in ours and vals:
            parts.append(f"{ours[d] / max(vals):.2f}")
    return " / ".join(parts)


def format_table(rows: list[Row], impls=PEERS) -> str:
    """Markdown table: one cell per impl, then attend over the best peer and, when compiled flex
    was measured (issue 3's floor), attend over flex."""
    flex = "flex-compiled" in impls
    out = []
    head = "| kind | layout | D | S | causal | gqa | " + " | ".join(impls) + " | attend / best peer |" + (
        " attend / flex |" if flex else "")
    out.append(head)
    out.append("|" + "---|" * (7 + len(impls) + flex))
    for r in rows:
        cells = []
        for impl in impls:
            res = r.results.get(impl, {})
            if "error" in res:
                cells.append("n/a")
            elif r.kind == "decode":
                cells.append(f"{res.get('fwd', float('nan')):.0f} GB/s")
            else:
                cells.append(f"{res.get('fwd', float('nan')):.0f} / {res.get('bwd', float('nan')):.0f}")
        ours = r.results.get("attend", {})
        ours = {} if "error" in ours else ours
        ratio = _ratio(ours, [r.results.get(p, {}) for p in impls if not p.startswith("attend")])
        line = f"| {r.kind} | {r.layout} | {r.D} | {r.S} | {'y' if r.causal else 'n'} | {r.gqa}:1 | " + " | ".join(cells) + f" | {ratio} |"
        if flex:
            line += f" {_ratio(ours, [r.results.get('flex-compiled', {})])} |"
        out.append(line)
    return "\n".join(out)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = [r for r in rows if r.kind == "prefill" and r.gqa == 1 and r.layout == "contiguous"]
    dims = sorted({r.D for r in pre})
    fig, axes = plt.subplots(len(dims), 4, figsize=(20, 4.5 * len(dims)), squeeze=False)
    for i, D in enumerate(dims):
        for j, (causal, d) in enumerate([(False, "fwd"), (True, "fwd"), (False, "bwd"), (True, "bwd")]):
            ax = axes[i][j]
            sel = sorted((r for r in pre if r.D == D and r.causal == causal), key=lambda r: r.S)
            for impl in dict.fromkeys(i for r in sel for i in r.results):
                xs = [r.S for r in sel if d in r.results.get(impl, {})]
                ys = [r.results[impl][d] for r in sel if d in r.results.get(impl, {})]
                if xs:
                    ax.plot(xs, ys, marker="o", label=impl, linewidth=2.5 if impl == "attend" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={D} {'causal' if causal else 'non-causal'} {d}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _write_json(path: str, rows: list[Row], dtype) -> None:
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                dtype=str(dtype), attend_configs=_tuned_configs())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=[asdict(r) for r in rows]), f, indent=1)


def run(rows: list[Row], dtype=torch.bfloat16, impls=PEERS, json_path=None, png_path=None, backward=True) -> list[Row]:
    total = len(rows) * len(impls)
    t0 = time.time()
    for i, r in enumerate(rows):
        for j, impl in enumerate(impls):
            n = i * len(impls) + j + 1
            print(f"\r[{n}/{total}] {r.kind} {r.layout} D={r.D} S={r.S} causal={r.causal} gqa={r.gqa}: {impl:<16} "
                  f"({time.time() - t0:.0f}s)", end="", file=sys.stderr, flush=True)
            r.results[impl] = measure(impl, r, dtype, backward and r.kind == "prefill")
            torch.cuda.empty_cache()
        if json_path:  # after every row, so a run cut short keeps what it measured
            _write_json(json_path, rows[: i + 1], dtype)
    print(file=sys.stderr)
    if png_path:
        plot(rows, png_path)
    return rows


def main(seqs, dims, dtype, impls, json_path, png_path, gqa=True, decode=True, views=True) -> None:
    rows = run(plan(seqs, dims, gqa, decode, views), dtype, impls, json_path, png_path)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{str(dtype).removeprefix('torch.')}; prefill cells: fwd / bwd TFLOP/s; decode: K+V read GB/s")
    print(format_table(rows, impls))

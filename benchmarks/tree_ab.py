"""Compare the working tree with another revision on one card: each tree is timed in its own
processes, the two alternating for ``--rounds`` rounds, so that neither a process's warm-up nor
the order decides the result (in a one-round A/B on an H100 the S=1024 cells, each process's
first case, disagreed by 25% between two processes). The base revision's ``src`` comes from ``git archive`` into a
temporary directory. ``--options`` adds a column: the working tree under a KernelOptions
variant (``fwd_ws_pipeline=False``), in processes of its own; ``--env`` another, the working tree with
an environment variable set (``TRITON_PTXAS_PATH=...``: the ptxas that compiled FlexAttention
points Triton at, ``attend._child``).

Each case's forward and backward in ms (the benchmark suite's do_bench median on CUDA, the median
of ``--reps`` calls on the CPU; then the median over rounds),
attend's public API as a user calls it (FLASH; EFFICIENT with the float bias; ``flex_attention``
over a causal BlockMask for the flex cases), bf16, D=128. ``--tiny``: small fp32 shapes on the
CPU, to try the script itself.

    PYTHONPATH=src python benchmarks/tree_ab.py --base HEAD~1 [--cases causal-16k,flex-softcap] [--rounds 3]
        [--options fwd_ws_pipeline=False] [--env TRITON_PTXAS_PATH=/path/to/ptxas] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# name -> (B, H, S, causal, kind); kind: dense, views (a model's (B, S, H, D) projections seen
# through .transpose(1, 2)), bias (a full-size float mask), softcap / alibi (flex score_mods)
CASES = {
    "noncausal-4k": (4, 16, 4096, False, "dense"), "causal-4k": (4, 16, 4096, True, "dense"),
    "noncausal-16k": (1, 16, 16384, False, "dense"), "causal-16k": (1, 16, 16384, True, "dense"),
    "noncausal-1k": (16, 16, 1024, False, "dense"), "causal-1k": (16, 16, 1024, True, "dense"),
    "views-8k": (2, 16, 8192, False, "views"), "views-causal-4k": (4, 16, 4096, True, "views"),
    "bias-4k": (4, 16, 4096, False, "bias"),
    "flex-softcap": (2, 16, 8192, True, "softcap"), "flex-alibi": (2, 16, 8192, True, "alibi"),
}
TINY = (1, 2, 128)  # B, H, S of every case under --tiny


def _case(name: str, tiny: bool, device: str):
    """The case's call and its inputs (q, k, v require grad)."""
    import torch

    import attend
    from attend.flex_attention import create_block_mask, flex_attention

    B, H, S, causal, kind = CASES[name]
    if tiny:
        B, H, S = TINY
    D, dtype = (64, torch.float32) if tiny else (128, torch.bfloat16)
    if kind == "views":
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    if kind in ("dense", "views", "bias"):
        bias = torch.randn(B, H, S, S, device=device, dtype=dtype) if kind == "bias" else None
        backend = attend.SDPBackend.EFFICIENT_ATTENTION if kind == "bias" else attend.SDPBackend.FLASH_ATTENTION

        def call():
            with attend.sdpa_kernel(backend):
                return attend.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        return call, (q, k, v)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S, device=device)
    slopes = torch.rand(H, device=device)
    mods = {"softcap": lambda score, b, h, q_idx, kv_idx: 30.0 * torch.tanh(score / 30.0),
            "alibi": lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (q_idx - kv_idx).abs()}
    return (lambda: flex_attention(q, k, v, score_mod=mods[kind], block_mask=block_mask)), (q, k, v)


def _ms(fn, reps: int, device: str) -> float:
    """The suite's timing (``attend.bench.time_ms``: do_bench's median) on CUDA; on the CPU the
    median of ``reps`` calls (``bench_cpu``'s)."""
    if device == "cuda":
        from attend.bench import time_ms

        return time_ms(fn)
    from attend.bench_cpu import _median_ms

    return _median_ms(fn, reps, warmup=3)


def child(cases: list[str], options: dict, reps: int, tiny: bool, device: str) -> dict:
    """{case: {"fwd": ms, "bwd": ms}} in this process, under ``options``."""
    import torch

    from attend.kernels.options import kernel_options

    out = {}
    with kernel_options(**options):
        for name in cases:
            torch.manual_seed(0)
            call, inputs = _case(name, tiny, device)
            with torch.no_grad():
                fwd = _ms(call, reps, device)
            o = call()  # the backward runs with the options its forward ran with
            if not torch.isfinite(o).all():
                raise RuntimeError(f"{name}: the output is not finite")
            grad = torch.randn_like(o)
            bwd = _ms(lambda: torch.autograd.grad(o, inputs, grad, retain_graph=True), reps, device)
            out[name] = {"fwd": fwd, "bwd": bwd}
            del call, inputs, o
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def _options(text: str) -> dict:
    """``"a=1,b=False"`` -> {"a": 1, "b": False}."""
    if not text:
        return {}
    pairs = (item.split("=", 1) for item in text.split(","))
    return {k.strip(): json.loads(v.strip().lower() if v.strip() in ("True", "False", "None") else v.strip()
                                  .replace("None", "null")) for k, v in pairs}


def _export(rev: str, into: str) -> str:
    """``rev``'s ``src`` under ``into``; returns the directory to put on PYTHONPATH. A ``rev`` that
    is a directory holding an ``attend`` package, or a ``src`` with one (a tree exported earlier, for
    a copy of the checkout without its git history), is used as it is."""
    for src in (rev, os.path.join(rev, "src")):  # the src directory itself, or a checkout holding it
        if os.path.isdir(os.path.join(src, "attend")):
            return os.path.abspath(src)
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", root, "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return os.path.join(into, "src")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD~1", help="the revision to compare with (git rev), or a directory holding its attend package")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--options", default="", help="a KernelOptions variant of the working tree: k=v,...")
    ap.add_argument("--env", default="", help="the working tree with an environment variable set: NAME=VALUE")
    ap.add_argument("--tiny", action="store_true", help="small fp32 shapes on the CPU (tries the script)")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: a timing process's options, as JSON
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; expected some of {list(CASES)}")
    device = "cpu" if args.tiny else "cuda"
    if args.child is not None:
        print(json.dumps(child(cases, json.loads(args.child), args.reps, args.tiny, device)))
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    if args.env and "=" not in args.env:
        ap.error(f"--env: expected NAME=VALUE, got {args.env!r}")
    variants = [("base", None, {}, {}), ("tree", here, {}, {})]
    if args.options:
        variants.append((args.options, here, _options(args.options), {}))
    if args.env:
        variants.append((args.env, here, {}, dict([args.env.split("=", 1)])))
    results = {name: {c: {"fwd": [], "bwd": []} for c in cases} for name, *_ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        variants[0] = ("base", _export(args.base, tmp), {}, {})
        for r in range(args.rounds):
            for name, src, opts, extra in variants:
                env = dict(os.environ, PYTHONPATH=src, **extra)
                cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(opts), "--cases",
                       ",".join(cases), "--reps", str(args.reps)] + (["--tiny"] if args.tiny else [])
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    sys.exit(f"{name} (round {r + 1}) failed:\n{res.stderr[-3000:]}")
                for c, t in json.loads(res.stdout.strip().splitlines()[-1]).items():
                    for d in ("fwd", "bwd"):
                        results[name][c][d].append(t[d])
    med = {n: {c: {d: statistics.median(v) for d, v in r.items()} for c, r in res.items()}
           for n, res in results.items()}
    names = [n for n, *_ in variants]
    print(f"base {args.base} against the working tree; ms, median of {args.rounds} rounds")
    print("| case | " + " | ".join(f"{n} fwd / bwd" for n in names) + " | base / tree |")
    print("|---|" + "---|" * (len(names) + 1))
    for c in cases:
        cells = [f"{med[n][c]['fwd']:.3f} / {med[n][c]['bwd']:.3f}" for n in names]
        base, tree = med["base"][c], med["tree"][c]
        ratio = f"{base['fwd'] / tree['fwd']:.2f}x / {base['bwd'] / tree['bwd']:.2f}x"
        print(f"| {c} | " + " | ".join(cells) + f" | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "rounds": args.rounds, "reps": args.reps, "times": results, "median": med},
                      f, indent=1)


if __name__ == "__main__":
    main()

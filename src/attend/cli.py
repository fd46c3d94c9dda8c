"""``python -m attend {info,explain,bench}``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import attend

from .backends import default_priority

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(out)


def _devices() -> list[tuple[str, str]]:
    devs = [("cpu", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devs.append((f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"))
    return devs


def _probe_call(device: str) -> attend.SDPAParams:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.empty(1, 8, 128, 64, dtype=dtype, device=device)
    return attend.SDPAParams(q, q, q, None, 0.0, False, False)


def cmd_info(args: argparse.Namespace) -> int:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    from .backends._kernels import interpreter_on

    versions = [
        ["attend", attend.__version__], ["python", platform.python_version()], ["torch", torch.__version__],
        ["triton", triton_v], ["cuda (torch build)", torch.version.cuda or "none"],
        ["cudnn", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"],
        ["triton interpreter", "on (TRITON_INTERPRET=1)" if interpreter_on() else "off"],
    ]
    print(_table(versions, ["component", "version"]))
    from ._versions import out_of_range, supported_range
    from .ops import EXPERIMENTAL, TRITON_IMPORT_ERROR, experimental_status

    outside = out_of_range()
    print(f"\nsupported range (pyproject.toml): {supported_range()}: "
          + ("; ".join(outside) if outside else "the installed versions are inside it"))
    if TRITON_IMPORT_ERROR is None:
        print("\nexperimental kernels (sm_90 only; the Triton core serves every call they do not):")
        print(_table([[EXPERIMENTAL[name], state] for name, state in experimental_status().items()],
                     ["kernel", "state"]))
    print()
    devs = _devices()
    print(_table([list(d) for d in devs], ["device", "description"]))
    for dev, _ in devs:
        print(f"\nbackends on {dev} (priority order; probe: 1x8x128x64, no mask):")
        p = _probe_call(dev)
        d = attend._dispatch.decide(p, exhaustive=True)
        rows = [[i, b.name, "usable" if b not in d.reasons else "no: " + "; ".join(d.reasons[b])]
                for i, b in enumerate(default_priority(torch.device(dev)), 1)]
        print(_table(rows, ["#", "backend", "status"]))
    print("\nflash implementations (FLASH backend):")
    active = attend.current_flash_attention_impl()
    rows = [["default (attend Triton / CPU blocked)", "active" if active is None else ""]]
    rows += [[name, "active" if name == active else "registered"] for name in attend.list_flash_attention_impls()]
    print(_table(rows, ["impl", "state"]))
    return 0


def _explain_inputs(a: argparse.Namespace):
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    dtype = _DTYPES[a.dtype]
    hkv = a.kv_heads or a.heads
    kv_len = a.kv_len or a.q_len
    q = torch.empty(a.batch, a.heads, a.q_len, a.head_dim, dtype=dtype, device=device, requires_grad=a.grad)
    k = torch.empty(a.batch, hkv, kv_len, a.head_dim, dtype=dtype, device=device, requires_grad=a.grad)
    v = torch.empty(a.batch, hkv, kv_len, a.v_head_dim or a.head_dim, dtype=dtype, device=device, requires_grad=a.grad)
    mask = None
    if a.mask == "bool":
        mask = torch.ones(a.batch, 1, a.q_len, kv_len, dtype=torch.bool, device=device)
    elif a.mask == "padding":
        mask = torch.ones(a.batch, 1, 1, kv_len, dtype=torch.bool, device=device)
    elif a.mask == "float":
        mask = torch.zeros(a.batch, a.heads, a.q_len, kv_len, dtype=dtype, device=device)
    elif a.mask in ("causal-upper-left", "causal-lower-right"):
        fn = attend.bias.causal_upper_left if a.mask.endswith("left") else attend.bias.causal_lower_right
        mask = fn(a.q_len, kv_len)
    return q, k, v, mask


def cmd_explain(a: argparse.Namespace) -> int:
    q, k, v, mask = _explain_inputs(a)
    kwargs = dict(attn_mask=mask, dropout_p=a.dropout, is_causal=a.causal, enable_gqa=a.kv_heads is not None)
    if a.backends:
        chosen = [attend.SDPBackend[name.strip().upper()] for name in a.backends.split(",")]
        with attend.sdpa_kernel(chosen, set_priority=True):
            print(attend.explain(q, k, v, **kwargs))
    else:
        print(attend.explain(q, k, v, **kwargs))
    return 0


def _bench_dtype(a: argparse.Namespace) -> torch.dtype:
    """``--dtype`` as given; unset, float32 on the CPU and bfloat16 on CUDA (what the tables report)."""
    if a.dtype is not None:
        return _DTYPES[a.dtype]
    return torch.float32 if a.device == "cpu" else torch.bfloat16


def cmd_bench(a: argparse.Namespace) -> int:
    if a.suite == "flex":  # runs on the CPU too, at the tiny preset (attend's core under TRITON_INTERPRET=1)
        from . import bench_flex

        preset = a.flex_preset or ("tiny" if a.device == "cpu" else "full")
        dtype = torch.float32 if a.device == "cpu" else _bench_dtype(a)
        bench_flex.main(preset, tuple(a.impls.split(",")) if a.impls else bench_flex.IMPLS, a.flex_json, a.device,
                        dtype)
        return 0
    if a.suite == "models":  # runs on the CPU too, at the tiny preset
        from . import bench_models

        preset = a.models_preset or ("tiny" if a.device == "cpu" else "full")
        dtype = _bench_dtype(a)
        phases = tuple(a.models_phases.split(",")) if a.models_phases else bench_models.PHASES
        known = (*bench_models.PHASES, bench_models.COMPILED_PHASE)
        if unknown := [x for x in phases if x not in known]:
            raise SystemExit(f"bench: --models-phases {a.models_phases!r}: unknown {', '.join(unknown)}; "
                             f"expected a comma-separated subset of {', '.join(known)}")
        bench_models.main(preset, tuple(a.impls.split(",")) if a.impls else bench_models.IMPLS, a.models_json,
                          a.device, dtype, phases=phases)
        return 0
    if a.device == "cpu":
        from . import bench_cpu

        if a.reps < 1 or a.warmup < 0:
            raise SystemExit(f"bench: --reps must be >= 1 and --warmup >= 0; got --reps {a.reps} --warmup {a.warmup}")

        bench_cpu.run((1, a.heads, a.seq, a.head_dim), _bench_dtype(a), a.causal, a.reps, warmup=a.warmup)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here; use --device cpu")
    if a.suite in ("masks", "all"):
        from . import bench_masks

        bench_masks.main(_bench_dtype(a), a.masks_json)
        if a.suite == "masks":
            return 0
    from . import bench

    seqs = [int(s) for s in a.seqs.split(",")]
    dims = [int(d) for d in a.dims.split(",")]
    if a.impls == "backends":  # every attend backend and flash impl, then the peers
        impls = bench.BACKEND_IMPLS + bench.PEERS[1:]
    else:
        impls = tuple(a.impls.split(",")) if a.impls else bench.PEERS
    bench.main(seqs, dims, _bench_dtype(a), impls, a.json, a.png,
               gqa=not a.no_gqa, decode=not a.no_decode, views=not a.no_views)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(  # plain text: argparse prints the description as is (no RST)
        prog="python -m attend",
        description="attend's command line: what is installed and usable here (info), which backend "
                    "would run a call and why the others would not (explain), and timings against "
                    "PyTorch's kernels (bench). 'python -m attend COMMAND --help' lists a command's options.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, and which backends and flash impls are usable here")
    ex = sub.add_parser("explain", help="which backend would run a call, and why the others would not")
    ex.add_argument("--batch", type=int, default=2)
    ex.add_argument("--heads", type=int, default=8)
    ex.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = --heads")
    ex.add_argument("--q-len", type=int, default=1024)
    ex.add_argument("--kv-len", type=int, default=None, help="default = --q-len")
    ex.add_argument("--head-dim", type=int, default=64)
    ex.add_argument("--v-head-dim", type=int, default=None)
    ex.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--causal", action="store_true")
    ex.add_argument("--mask", choices=["none", "bool", "padding", "float", "causal-upper-left", "causal-lower-right"],
                    default="none")
    ex.add_argument("--dropout", type=float, default=0.0)
    ex.add_argument("--grad", action="store_true", help="inputs require grad")
    ex.add_argument("--backends", default="", help="comma list, in priority order, e.g. efficient_attention,math")
    be = sub.add_parser("bench", help="time attend's kernels against PyTorch's")
    be.add_argument("--device", default="cpu")
    be.add_argument("--seq", type=int, default=2048)
    be.add_argument("--heads", type=int, default=8)
    be.add_argument("--head-dim", type=int, default=64)
    be.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="default: float32 on the CPU, bfloat16 on CUDA")
    be.add_argument("--causal", action="store_true")
    be.add_argument("--reps", type=int, default=3, help="CPU: timed repetitions")
    be.add_argument("--warmup", type=int, default=1, help="CPU: untimed calls before the timed ones")
    be.add_argument("--seqs", default="512,1024,2048,4096,8192,16384", help="CUDA: sequence lengths")
    be.add_argument("--dims", default="64,128", help="CUDA: head dims")
    be.add_argument("--impls", default="", help="CUDA: subset of attend,attend-efficient,attend-cudnn,attend-fa2,attend-fa4,torch-flash,"
                    "torch-efficient,torch-cudnn,flex-compiled; 'backends' = all of them")
    be.add_argument("--json", default="bench.json", help="CUDA: where to write the results")
    be.add_argument("--png", default="bench.png", help="CUDA: where to draw the plot")
    be.add_argument("--no-gqa", action="store_true")
    be.add_argument("--no-decode", action="store_true")
    be.add_argument("--no-views", action="store_true",
                    help="skip the prefill rows on (B, S, H, D) views, the layout models pass")
    be.add_argument("--suite", choices=["core", "masks", "all", "models", "flex"], default="core",
                    help="CUDA: core = dense prefill/decode table; masks = bias, padding, varlen and sliding window; "
                    "models = transformers Llama- and Gemma-2-shaped training step and generation per "
                    "attn_implementation (also on the CPU, tiny); flex = attend.flex_attention against compiled "
                    "PyTorch flex (also on the CPU, tiny)")
    be.add_argument("--models-json", default="bench_models.json", help="where --suite models writes its results")
    be.add_argument("--models-phases", default=None,
                    help="--suite models phases, comma-separated: train, generate, batch (the default) and "
                         "train-compiled (the training step under torch.compile)")
    be.add_argument("--models-preset", choices=["full", "tiny"], default=None,
                    help="--suite models sizes; default full on CUDA, tiny on the CPU")
    be.add_argument("--flex-json", default="bench_flex.json", help="where --suite flex writes its results")
    be.add_argument("--flex-preset", choices=["full", "tiny"], default=None,
                    help="--suite flex sizes; default full on CUDA (B=2, H=16, S=8192, D=128), tiny on the CPU")
    be.add_argument("--masks-json", default="bench_masks.json", help="CUDA: where --suite masks writes its results")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"info": cmd_info, "explain": cmd_explain, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

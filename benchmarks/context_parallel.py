"""Context parallel attention on several GPUs: attend's ring (``attend.distributed``) against one
GPU's attend call and against PyTorch's ``torch.distributed.tensor.experimental.context_parallel``
(its ring over PyTorch's flash or cuDNN SDPA), in one process group, same inputs.

Defaults: bf16, B=1, H=16 (hidden 2048 at D=128), D=128, causal, S = 128k, 256k and 512k tokens.
Each row times forward and forward+backward (CUDA events, median over ``--reps`` after
``--warmup``; the slowest rank's time), and reports TFLOP/s of the whole sequence (forward
``4*B*H*S*S*D``, halved when causal; backward 2.5x forward), the speed-up over one GPU and the
peak memory allocated per rank during the timed calls.

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --seqs 131072 --impls attend-ring one-gpu
    # a FlexAttention score_mod (ALiBi) in the ring, against one GPU's flex_attention
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --score-mod alibi --impls attend-ring one-gpu
    # on the CPU (gloo, float64, attend's blocked kernel): a check that the script runs end to end
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --device cpu --dtype float64 \\
        --seqs 256 --heads 2 --dim 16 --impls attend-ring one-gpu --reps 1 --warmup 0
    python benchmarks/context_parallel.py --dry-run   # the plan, no process group
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

IMPLS = ("attend-ring", "one-gpu", "torch-cp-flash", "torch-cp-cudnn", "torch-cp-flash-alltoall")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[131072, 262144, 524288], help="global sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    p.add_argument("--dim", type=int, default=128, help="head dim")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full attention instead of causal")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag", help="attend-ring's layout")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--score-mod", choices=("none", "alibi"), default="none",
                   help="alibi: a FlexAttention score_mod (ALiBi at global positions) in attend-ring, against "
                        "one GPU's attend.flex_attention; PyTorch's context_parallel rows take none")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no process group)")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


def flops(args, S: int, backward: bool) -> float:
    f = 4.0 * args.batch * args.heads * S * S * args.dim * (0.5 if args.causal else 1.0)
    return f * (3.5 if backward else 1.0)  # forward + backward = 1 + 2.5


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, args) -> float:
    """Median seconds of ``fn()`` on this rank, the slowest rank's value (all ranks must call)."""
    import torch.distributed as dist

    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.reps):
        _sync(args.device)
        dist.barrier()
        t = time.perf_counter()
        fn()
        _sync(args.device)
        times.append(time.perf_counter() - t)
    mine = torch.tensor([statistics.median(times)], dtype=torch.float64,
                        device=args.device if args.device == "cuda" else "cpu")
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine.item())


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _inputs(args, S: int, requires_grad: bool):
    g = torch.Generator(device=args.device).manual_seed(S)
    dt = DTYPES[args.dtype]
    shape = lambda h: (args.batch, h, S, args.dim)  # noqa: E731
    q = torch.randn(shape(args.heads), dtype=dt, device=args.device, generator=g)
    k = torch.randn(shape(args.kv_heads), dtype=dt, device=args.device, generator=g)
    v = torch.randn(shape(args.kv_heads), dtype=dt, device=args.device, generator=g)
    dout = torch.randn(shape(args.heads), dtype=dt, device=args.device, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)] + [dout]


def _fwd_and_step(attn, q, k, v, dout):
    """(forward only, forward + backward) callables over leaf inputs."""
    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def step():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(dout)

    return fwd, step


def alibi(args):
    """ALiBi as a score_mod: a bias of slope_h * (kv_idx - q_idx), one slope per query head."""
    slopes = torch.exp2(-8.0 * torch.arange(1, args.heads + 1, device=args.device) / args.heads)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return score_mod


def run_attend_ring(args, S: int):
    import attend.distributed as cp

    full = _inputs(args, S, False)
    q, k, v, dout = (cp.shard(t, dim=2, layout=args.layout) for t in full)
    del full
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    score_mod = alibi(args) if args.score_mod == "alibi" else None
    attn = lambda q, k, v: cp.context_parallel_attention(  # noqa: E731
        q, k, v, is_causal=args.causal, enable_gqa=args.kv_heads != args.heads, layout=args.layout,
        score_mod=score_mod)
    return _fwd_and_step(attn, q, k, v, dout)


def run_one_gpu(args, S: int):
    """One rank attends the whole sequence; the others only wait (their time is not the row's)."""
    import attend
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return (lambda: None), (lambda: None)
    q, k, v, dout = _inputs(args, S, True)
    attn = lambda q, k, v: attend.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=args.causal, enable_gqa=args.kv_heads != args.heads)
    if args.score_mod == "alibi":
        from attend.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S,
                                 device=args.device) if args.causal else None
        score_mod = alibi(args)
        attn = lambda q, k, v: flex_attention(  # noqa: E731
            q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=args.kv_heads != args.heads)
    return _fwd_and_step(attn, q, k, v, dout)


def run_torch_cp(args, S: int, backend: str, rotate: str):
    """PyTorch's context_parallel: it shards the buffers in place (its head-tail layout, zigzag)
    and routes F.scaled_dot_product_attention under ``backend`` through its ring."""
    import contextlib

    import torch.distributed as dist

    if args.score_mod != "none":
        raise ValueError(f"--score-mod {args.score_mod}: PyTorch's context_parallel SDPA takes no score_mod")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_rotate_method(rotate)
    mesh = init_device_mesh(args.device, (dist.get_world_size(),))
    q, k, v, dout = _inputs(args, S, False)
    stack = contextlib.ExitStack()
    stack.enter_context(context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2],
                                         no_restore_buffers={q, k, v, dout}))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def attn(q, k, v):
        with sdpa_kernel(which):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=args.causal, enable_gqa=args.kv_heads != args.heads)

    fwd, step = _fwd_and_step(attn, q, k, v, dout)
    return fwd, step, stack


def measure(args, impl: str, S: int) -> dict:
    import torch.distributed as dist

    row = dict(impl=impl, S=S, world=dist.get_world_size())
    stack = None
    try:
        if impl == "attend-ring":
            fwd, step = run_attend_ring(args, S)
        elif impl == "one-gpu":
            fwd, step = run_one_gpu(args, S)
        else:
            backend = "cudnn" if "cudnn" in impl else "flash"
            fwd, step, stack = run_torch_cp(args, S, backend, "alltoall" if impl.endswith("alltoall") else "allgather")
        _peak_reset(args.device)  # after the setup: the peak counts the inputs each rank keeps and the calls
        row["fwd_s"] = _timed(fwd, args)
        row["step_s"] = _timed(step, args)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # a peer that cannot run here (e.g. torch CP on the CPU): the row says why
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        if stack is not None:
            stack.close()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, _peak_gib(args.device))
    row["peak_gib"] = peaks
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, row.get("error"))
    if any(errors):  # the same verdict on every rank
        row["error"] = next(e for e in errors if e)
        row.pop("fwd_s", None), row.pop("step_s", None)
    return row


def table(args, rows: list[dict]) -> str:
    lines = ["| S | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | x one GPU (fwd+bwd) "
             "| peak GiB per rank |", "|---|---|---|---|---|---|---|---|"]
    one = {r["S"]: r.get("step_s") for r in rows if r["impl"] == "one-gpu"}
    for r in rows:
        S = r["S"]
        peaks = " / ".join("-" if p is None else f"{p:.1f}" for p in r["peak_gib"])
        if "error" in r:
            lines.append(f"| {S} | {r['impl']} | {r['error']} | | | | | {peaks} |")
            continue
        speed = f"{one[S] / r['step_s']:.2f}" if one.get(S) else "-"
        lines.append(f"| {S} | {r['impl']} | {r['fwd_s'] * 1e3:.1f} | {r['step_s'] * 1e3:.1f} | "
                     f"{flops(args, S, False) / r['fwd_s'] / 1e12:.0f} | "
                     f"{flops(args, S, True) / r['step_s'] / 1e12:.0f} | "
                     f"{speed} | {peaks} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        print(f"would time {', '.join(args.impls)} at S = {', '.join(map(str, args.seqs))}: B={args.batch}, "
              f"H={args.heads}/{args.kv_heads}, D={args.dim}, {args.dtype}, causal={args.causal}, "
              f"layout={args.layout}, score_mod={args.score_mod}, {args.reps} reps after {args.warmup} warm-up, "
              f"on {args.device}")
        for S in args.seqs:
            print(f"  S={S}: forward {flops(args, S, False) / 1e12:.1f} TFLOP, forward+backward "
                  f"{flops(args, S, True) / 1e12:.1f} TFLOP")
        return
    if args.device == "cpu" and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before attend imports triton
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        rows = [measure(args, impl, S) for S in args.seqs for impl in args.impls]
        if dist.get_rank() == 0:
            dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
            print(f"{dist.get_world_size()} ranks on {dev}, torch {torch.__version__}, {args.dtype}, B={args.batch}, "
                  f"H={args.heads}/{args.kv_heads}, D={args.dim}, causal={args.causal}, score_mod={args.score_mod}")
            print(table(args, rows))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

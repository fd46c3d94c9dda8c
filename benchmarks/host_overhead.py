"""Host time per call of attend's layers next to PyTorch's, on a shape too small for the GPU to
matter (B=1, H=2, S=128, D=128, bf16, causal): what a call costs before the GPU has work. When
it exceeds the kernels' time (the S=1024 rows of the bench), the bench measures the host.

    PYTHONPATH=src python benchmarks/host_overhead.py
"""

from __future__ import annotations

import time

import torch

import attend
from attend import bench
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


def main() -> None:
    q, k, v = (torch.randn(1, 2, 128, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, lse = launch.forward(qd, kd, vd, None, 0.0, CAUSAL, SCALE, 0)

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
        "attend FLASH forward+backward": fwd_bwd(bench.IMPLS["attend"]),
        "torch flash forward (no grad)": lambda: bench.IMPLS["torch-flash"](qd, kd, vd, True, 1),
        "torch flash forward+backward": fwd_bwd(bench.IMPLS["torch-flash"]),
        "flex compiled forward+backward": fwd_bwd(bench.IMPLS["flex-compiled"]),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, attend {attend.__version__}")
    print("| call | host us |\n|---|---|")
    for name, fn in cases.items():
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""The CPU table of RESULTS.md: attend's blocked FLASH, attend MATH and PyTorch's CPU SDPA on
1x8x4096x64 fp32 causal, forward and forward+backward, time and peak memory.

    python benchmarks/cpu_attention.py [--seq 4096] [--reps 7] [--warmup 2]
"""

import argparse

import torch

from attend.bench_cpu import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    ap.add_argument("--no-causal", action="store_true")
    a = ap.parse_args()
    run((1, a.heads, a.seq, a.head_dim), torch.float32, not a.no_causal, a.reps, warmup=a.warmup)

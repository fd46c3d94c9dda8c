"""CPU benchmark of issue 2: 1x8x4096x64 fp32 causal, fwd and fwd+bwd, time and peak memory.

    python benchmarks/cpu_attention.py [--seq 4096] [--reps 5]
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
    ap.add_argument("--no-causal", action="store_true")
    a = ap.parse_args()
    run((1, a.heads, a.seq, a.head_dim), torch.float32, not a.no_causal, a.reps)

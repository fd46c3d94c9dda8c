"""GPU benchmark of the masked paths (``python -m attend bench --suite masks``), peers in one process:

- ``bias``: a float ``(B, H, L, S)`` bias that requires grad, B=4, H=16, S=4096, D=128.
  attend EFFICIENT vs PyTorch efficient and cuDNN (cuDNN refuses a bias with grad).
- ``padding``: a bool key-padding mask ``(B, 1, 1, S)``, same shape, same peers.
- ``varlen``: 16384 tokens in 11 causal sequences of 100..4096 tokens, H=16, D=128: attend's
  ``varlen_attn`` vs PyTorch's ``varlen_attn`` and vs padding to the longest + dense causal SDPA
  (attend FLASH and PyTorch cuDNN). TFLOP/s count only the real (unpadded) causal work.
- ``window``: a causal sliding window of 4096 keys in one sequence of 16384 (H=16, D=128):
  attend's varlen window vs attend's own full causal, compiled flex with the same window, and
  PyTorch cuDNN full causal. TFLOP/s count each impl's own work; compare the times.

Forward and backward timed as in ``attend.bench`` (backward = fwd+bwd minus fwd with graph).
"""

from __future__ import annotations

import json
import sys
import time

import torch

import attend
from attend.bench import time_ms, backward_ms

VARLEN_LENGTHS = [4096, 3000, 2048, 1800, 1500, 1200, 1000, 900, 500, 240, 100]
WINDOW, WINDOW_S = 4096, 16384


def _entry(fn, inputs, dout, flops: float, backward: bool = True) -> dict:
    t0 = time.time()
    r = _measure(fn, inputs, dout, flops, backward)
    print(f"  {r} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return r


def _measure(fn, inputs, dout, flops: float, backward: bool) -> dict:
    try:
        with torch.no_grad():
            f = time_ms(fn)
        res = dict(fwd_ms=f, fwd=flops / f / 1e9)
        if backward:
            b = backward_ms(fn, inputs, dout)
            res.update(bwd_ms=b, bwd=2.5 * flops / b / 1e9)
        return res
    except Exception as e:  # a peer that refuses the case is reported, not fatal
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


def _sdpa(backend, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    return run


def _attend(backend, **kw):
    def run(q, k, v):
        with attend.sdpa_kernel(getattr(attend.SDPBackend, backend)):
            return attend.scaled_dot_product_attention(q, k, v, **kw)
    return run


def _qkv(*shape, dtype, grad=True):
    return [torch.randn(*shape, dtype=dtype, device="cuda", requires_grad=grad) for _ in range(3)]


def masked_cases(dtype) -> dict:
    B, H, S, D = 4, 16, 4096, 128
    flops = 4.0 * B * H * S * S * D
    q, k, v = _qkv(B, H, S, D, dtype=dtype)
    dout = torch.randn_like(q)
    bias = torch.randn(B, H, S, S, dtype=dtype, device="cuda", requires_grad=True)
    pad = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
    for b in range(B):
        pad[b, ..., S - b * S // 8:] = False  # batch b pads its last b/8 of the keys
    out = {}
    for name, mask, inputs in (("bias", bias, [q, k, v, bias]), ("padding", pad, [q, k, v])):
        out[name] = {
            "attend": _entry(lambda: _attend("EFFICIENT_ATTENTION", attn_mask=mask)(q, k, v), inputs, dout, flops),
            "torch-efficient": _entry(lambda: _sdpa("EFFICIENT_ATTENTION", attn_mask=mask)(q, k, v), inputs, dout,
                                      flops),
            "torch-cudnn": _entry(lambda: _sdpa("CUDNN_ATTENTION", attn_mask=mask)(q, k, v), inputs, dout, flops),
        }
    return out


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lengths, device="cuda").cumsum(0)
    return cu


def varlen_case(dtype) -> dict:
    from attend.varlen import varlen_attn

    H, D, lens = 16, 128, VARLEN_LENGTHS
    T, n, top = sum(lens), len(lens), max(lens)
    flops = sum(4.0 * H * n_ * n_ * D * 0.5 for n_ in lens)
    q, k, v = _qkv(T, H, D, dtype=dtype)
    dout = torch.randn_like(q)
    cu = _cu(lens)
    res = {"attend": _entry(lambda: varlen_attn(q, k, v, cu, cu, top, top, window_size=(-1, 0)), [q, k, v], dout,
                            flops)}
    try:
        from torch.nn.attention.varlen import varlen_attn as torch_varlen
        res["torch-varlen"] = _entry(lambda: torch_varlen(q, k, v, cu, cu, top, top, window_size=(-1, 0)),
                                     [q, k, v], dout, flops)
    except ImportError as e:
        res["torch-varlen"] = dict(error=f"ImportError: {e}")
    # Padding to the longest: real query i < L_b only sees keys j <= i < L_b, so causal needs no mask.
    qp, kp, vp = _qkv(n, H, top, D, dtype=dtype)
    doutp = torch.randn_like(qp)
    res["padded-attend"] = _entry(lambda: _attend("FLASH_ATTENTION", is_causal=True)(qp, kp, vp), [qp, kp, vp],
                                  doutp, flops)
    res["padded-torch-cudnn"] = _entry(lambda: _sdpa("CUDNN_ATTENTION", is_causal=True)(qp, kp, vp), [qp, kp, vp],
                                       doutp, flops)
    # A correctness guard on the timed inputs: sequence 0 against dense causal SDPA.
    with torch.no_grad():
        ours = varlen_attn(q, k, v, cu, cu, top, top, window_size=(-1, 0))[: lens[0]]
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t[: lens[0]].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)[0].transpose(0, 1)
        res["attend"]["max_abs_diff_vs_torch"] = (ours.float() - ref.float()).abs().max().item()
    return res


def window_case(dtype) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attend.varlen import varlen_attn

    H, D, S, W = 16, 128, WINDOW_S, WINDOW
    full_flops = 4.0 * H * S * S * D * 0.5
    win_flops = 4.0 * H * D * sum(min(i, W) + 1 for i in range(S))
    q, k, v = _qkv(S, H, D, dtype=dtype)
    dout = torch.randn_like(q)
    cu = _cu([S])
    res = {
        "attend-window": _entry(lambda: varlen_attn(q, k, v, cu, cu, S, S, window_size=(W, 0)), [q, k, v], dout,
                                win_flops),
        "attend-full-causal": _entry(lambda: varlen_attn(q, k, v, cu, cu, S, S, window_size=(-1, 0)), [q, k, v],
                                     dout, full_flops),
    }
    qb, kb, vb = (t.detach().transpose(0, 1)[None].contiguous().requires_grad_() for t in (q, k, v))
    doutb = dout.transpose(0, 1)[None].contiguous()
    block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= W), None, None, S, S, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    res["flex-compiled-window"] = _entry(lambda: flex(qb, kb, vb, block_mask=block_mask), [qb, kb, vb], doutb,
                                         win_flops)
    res["torch-cudnn-full-causal"] = _entry(lambda: _sdpa("CUDNN_ATTENTION", is_causal=True)(qb, kb, vb),
                                            [qb, kb, vb], doutb, full_flops)
    return res


def format_tables(results: dict) -> str:
    lines = ["| case | impl | fwd TFLOP/s | bwd TFLOP/s | fwd ms | bwd ms |", "|---|---|---|---|---|---|"]
    for case, impls in results.items():
        for impl, r in impls.items():
            if "error" in r:
                lines.append(f"| {case} | {impl} | n/a | n/a | | | ({r['error'][:80]})")
                continue
            lines.append(f"| {case} | {impl} | {r['fwd']:.0f} | {r.get('bwd', float('nan')):.0f} | "
                         f"{r['fwd_ms']:.3f} | {r.get('bwd_ms', float('nan')):.3f} |")
    return "\n".join(lines)


def targets(results: dict) -> str:
    """The issue's targets as ratios from this run."""
    def ratio(case, a, b, key):
        ra, rb = results.get(case, {}).get(a, {}), results.get(case, {}).get(b, {})
        return ra[key] / rb[key] if key in ra and key in rb else float("nan")

    w = results.get("window", {})
    speed = [w["attend-full-causal"][f"{d}_ms"] / w["attend-window"][f"{d}_ms"]
             if f"{d}_ms" in w.get("attend-window", {}) and f"{d}_ms" in w.get("attend-full-causal", {}) else float("nan")
             for d in ("fwd", "bwd")]
    return "\n".join([
        f"bias: attend / torch-efficient = {ratio('bias', 'attend', 'torch-efficient', 'fwd'):.2f} / "
        f"{ratio('bias', 'attend', 'torch-efficient', 'bwd'):.2f} (target >= 3)",
        f"padding: attend / torch-cudnn = {ratio('padding', 'attend', 'torch-cudnn', 'fwd'):.2f} / "
        f"{ratio('padding', 'attend', 'torch-cudnn', 'bwd'):.2f} (target >= 1)",
        f"varlen: attend / torch-varlen = {ratio('varlen', 'attend', 'torch-varlen', 'fwd'):.2f} / "
        f"{ratio('varlen', 'attend', 'torch-varlen', 'bwd'):.2f} (target >= 1.5)",
        f"window: attend full causal time / window time = {speed[0]:.2f} / {speed[1]:.2f} (target >= 2.1)",
    ])


def main(dtype=torch.bfloat16, json_path=None, cases=("masks", "varlen", "window")) -> dict:
    """Run ``cases``; prints each table row as it is measured and rewrites the JSON after each
    case, so a run cut short keeps what it measured."""
    torch.manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                dtype=str(dtype))
    results = {}
    runners = dict(masks=masked_cases, varlen=lambda d: {"varlen": varlen_case(d)},
                   window=lambda d: {"window": window_case(d)})
    for case in cases:
        print(f"[{case}]", file=sys.stderr, flush=True)
        results.update(runners[case](dtype))
        print(format_tables(results), flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"{meta['device']}, torch {meta['torch']}, cuDNN {meta['cudnn']}, {str(dtype).removeprefix('torch.')}")
    print(format_tables(results))
    print(targets(results), flush=True)
    return results

"""Where a decode step's host time goes: the models bench's Llama or Gemma 2 (``--model``;
``attend.bench_models``' ``full`` preset) generating tokens with ``attn_implementation="attend"``
under cProfile, after a warm-up generation, next to ``sdpa``'s and eager's time per token.
Generation at this size is bound by the host (RESULTS.md, Models), so the profile's attend frames
are what a token costs beyond sdpa's.

    PYTHONPATH=src python benchmarks/profile_decode.py [--model llama|gemma2] [--tokens 32] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--model", choices=("llama", "gemma2"), default="llama")
    args = ap.parse_args()
    import transformers

    import attend.integrations.transformers  # noqa: F401  (registers "attend")
    from attend.bench_models import PRESETS, _config

    p = dict(PRESETS["full"], new_tokens=args.tokens)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(args.model, p), attn_implementation="eager")
    model = model.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(2, p["vocab"], (p["batch"], p["prompt"]), device="cuda")

    def gen():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=p["new_tokens"], min_new_tokens=p["new_tokens"], do_sample=False,
                           use_cache=True, pad_token_id=0)
        torch.cuda.synchronize()

    for impl in ("sdpa", "eager", "attend") * 2:
        model.set_attn_implementation(impl)
        gen()
        t = time.perf_counter()
        gen()
        print(f"{impl}: {(time.perf_counter() - t) * 1e3 / p['new_tokens']:.2f} ms/token (prefill included)", flush=True)
    model.set_attn_implementation("attend")
    prof = cProfile.Profile()
    prof.enable()
    gen()
    prof.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print(f"== by {key}\n" + s.getvalue().split("\n", 6)[-1], flush=True)


if __name__ == "__main__":
    main()

"""Model benchmark: Hugging Face transformers models with each ``attn_implementation``.

``python -m attend bench --suite models --device cuda`` times, in one process, a training step
(forward + backward of the language-model loss), a greedy generation loop (prefill, then decode
with a KV cache) and continuous batching (``generate_batch``: ``requests`` prompts of mixed lengths
in one packed row over transformers' paged cache; transformers 5.17-5.22, ``attend``, ``sdpa`` and
``eager``, which it runs as ``paged|<name>``) of two random-init models:

- ``llama``: Llama-shaped, hidden 2048, 4 layers, 16 query / 4 KV heads (D = 128), B = 2, S = 8192;
- ``gemma2``: the same shape as Gemma 2 (attention logit softcap 50, sliding window 4096 on every
  other layer, final logit softcap 30);

for ``attn_implementation`` in ``attend`` (attend's default backend order), ``attend-own``
(``attend`` restricted to attend's own kernels: FLASH, EFFICIENT, MATH), ``sdpa``,
``flex_attention`` and ``eager``. With ``attend``, Gemma 2's softcap runs attend's FlexAttention
(the Triton core's flex mode, forward and backward); each row's ``flex_paths`` counts the flex
calls by path (``fused`` / ``blocked`` forwards, ``fused_backward`` / ``blocked_backward``), and
``varlen_paths`` the ``varlen_attn`` calls with a score_mod (an inference softcap over packed or
padded sequences on the Triton kernels: ``fused``, else ``per_sequence``), so a row that left the
fused core says so. Each row has the first step's time (compilation included)
and the steady-state median; a path that fails (out of memory, unsupported) gets a row with its
error. The first step's time in this process depends on the rows before it (the first row pays
the CUDA context, cuBLAS and the allocator for all), so on CUDA each training row also gets
``first_fresh_ms``: its first step in a process of its own that has warmed up only those shared
pieces (``fresh_first_step``). Rows go to a JSON file. The ``tiny`` preset (the default on the CPU) runs the same code at
toy sizes, as a smoke test.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from ._child import row_toolchain, started_child_env

PRESETS = {
    "full": dict(hidden=2048, layers=4, heads=16, kv_heads=4, batch=2, seq=8192, vocab=32000, intermediate=5632,
                 window=4096, prompt=1024, new_tokens=128, requests=32),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, batch=1, seq=32, vocab=128, intermediate=128, window=8,
                 prompt=8, new_tokens=4, requests=3),
}
IMPLS = ("attend", "attend-own", "sdpa", "flex_attention", "eager")
PHASES = ("train", "generate", "batch")
# Not in the default PHASES: the training step under torch.compile (Inductor on CUDA, aot_eager on the
# CPU), ``use_cache=False`` as in "train", where transformers adds its packed-sequence mask in the graph
# (docs/transformers.md, "Under torch.compile"); its first step holds the compile.
COMPILED_PHASE = "train-compiled"
# Continuous batching runs "paged|<name>" on its own thread: transformers registers paged|sdpa and
# paged|eager, attend paged|attend; attend-own's sdpa_kernel state (per thread) would not reach it.
BATCH_IMPLS = ("attend", "sdpa", "eager")
MODELS = ("llama", "gemma2")


def _config(model: str, p: dict):
    import transformers

    common = dict(hidden_size=p["hidden"], intermediate_size=p["intermediate"], num_hidden_layers=p["layers"],
                  num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], vocab_size=p["vocab"],
                  max_position_embeddings=max(p["seq"], p["prompt"] + p["new_tokens"]), pad_token_id=0,
                  bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    head_dim = p["hidden"] // p["heads"]
    if model == "llama":
        return transformers.LlamaConfig(**common)
    if model == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                         sliding_window=p["window"], attn_logit_softcapping=50.0,
                                         final_logit_softcapping=30.0)
    raise ValueError(f"model {model!r}: expected one of {', '.join(MODELS)}")


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, steps: int) -> tuple[float, float]:
    """(first call ms, median ms of the next ``steps``)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times)


def _impl_context(impl: str):
    """(attn_implementation name, context) for a benchmark implementation name."""
    if impl == "attend-own":
        import attend

        return "attend", attend.sdpa_kernel([attend.SDPBackend.FLASH_ATTENTION, attend.SDPBackend.EFFICIENT_ATTENTION,
                                             attend.SDPBackend.MATH], set_priority=True)
    return impl, contextlib.nullcontext()


def _run_one(model, impl: str, phase: str, p: dict, device: str, steps: int) -> dict:
    name, ctx = _impl_context(impl)
    model.set_attn_implementation(name)
    g = torch.Generator(device="cpu").manual_seed(0)
    with ctx, row_toolchain(impl):
        if phase in ("train", COMPILED_PHASE):
            ids = torch.randint(2, p["vocab"], (p["batch"], p["seq"]), generator=g).to(device)
            model.train()
            run = model
            if phase == COMPILED_PHASE:
                torch._dynamo.reset()  # each row compiles its own graph
                run = torch.compile(model, backend="inductor" if str(device).startswith("cuda") else "aot_eager")

            def step():
                model.zero_grad(set_to_none=True)
                run(ids, labels=ids, use_cache=False).loss.backward()  # no KV cache in a training step
            first, steady = _timed(step, device, steps)
            return dict(first_ms=first, steady_ms=steady, tokens=p["batch"] * p["seq"])
        if phase == "batch":
            return _batch(model, p, g, device, steps)
        ids = torch.randint(2, p["vocab"], (p["batch"], p["prompt"]), generator=g).to(device)
        model.eval()

        def gen():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=p["new_tokens"], min_new_tokens=p["new_tokens"], do_sample=False,
                               use_cache=True, pad_token_id=0)
        first, steady = _timed(gen, device, steps)
        return dict(first_ms=first, steady_ms=steady, ms_per_token=steady / p["new_tokens"],
                    tokens=p["batch"] * p["new_tokens"])


def fresh_first_step(model: str, impl: str, preset: str | dict, device: str, dtype: torch.dtype,
                     timeout: float = 600.0) -> dict:
    """``impl``'s first training step of ``model`` in a new Python process (``_fresh_child``) that
    imports this attend, with the Triton toolchain the bench started with (``started_child_env``:
    not the ptxas that compiled FlexAttention set since), at ``preset`` (a ``PRESETS`` name, or the sizes themselves):
    ``{"first_fresh_ms": ms}``, or ``{"first_fresh_error": why}``. The child first runs a matmul
    forward and backward on ``device``, so what the figure holds is the implementation's own
    first-call cost (its compiles, kernel loads and dispatch decisions), the same for every row
    whatever ran before it."""
    p = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    code = (f"from attend.bench_models import _fresh_child; "
            f"_fresh_child({model!r}, {impl!r}, {json.dumps(p)!r}, {str(device)!r}, "
            f"{str(dtype).removeprefix('torch.')!r})")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env=started_child_env())
    except subprocess.TimeoutExpired:
        return dict(first_fresh_error=f"no first step within {timeout:.0f} s")
    last = r.stdout.strip().splitlines()[-1:] or [""]
    try:
        got = json.loads(last[0])
        return dict(first_fresh_ms=float(got["first_ms"]),
                    **{f"first_fresh_{k}": got[k] for k in ("compiles", "disk_hits", "compile_s") if k in got})
    except (ValueError, KeyError, TypeError):
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(first_fresh_error=f"exit {r.returncode}: {err}"[:400])


def _fresh_child(model_name: str, impl: str, sizes: str, device: str, dtype_name: str) -> None:
    """``fresh_first_step``'s process (``sizes``: the preset as JSON): prints ``{"first_ms": ...}``
    as its last line, with the step's Triton builds where Triton reports them: ``compiles`` (kernels
    built), ``disk_hits`` (loaded from Triton's disk cache) and ``compile_s`` (the builds' time)."""
    import transformers

    builds = _count_builds()

    import attend.integrations.transformers  # noqa: F401  (registers "attend")

    dtype = getattr(torch, dtype_name)
    p = json.loads(sizes)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(model_name, p),
                                                          attn_implementation="eager").to(device, dtype)
    x = torch.randn(256, 256, device=device, dtype=dtype, requires_grad=True)
    (x @ x).float().sum().backward()  # the CUDA context, cuBLAS and the allocator, before the clock
    _sync(device)
    builds.clear()
    first = _run_one(model, impl, "train", p, device, 1)["first_ms"]
    print(json.dumps(dict(first_ms=first, **builds)), flush=True)


@contextlib.contextmanager
def _one_triton_cache():
    """Hold this process and its fresh-process children on one Triton cache directory while the
    bench runs: the one in force at its start (``TRITON_CACHE_DIR``, else Triton's default), set in
    the environment where it is unset, and unset again at the end. Inductor sets the variable to its
    own directory the first time it compiles (the compiled ``flex_attention`` rows) where it is
    unset, and a child started after that would not find the kernels this process built
    (RESULTS.md, "H100, 2026-12-06 (night)", Models). Where Inductor has already compiled in this
    process, the directory in force is already its own."""
    pinned = None
    if not os.environ.get("TRITON_CACHE_DIR"):
        try:
            from triton import knobs

            pinned = os.environ["TRITON_CACHE_DIR"] = knobs.cache.dir
        except (ImportError, AttributeError):  # a Triton without knobs: its default stays
            pass
    try:
        yield
    finally:
        if pinned is not None:
            os.environ.pop("TRITON_CACHE_DIR", None)


def _count_builds() -> dict:
    """A dict that Triton's compilation listener keeps counting into (empty where this Triton has
    no listener): ``compiles``, ``disk_hits``, ``compile_s``."""
    counts: dict = {}
    try:
        from triton import knobs
    except ImportError:
        return counts

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        kind = "disk_hits" if cache_hit else "compiles"
        counts[kind] = counts.get(kind, 0) + 1
        if not cache_hit:
            counts["compile_s"] = round(counts.get("compile_s", 0.0) + times.total / 1e6, 3)

    if hasattr(getattr(knobs, "compilation", None), "listener"):
        knobs.compilation.listener = listener
    return counts


def batch_unavailable(impl: str) -> str | None:
    """Why the continuous-batching phase does not run ``impl`` with the installed transformers, or None."""
    import transformers

    if impl not in BATCH_IMPLS:
        return f"continuous batching is timed for {', '.join(BATCH_IMPLS)}"
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 23) and impl == "attend":
        return f"transformers {transformers.__version__} runs only its own implementations in continuous batching"
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        return f"transformers {transformers.__version__} has no ContinuousBatchingConfig"
    return None


@contextlib.contextmanager
def _cache_memory(device: str):
    """On the CPU, continuous batching's cache sizing reads no device memory (0 bytes free): give it
    1 GiB for the tiny preset's smoke run. On CUDA, nothing changes."""
    if str(device).startswith("cuda"):
        yield
        return
    import transformers.generation.continuous_batching.cache as cb_cache

    probe = cb_cache.get_device_and_memory_breakdown
    cb_cache.get_device_and_memory_breakdown = lambda: (torch.device(device), 1 << 30, 0, 0)
    try:
        yield
    finally:
        cb_cache.get_device_and_memory_breakdown = probe


def _batch(model, p: dict, g: torch.Generator, device: str, steps: int) -> dict:
    """``generate_batch`` of ``requests`` greedy prompts, lengths uniform in [prompt / 2, prompt],
    ``new_tokens`` each, on a paged cache sized for them (blocks of 256 keys; 64 of 16 at tiny)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    n, new = p["requests"], p["new_tokens"]
    lengths = torch.randint(p["prompt"] // 2, p["prompt"] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(2, p["vocab"], (length,), generator=g).tolist() for length in lengths]
    block = 256 if p["prompt"] >= 256 else 16
    blocks = sum(-(-(length + new) // block) for length in lengths) + n
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(block_size=block, num_blocks=blocks, max_batch_tokens=max(4 * block, 2 * p["prompt"]))
    model.eval()

    # A "paged|" name is kept as it is; any other, transformers switches to its flash implementation
    # where flash-attn is installed, which would time flash-attn in every row.
    model.set_attn_implementation("paged|" + model.config._attn_implementation)

    def run():
        with torch.no_grad(), _cache_memory(device):
            out = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb)
        if len(out) != n or any(len(r.generated_tokens) != new for r in out.values()):
            raise RuntimeError(f"generate_batch returned {len(out)} of {n} requests, or short ones")
    first, steady = _timed(run, device, min(steps, 3))
    return dict(first_ms=first, steady_ms=steady, tokens=n * new, tokens_per_s=n * new / steady * 1e3)


def main(preset: str = "full", impls=IMPLS, json_path: str | None = "bench_models.json", device: str = "cuda",
         dtype: torch.dtype = torch.bfloat16, steps: int = 5, new_tokens: int | None = None, models=MODELS,
         phases=PHASES, fresh_first: bool | None = None) -> list[dict]:
    """Time every (model, implementation, phase) and write the rows to ``json_path``; returns the rows.
    ``fresh_first`` (default: on CUDA): each training row's first step again in a process of its own
    (``fresh_first_step``), once the model's other rows are done."""
    try:
        import transformers
    except ImportError as e:
        raise SystemExit(f"--suite models needs Hugging Face transformers (pip install transformers): {e}") from e

    with _one_triton_cache():
        return _main(transformers, preset, impls, json_path, device, dtype, steps, new_tokens, models, phases,
                     fresh_first)


def _counted(before: dict, now: dict) -> dict:
    """The path counters that moved since ``before``, by how much."""
    return {k: n - before[k] for k, n in now.items() if n != before[k]}


def _main(transformers, preset, impls, json_path, device, dtype, steps, new_tokens, models, phases,
          fresh_first) -> list[dict]:
    """``main`` with transformers imported, inside ``_one_triton_cache``."""
    import attend.integrations.transformers  # noqa: F401  (registers "attend")
    from attend._flex import dispatch as flex_dispatch
    from attend._flex import varlen as flex_varlen

    p = dict(PRESETS[preset])
    if new_tokens is not None:
        p["new_tokens"] = new_tokens
    meta = dict(preset=preset, shape=p, dtype=str(dtype).removeprefix("torch."), device=_device_name(device),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    rows = []
    for model_name in models:
        cfg = _config(model_name, p)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(device, dtype)
        for impl in impls:
            for phase in phases:
                if phase == "batch" and (why := batch_unavailable(impl)):
                    if impl in BATCH_IMPLS:  # the installed transformers cannot: say so once per model
                        rows.append(dict(model=model_name, impl=impl, phase=phase, ok=False, skipped=why, flex_paths={},
                                         varlen_paths={}))
                        print(_line(rows[-1]), flush=True)
                    continue
                row = dict(model=model_name, impl=impl, phase=phase, ok=True)
                before, before_varlen = dict(flex_dispatch.PATHS), dict(flex_varlen.PATHS)
                try:
                    row.update(_run_one(model, impl, phase, p, device, steps))
                except Exception as e:  # a path that cannot run this model gets a row saying why
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
                finally:
                    row["flex_paths"] = _counted(before, flex_dispatch.PATHS)
                    row["varlen_paths"] = _counted(before_varlen, flex_varlen.PATHS)
                    model.zero_grad(set_to_none=True)
                    if str(device).startswith("cuda"):
                        torch.cuda.empty_cache()
                rows.append(row)
                print(_line(row), flush=True)
                if json_path:  # saved as each row finishes, so a time limit keeps the rows done
                    with open(json_path, "w") as f:
                        json.dump(dict(meta=meta, rows=rows), f, indent=1)
        del model
        if fresh_first if fresh_first is not None else str(device).startswith("cuda"):
            gc.collect()  # a failed row's traceback may hold the model's tensors in a cycle
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()  # the child needs the memory this process held for the model
            for row in rows:
                if row["model"] == model_name and row["phase"] == "train" and row["ok"]:
                    row.update(fresh_first_step(model_name, row["impl"], p, device, dtype))
                    print(_line(row), flush=True)
                    if json_path:
                        with open(json_path, "w") as f:
                            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _line(r: dict) -> str:
    head = f"{r['model']:<7} {r['impl']:<15} {r['phase']:<14}"
    if r.get("skipped"):
        return f"{head} not timed: {r['skipped']}"
    if not r["ok"]:
        return f"{head} failed: {r['error']}"
    tail = f"  {r['ms_per_token']:.2f} ms/token" if "ms_per_token" in r else ""
    tail += f"  {r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r else ""
    if r.get("flex_paths"):
        tail += "  flex " + ", ".join(f"{k} {n}" for k, n in r["flex_paths"].items())
    if r.get("varlen_paths"):
        tail += "  varlen score_mod " + ", ".join(f"{k} {n}" for k, n in r["varlen_paths"].items())
    if "first_fresh_ms" in r:
        tail += f"  first in a fresh process {r['first_fresh_ms'] / 1e3:.2f} s"
        if r.get("first_fresh_compiles") or r.get("first_fresh_disk_hits"):
            tail += (f" ({r.get('first_fresh_compiles', 0)} Triton builds, {r.get('first_fresh_compile_s', 0.0):.2f} s;"
                     f" {r.get('first_fresh_disk_hits', 0)} from the disk cache)")
    elif "first_fresh_error" in r:
        tail += f"  first in a fresh process: {r['first_fresh_error']}"
    return f"{head} first {r['first_ms'] / 1e3:8.2f} s  steady {r['steady_ms']:9.1f} ms{tail}"

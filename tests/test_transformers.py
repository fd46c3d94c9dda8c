"""attend inside Hugging Face transformers models: ``attn_implementation="attend"`` against
``"eager"`` on tiny random-init models built from transformers' own classes.

Every call here goes through the model, so attend sees what models hand over: ``(B, H, L, D)``
views of ``(B, L, H, D)`` projections, and K/V from a KV cache. Logits and gradients are checked
with tolerances scaled by eager's own float32 error against a float64 copy of the model. The
gradient tests run attend's Triton core (under the interpreter on the CPU); generation, packing and
caching tests run the CPU's blocked kernel for SDPA and varlen_attn, which takes the same routes and
is fast enough for 32 decode steps per model. Gemma 2's softcap runs attend's FlexAttention, whose
fused core runs fp32 under the interpreter too: those tests assert that it ran (``dispatch.PATHS``).
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attend.integrations.transformers as at  # noqa: E402  (registers "attend")
from attend.flex_attention import BlockMask  # noqa: E402
from attend.integrations.transformers import _common, _masks, _routes, _traced  # noqa: E402
from attend._versions import GRAPH_MADE_MODS  # noqa: E402
from attend._flex import dispatch as flex_dispatch  # noqa: E402
from attend._flex import varlen as flex_varlen  # noqa: E402
from attend.kernels import launch  # noqa: E402
from attend.kernels.options import kernel_options  # noqa: E402
from conftest import DEVICE  # noqa: E402

from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

VOCAB = 128
# initializer_range 0.2 makes the scores O(1), so that a wrong window, softcap or sink moves the
# logits far past float32 noise (at transformers' default 0.02 the attention is nearly uniform).
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
WINDOW = 8
# transformers renamed past_key_values to cache (5.2x; the old name is deprecated, not yet removed)
from transformers.masking_utils import create_causal_mask as _create_causal_mask  # noqa: E402

CACHE = "cache" if "cache" in inspect.signature(_create_causal_mask).parameters else "past_key_values"


def _configs() -> dict:
    cfgs = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
        "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
        "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                        final_logit_softcapping=None, query_pre_attn_scalar=16)),
        "gpt_oss": ("GptOssConfig", dict(head_dim=16, sliding_window=WINDOW, num_local_experts=2,
                                         num_experts_per_tok=1, rope_parameters=dict(rope_type="default",
                                                                                     rope_theta=10000.0))),
    }
    return {name: (getattr(transformers, cls), kw) for name, (cls, kw) in cfgs.items() if hasattr(transformers, cls)}


CONFIGS = _configs()
MODELS = list(CONFIGS)
# What each model exercises: the route of its attention calls (see at.explain).
FEATURES = {"llama": "causal", "mistral": "sliding window", "qwen2": "window on layer 1", "gemma2": "softcap + window",
            "gpt_oss": "sinks + window"}


def build(name: str, impl: str = "eager", seed: int = 0) -> torch.nn.Module:
    cls, kw = CONFIGS[name]
    cfg = cls(**{**COMMON, **kw})
    torch.manual_seed(seed)
    # experts in plain torch ops: the float64 oracle needs them (grouped_mm has no float64)
    extra = {"experts_implementation": "eager"} if name == "gpt_oss" else {}
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, **extra).float().to(DEVICE)
    for mod in model.modules():  # gpt-oss: sinks of the scores' size, so they matter
        if hasattr(mod, "sinks"):
            with torch.no_grad():
                mod.sinks.copy_(torch.randn_like(mod.sinks))
    return model.eval()


def tokens(B: int, S: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (B, S), generator=g).to(DEVICE)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_scaled(out, ref64, ref32, what: str, k: float = 8.0) -> None:
    """err(attend) <= k * err(eager float32) + a floor of 1e-5 of the values' size, both against float64."""
    assert out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, base = _err(out, ref64), _err(ref32, ref64)
    tol = k * base + 1e-5 * ref64.abs().max().item() + 1e-7
    assert err <= tol, f"{what}: max error {err:.3e} > {k} * {base:.3e} + floor (tol {tol:.3e})"


def _loss(model, ids, mask=None, weights=None, **kw):
    logits = model(ids, attention_mask=mask, **kw).logits
    valid = torch.ones_like(logits) if mask is None or mask.dim() == 4 else mask[..., None].to(logits.dtype)
    return (logits * weights.to(logits.dtype) * valid).sum(), logits


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def flex_runs():
    """A function that returns how many flex calls ran each path since this call (dispatch.PATHS)."""
    before = dict(flex_dispatch.PATHS)
    return lambda: {k: v - before[k] for k, v in flex_dispatch.PATHS.items()}


def assert_fused_flex(runs: dict, forwards: int | None = None, backwards: int | None = None) -> None:
    """The calls ran fused kernels (forward, and backward where asked), never flex's blocked path:
    the Triton core's flex mode, or for a band mask without a score_mod the dense kernels
    (attend/_flex/band.py: "band", whose backward is the dense one, not counted: ``backwards``
    counts the core's flex backwards)."""
    assert runs["blocked"] == 0 and runs["blocked_backward"] == 0, f"flex ran its blocked path: {runs}"
    fused = runs["fused"] + runs["band"]
    if forwards is None:
        assert fused > 0, f"no fused flex forward ran: {runs}"
    else:
        assert fused == forwards, f"fused flex forwards: {runs}, expected {forwards}"
    if backwards is not None:
        assert runs["fused_backward"] == backwards, f"fused flex backwards: {runs}"


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["attend"] is at.attention_forward
    assert AttentionMaskInterface._global_mapping["attend"] is at.mask_for_attend


def test_from_config_and_set_attn_implementation():
    model = build("llama", "attend")
    assert model.config._attn_implementation == "attend"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("attend")
    assert model.config._attn_implementation == "attend"


def test_import_without_transformers_names_the_install():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import attend.integrations.transformers\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ":".join(sys.path)})
    assert "IMPORTERROR" in res.stdout, res.stdout + res.stderr
    assert "pip install transformers" in res.stdout


# ----------------------------------------------------------------------------------------------
# Logits and every parameter's gradient (attend's Triton core under the interpreter on the CPU)
# ----------------------------------------------------------------------------------------------

# Left padding with gradients: llama (unpadded varlen), gpt-oss (sinks on unpadded varlen) and Gemma 2
# (softcap: flex with key padding); a model's own 4-D mask (a mask tensor): gpt-oss's sinks through flex;
# the model's (B, L, H, D) row views run as packed sequences, as the Gluon kernels run them on an H200
# (KernelOptions.rows_packed): llama, and qwen2 with its grouped heads, without a cache (a DynamicCache
# hands over K / V contiguous, concatenated, and only q as row views).
GRAD_CASES = ([(m, "") for m in MODELS] + [(m, "left-padded") for m in ("llama", "gpt_oss", "gemma2") if m in CONFIGS]
              + [(m, "4d-mask") for m in ("gpt_oss",) if m in CONFIGS]
              + [(m, "rows-packed") for m in ("llama", "qwen2") if m in CONFIGS]
              + [(m, "compiled") for m in ("llama", "mistral", "gemma2", "gpt_oss") if m in CONFIGS]
              + [(m, "compiled-left-padded") for m in ("llama", "gemma2", "gpt_oss") if m in CONFIGS])
# Calls per forward that run flex, and per backward that run the core's flex backward: Gemma 2's every
# layer (softcap); gpt-oss's only with a 4-D mask; under torch.compile, flex_attention over the band
# (_traced_flex), whose calls with no score_mod run the dense kernels, backward too (not counted).
FLEX_LAYERS = {("gemma2", ""): (2, 2), ("gemma2", "left-padded"): (2, 2), ("gpt_oss", "4d-mask"): (2, 2),
               ("gemma2", "compiled-left-padded"): (2, 2), ("gemma2", "compiled"): (2, 2),
               # (sinks beside a mask under compile: flex over the padded BlockMask, or over the
               # materialized mask before torch 2.13)
               ("gpt_oss", "compiled-left-padded"): (2, 2)}
# (before torch 2.13 gpt-oss's calls run their eager route outside the graph: its global layer varlen_attn,
# its window layer, whose mask is materialized, flex; Mistral's window, materialized, SDPA)
FLEX_LAYERS[("gpt_oss", "compiled")] = (2, 0) if GRAPH_MADE_MODS else (1, 1)
if GRAPH_MADE_MODS:  # (and a padded batch's BlockMask from the mask builder: flex, forward and backward)
    FLEX_LAYERS[("mistral", "compiled")] = (2, 0)
    FLEX_LAYERS[("llama", "compiled-left-padded")] = (2, 2)
# Models whose attention leaves the compiled graph before torch 2.13 (softcap, sinks: docs/transformers.md)
OUTSIDE_THE_GRAPH = ("gemma2", "gpt_oss")
# Models Dynamo cannot compile fullgraph whatever the attention (gpt-oss: a loop over the experts hit)
NOT_FULLGRAPH = ("gpt_oss",)


def _custom_mask(B: int, S: int) -> torch.Tensor:
    """A (B, 1, S, S) bool mask no band describes: causal, minus a few keys per row (never the diagonal)."""
    g = torch.Generator().manual_seed(9)
    drop = torch.rand(B, 1, S, S, generator=g) < 0.3
    allowed = torch.ones(S, S, dtype=torch.bool).tril() & ~(drop & ~torch.eye(S, dtype=torch.bool))
    return allowed.to(DEVICE)


@pytest.mark.parametrize("name,variant", GRAD_CASES,
                         ids=[f"{m}({FEATURES[m]}){'-' + v if v else ''}" for m, v in GRAD_CASES])
def test_logits_and_grads_match_eager(name, variant, monkeypatch):
    """attend's logits and every parameter's gradient against eager attention's, both against float64.
    "compiled": the model under torch.compile (aot_eager, fullgraph: softcap, sinks and windows on
    flex_attention over the band in the graph), "compiled-left-padded" with a padding mask (from torch
    2.13 flex over a BlockMask of the padded keys, built in the graph; before, the mask materialized,
    as for transformers' sdpa under torch.compile)."""
    B, S = 2, 24
    ids = tokens(B, S)
    mask = None
    if variant in ("left-padded", "compiled-left-padded"):
        mask = torch.ones(B, S, dtype=torch.long, device=DEVICE)
        mask[0, :5] = 0
        mask[1, :2] = 0
    allowed = _custom_mask(B, S) if variant == "4d-mask" else None
    weights = torch.randn(B, S, VOCAB, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    eager = build(name)
    eager64 = copy.deepcopy(eager).double()
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("attend")
    materialized, real = [], _masks.sdpa_mask  # (B, 1, L, S) masks the mask builder made
    monkeypatch.setattr(_masks, "sdpa_mask", lambda **kw: materialized.append(kw["q_length"]) or real(**kw))
    results = {}
    for key, model in (("64", eager64), ("32", eager), ("attend", ours)):
        model.train()  # dropout is 0 in these configs; train() is what a training step runs
        if key == "64" and mask is not None:
            # eager in float64 turns fully masked (padded) rows into NaN, which then leak through
            # 0 * NaN: the oracle runs each sequence alone, at the positions the padded batch gives it.
            logits = torch.zeros(B, S, VOCAB, dtype=torch.float64, device=DEVICE)
            for b in range(B):
                keep = mask[b].bool()
                pos = torch.arange(S, device=DEVICE)[keep][None]
                out = model(ids[b:b + 1, keep], position_ids=pos).logits[0]
                (out * weights[b, keep].double()).sum().backward()
                logits[b, keep] = out.detach()
            results[key] = (logits, _grads(model))
            continue
        model_mask = mask
        if allowed is not None:  # eager adds its mask to the scores; attend takes the bool mask
            dtype = next(model.parameters()).dtype
            model_mask = allowed if key == "attend" else torch.zeros(allowed.shape, dtype=dtype, device=DEVICE) \
                .masked_fill(~allowed, torch.finfo(dtype).min)
        runs = flex_runs()
        packed_calls = launch._uniform.cache_info()
        with warnings.catch_warnings(), kernel_options(rows_packed=True if variant == "rows-packed" else None):
            warnings.simplefilter("error", at.UnfusedFeatureWarning)  # every feature here is fused
            run = model
            if key == "attend" and variant.startswith("compiled"):
                torch._dynamo.reset()
                run = torch.compile(model, backend="aot_eager",
                                    fullgraph=name not in NOT_FULLGRAPH and (
                                        GRAPH_MADE_MODS or name not in OUTSIDE_THE_GRAPH))
            loss, logits = _loss(run, ids, model_mask, weights,
                                 **({"use_cache": False} if variant in ("rows-packed", "compiled-left-padded") else {}))
            loss.backward()
        if key == "attend" and variant == "rows-packed":
            now = launch._uniform.cache_info()
            assert now.hits + now.misses > packed_calls.hits + packed_calls.misses, "no row call ran packed"
        results[key] = (logits.detach(), _grads(model))
    forwards, backwards = FLEX_LAYERS.get((name, variant), (0, 0))
    assert_fused_flex(runs(), forwards=forwards, backwards=backwards)
    if GRAPH_MADE_MODS or not variant.startswith("compiled"):  # (before torch 2.13 a graph materializes them)
        assert materialized == [], f"masks materialized for query lengths {materialized}"
    valid = (slice(None),) if mask is None else (mask.bool(),)
    assert_scaled(results["attend"][0][valid], results["64"][0][valid], results["32"][0][valid], f"{name} logits")
    grads64, grads32, ours_g = results["64"][1], results["32"][1], results["attend"][1]
    assert set(ours_g) == set(grads32), f"{name}: parameters with gradients differ"
    for pname in grads32:
        assert_scaled(ours_g[pname], grads64[pname], grads32[pname], f"{name} d{pname}")
    if name == "gpt_oss":
        assert any("sinks" in n and g.abs().max() > 0 for n, g in ours_g.items()), "no gradient reached the sinks"


@pytest.mark.parametrize("name", MODELS)
def test_bf16_logits_and_grads_match_eager(name, use_kernel):
    """bfloat16, what models train in (the CPU's blocked kernel here; the Triton core on the GPU):
    attend's error against the float64 model within a multiple of eager bfloat16's."""
    use_kernel("blocked")
    B, S = 2, 24
    ids = tokens(B, S, seed=7)
    weights = torch.randn(B, S, VOCAB, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    eager = build(name)
    models = {"64": copy.deepcopy(eager).double(), "bf16": copy.deepcopy(eager).bfloat16()}
    models["attend"] = copy.deepcopy(models["bf16"])
    models["attend"].set_attn_implementation("attend")
    results = {}
    for key, model in models.items():
        model.train()
        loss, logits = _loss(model, ids, None, weights)
        loss.backward()
        results[key] = (logits.detach(), _grads(model))
    assert_scaled(results["attend"][0], results["64"][0], results["bf16"][0], f"{name} bf16 logits", k=4)
    for pname, g in results["bf16"][1].items():
        assert_scaled(results["attend"][1][pname], results["64"][1][pname], g, f"{name} bf16 d{pname}", k=4)


# ----------------------------------------------------------------------------------------------
# Generation, KV cache, packing (the CPU's blocked kernel)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,padded", [("llama", True), ("mistral", False), ("gemma2", True)],
                         ids=["llama-padded (mask memos)", "mistral (packing offsets)", "gemma2-padded (BlockMasks)"])
def test_inference_mode_forward_then_a_training_step(name, padded, use_kernel):
    """torch.inference_mode first, at a shape no other test uses (so the integration's caches start
    empty for it): the mask and position tensors are inference tensors, which keep no version
    counter, so nothing read from them is kept, and what is kept (packing offsets, BlockMasks) is
    never made of inference tensors, which a later training step could not save for backward. The
    logits equal no_grad's, and the training step's gradients are finite."""
    use_kernel("blocked")
    model = build(name)
    model.set_attn_implementation("attend")
    ids = tokens(2, 11, seed=5)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    kw = lambda m: dict(attention_mask=m) if padded else {}
    with torch.inference_mode():
        got = model(ids.clone(), **kw(mask.clone())).logits
    with torch.no_grad():
        want = model(ids, **kw(mask)).logits
    assert torch.equal(got, want)
    model.train()
    model(ids, **kw(mask)).logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_generate_greedy_matches_eager(name, use_kernel):
    use_kernel("blocked")
    B, S, NEW = 2, 12, 12  # 24 positions: past the window (8) and a 16-key tile's edge
    ids = tokens(B, S, seed=3)
    mask = torch.ones(B, S, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0  # left padding: unpadded prefill, then decode with a key vector
    eager = build(name)
    ref = eager.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=True,
                         pad_token_id=0)
    eager.set_attn_implementation("attend")
    runs = flex_runs()
    out = eager.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=True,
                         pad_token_id=0)
    assert out.shape == ref.shape == (B, S + NEW)
    assert torch.equal(out, ref), f"{name}: greedy tokens differ from eager\n{out}\n{ref}"
    if name == "gemma2":  # prefill and every decode step, each layer: softcap through fused flex, except on a
        # GPU the padded prefill: an inference softcap takes varlen_attn's score_mod on attend's Triton kernels
        # (on the CPU the blocked kernel runs, and flex serves it)
        assert_fused_flex(runs(), forwards=2 * (NEW - 1) if DEVICE == "cuda" else 2 * NEW)


def test_fullgraph_compile_of_a_route_outside_the_graph_says_why():
    """Under torch.compile a 2-D padding mask handed to the attention function runs varlen_attn /
    flex_attention outside the graph (a graph break: the sequence lengths are host integers), so
    fullgraph=True fails, with a reason that names the feature and the remedy; without fullgraph the
    call runs and equals the eager one."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).to(DEVICE) for _ in range(3))
    padding = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    padding[0, :5] = False
    module = torch.nn.Module()

    def call(q, k, v):
        return at.attention_forward(module, q, k, v, padding, softcap=5.0)[0]

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"(?s)2-D padding mask.*fullgraph=False"):
        torch.compile(call, backend="aot_eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(call, backend="aot_eager")(q, k, v), call(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_generate_with_a_static_cache(name, use_kernel):
    """A static cache hands over all its slots: decode steps get a key vector that stops at the
    filled ones; the prefill (queries not bottom-right in the slots) gets the materialized mask."""
    use_kernel("blocked")
    ids = tokens(2, 12, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eager = build(name)
    # disable_compile: on a GPU, generate() compiles the step of a static cache (the next test); this
    # test is the routing
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, cache_implementation="static", pad_token_id=0,
              disable_compile=True)
    ref = eager.generate(ids, **kw)
    eager.set_attn_implementation("attend")
    _common._warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = eager.generate(ids, **kw)
    if name == "llama":  # Mistral's sliding layers keep a window of slots that stays bottom-right aligned
        assert any("static cache" in str(w.message) for w in seen), [str(w.message) for w in seen]
    assert torch.equal(out, ref), f"{name}: greedy tokens with a static cache differ from eager"


@pytest.mark.parametrize("name", ["mistral", pytest.param("gemma2", marks=pytest.mark.skipif(
    not GRAPH_MADE_MODS or "gemma2" not in CONFIGS, reason="Gemma 2's softcap is in the graph from torch 2.13"))])
def test_generate_compiles_a_static_cache_step_fullgraph(name):
    """generate() with a static cache compiles its decode step (on a GPU by default; here through
    the compile_config that allows every device), fullgraph: Mistral's sliding layers and Gemma 2's
    softcap (flex over the step's key vector), padded, give eager's greedy tokens, and the step ran
    compiled (Dynamo counted graphs)."""
    from transformers import CompileConfig

    ids = tokens(2, 12, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eager = build(name)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    ref = eager.generate(ids, disable_compile=True, **kw)
    eager.set_attn_implementation("attend")
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers' switch for compiling on the CPU too
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = eager.generate(ids, compile_config=config, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "generate() compiled nothing"
    assert torch.equal(out, ref), "greedy tokens of the compiled static-cache steps differ from eager"


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_chunked_prefill_bottom_right(name, use_kernel):
    """A prompt fed in chunks through the KV cache (L < S: bottom-right causal) equals one pass."""
    use_kernel("blocked")
    ids = tokens(2, 28, seed=4)
    eager = build(name)
    with torch.no_grad():
        ref = eager(ids).logits
        ours = copy.deepcopy(eager)
        ours.set_attn_implementation("attend")
        cache = DynamicCache(config=ours.config)
        runs = flex_runs()
        chunks = [ours(ids[:, a:b], **{CACHE: cache}, use_cache=True).logits for a, b in ((0, 12), (12, 21), (21, 28))]
    torch.testing.assert_close(torch.cat(chunks, 1), ref, atol=2e-4, rtol=1e-4)
    if name == "gemma2":
        assert_fused_flex(runs(), forwards=3 * 2)


@pytest.mark.parametrize("name", MODELS)
def test_packed_batch_equals_padded_batch(name, use_kernel):
    """Padding-free packing (position_ids that restart, and cu_seq_lens) gives the padded batch's logits."""
    use_kernel("blocked")
    lens = [10, 15, 7]
    S = max(lens)
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    padded = torch.zeros(len(lens), S, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
        mask[i, :len(s)] = 1
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lens])[None].to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    model = build(name, "attend")
    runs, varlen_fused = flex_runs(), flex_varlen.PATHS["fused"]
    with torch.no_grad():
        ref = model(padded, attention_mask=mask).logits
        # with a cache (the default in eval) transformers builds no packed mask: the attention call
        # finds the restarts in position_ids; without one the mask builder hands over sequence ids
        by_positions = model(packed, position_ids=position_ids).logits[0]
        by_mask = model(packed, position_ids=position_ids, use_cache=False).logits[0]
        by_cu = model(packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=S,
                      max_length_k=S).logits[0]
    want = ref[mask.bool()]
    if name == "gemma2":  # padded, then packed by positions, sequence ids and cu_seq_lens: 4 forwards, on
        # flex with the CPU's blocked kernel, on varlen_attn's score_mod with the Triton kernels (a GPU)
        if DEVICE == "cuda":
            assert flex_varlen.PATHS["fused"] == varlen_fused + 4 * 2, flex_varlen.PATHS
        else:
            assert_fused_flex(runs(), forwards=4 * 2)
    torch.testing.assert_close(by_positions, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(by_mask, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(by_cu, want, atol=2e-5, rtol=1e-5)
    # and eager agrees with the padded batch, so this is not a shared mistake
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(eager(padded, attention_mask=mask).logits[mask.bool()], want, atol=2e-5, rtol=1e-5)


def test_compiled_chunked_prefill_and_decode_keep_the_band_fullgraph(monkeypatch):
    """Under torch.compile (fullgraph), Llama's chunked prefill (queries bottom-right in a
    DynamicCache's keys, L < S) and a first step of one token take the band in the graph, with no
    mask materialized: the full forward's logits."""
    from transformers import DynamicCache

    model = build("llama", "attend")
    ids = tokens(2, 20)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    materialized, real = [], _masks.sdpa_mask
    monkeypatch.setattr(_masks, "sdpa_mask", lambda **kw: materialized.append(kw["q_length"]) or real(**kw))
    with torch.no_grad():
        ref = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = compiled(ids[:, :12], past_key_values=cache, use_cache=True).logits
        rest = compiled(ids[:, 12:], past_key_values=cache, use_cache=True).logits
        one = compiled(ids[:, :1], past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    assert materialized == [], materialized
    torch.testing.assert_close(torch.cat([first, rest], 1), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(one, ref[:, :1], atol=2e-5, rtol=1e-5)


# Mistral: a window on every layer; Gemma 2: a softcap, a window layer and a causal one
PACKED_COMPILE_CASES = [m for m in ("mistral", "gemma2") if m in CONFIGS]


@pytest.mark.skipif(not GRAPH_MADE_MODS, reason="transformers' mask functions are read in the graph from torch 2.13")
@pytest.mark.parametrize("name", PACKED_COMPILE_CASES)
def test_compiled_step_without_a_cache_reads_the_packed_batch(name, monkeypatch):
    """A training step with ``use_cache=False`` under torch.compile (fullgraph): transformers builds
    its packed-sequence mask from ``position_ids`` whether or not they restart (it cannot look in
    the graph). attend reads that mask function in the graph (``_read_in_graph``) and runs flex over
    a BlockMask of the sequence ids (``_block_mask_over``: causal, Mistral's window, Gemma 2's
    softcap), materializing nothing; logits and every gradient against eager's, both against float64.
    One row packs two sequences, the other is one."""
    B, S = 2, 24
    ids = tokens(B, S, seed=4)
    position_ids = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(S)]).to(DEVICE)
    weights = torch.randn(B, S, VOCAB, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    eager = build(name)
    models = {"64": copy.deepcopy(eager).double(), "32": eager, "attend": copy.deepcopy(eager)}
    models["attend"].set_attn_implementation("attend")
    materialized, real = [], _masks.sdpa_mask
    monkeypatch.setattr(_masks, "sdpa_mask", lambda **kw: materialized.append(kw["q_length"]) or real(**kw))
    results = {}
    for key, model in models.items():
        model.train()
        run = model
        if key == "attend":
            torch._dynamo.reset()
            run = torch.compile(model, backend="aot_eager", fullgraph=True)
            runs = flex_runs()
        loss, logits = _loss(run, ids, None, weights, position_ids=position_ids, use_cache=False)
        loss.backward()
        results[key] = (logits.detach(), _grads(model))
    assert materialized == [], materialized
    layers = models["attend"].config.num_hidden_layers
    assert_fused_flex(runs(), forwards=layers, backwards=layers)
    assert_scaled(results["attend"][0], results["64"][0], results["32"][0], f"{name} logits")
    for pname, g in results["32"][1].items():
        assert_scaled(results["attend"][1][pname], results["64"][1][pname], g, f"{name} d{pname}")


def _compiled_matches_eager(model, ids, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and every gradient, eagerly and under torch.compile (aot_eager), equal;
    (eager's logits, the compiled ones)."""
    results = []
    torch._dynamo.reset()
    for run in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        logits = run(ids, **kw).logits
        logits.square().mean().backward()
        results.append((logits.detach(), _grads(model)))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    return ref, out


@pytest.mark.skipif(not GRAPH_MADE_MODS, reason="transformers' mask functions are read in the graph from torch 2.13")
def test_graph_block_mask_reaching_an_eager_layer():
    """Reentrant activation checkpointing under torch.compile runs the layers eagerly with the mask
    the graph built (a packed batch's BlockMask, then a padded one's): the eager route takes the
    ids or padding it is over, as outside the graph; logits and gradients equal the uncompiled
    model's."""
    B, S = 2, 16
    ids = tokens(B, S, seed=8)
    position_ids = torch.stack([torch.cat([torch.arange(6), torch.arange(10)]), torch.arange(S)]).to(DEVICE)
    pad = torch.ones(B, S, dtype=torch.long, device=DEVICE)
    pad[0, 12:] = 0
    model = build("llama", "attend").train()
    if hasattr(model, "activation_checkpointing_enable"):  # (gradient_checkpointing_enable's new name)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for kw in (dict(position_ids=position_ids), dict(attention_mask=pad)):
        _compiled_matches_eager(model, ids, use_cache=False, **kw)


def test_mask_functions_read_in_the_graph_mask_as_transformers_does():
    """``_read_in_graph`` changes no attention implementation's masks: transformers' ``sdpa`` and
    ``eager`` under torch.compile give their uncompiled logits on a packed batch with no cache (the
    mask functions it reads there); a mask function made in the graph is read as outside it; and
    the packed BlockMask's mask (``_mask_of``, what a call with dropout runs) is transformers'."""
    B, S = 2, 24
    ids = tokens(B, S, seed=6)
    position_ids = torch.stack([torch.cat([torch.arange(9), torch.arange(15)]), torch.arange(S)]).to(DEVICE)
    for impl in ("sdpa", "eager"):
        model = build("mistral", impl)
        with torch.no_grad():
            ref = model(ids, position_ids=position_ids, use_cache=False).logits
            torch._dynamo.reset()
            out = torch.compile(model, backend="aot_eager", fullgraph=True)(
                ids, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=impl)
    if not GRAPH_MADE_MODS:
        return
    from transformers import masking_utils as mu

    def parts(pos):
        packed = mu.find_packed_sequence_indices(pos)
        fn = mu.and_masks(mu.remap_positions_for_packed_sequence(mu.sliding_window_causal_mask_function(WINDOW), pos),
                          mu.packed_sequence_mask_function(packed))
        spec = _masks._mask_spec(fn)
        return spec.causal, spec.window, spec.packed

    torch._dynamo.reset()
    causal, window, packed = torch.compile(parts, backend="aot_eager", fullgraph=True)(position_ids)
    assert (causal, window) == (True, WINDOW)
    assert packed.tolist() == [[0] * 9 + [1] * 15, [0] * S]

    def unread(x):  # a function no builder of _READ_BUILDERS made: materialized, no error in the graph
        fn = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 3)
        return at.mask_for_attend(B, S, S, mask_function=fn, attention_mask=None, device=DEVICE, dtype=torch.float32)

    torch._dynamo.reset()
    want = mu.sdpa_mask(batch_size=B, q_length=S, kv_length=S, allow_is_causal_skip=False, device=DEVICE,
                        mask_function=mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 3))
    assert torch.equal(torch.compile(unread, backend="aot_eager", fullgraph=True)(position_ids), want)
    registered = list(_masks._READ_IN_GRAPH)  # importing the module again registers nothing twice
    _masks._READ_IN_GRAPH.clear()
    _masks._read_in_graph()
    assert _masks._READ_IN_GRAPH == registered
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(mu.sliding_window_causal_mask_function(WINDOW),
                                                             position_ids),
                      mu.packed_sequence_mask_function(mu.find_packed_sequence_indices(position_ids)))
    want = mu.sdpa_mask(batch_size=B, q_length=S, kv_length=S, mask_function=fn, allow_is_causal_skip=False,
                        device=DEVICE)
    spec = _masks._mask_spec(fn)
    block_mask = _masks._block_mask_over(_masks._packed_mod, spec.packed.to(torch.int32), spec, B, S)
    assert torch.equal(_masks._mask_of(block_mask), want)


def test_compiled_packed_batch_found_in_position_ids():
    """Under torch.compile a batch of one whose position_ids may restart (a cache, no mask:
    transformers builds none) runs flex over the BlockMask of the sequences its position_ids give,
    in the graph (from torch 2.13; before, outside it, where attend finds them as eagerly):
    eager's logits and gradients, and each sequence's own logits; fullgraph=True compiles it, or
    before torch 2.13 says why it cannot."""
    lens = [10, 15, 7]
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lens])[None].to(DEVICE)
    model = build("llama", "attend").train()
    ref, out = _compiled_matches_eager(model, packed, position_ids=position_ids)
    with torch.no_grad():
        alone = torch.cat([model(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(out[0], alone, atol=2e-5, rtol=1e-5)
    torch._dynamo.reset()
    if GRAPH_MADE_MODS:
        with torch.no_grad():
            full = torch.compile(model, backend="aot_eager", fullgraph=True)(packed, position_ids=position_ids).logits
        torch.testing.assert_close(full, ref, atol=2e-5, rtol=1e-5)
        return
    with pytest.raises(Exception, match=r"(?s)position_ids may restart.*fullgraph=False"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(packed, position_ids=position_ids)


# ----------------------------------------------------------------------------------------------
# What the mask builder hands over, and which route each model's calls take
# ----------------------------------------------------------------------------------------------

def test_mask_builder_never_materializes_a_band():
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    model = build("mistral", "attend")
    cfg = model.config
    emb = torch.zeros(2, 16, 64, device=DEVICE)
    full = torch.ones(2, 16, dtype=torch.long, device=DEVICE)
    kw = dict(config=cfg, inputs_embeds=emb, **{CACHE: None})
    assert create_causal_mask(attention_mask=full, **kw) is None
    assert create_sliding_window_causal_mask(attention_mask=full, **kw) is None
    padded = full.clone()
    padded[0, :3] = 0
    m = create_causal_mask(attention_mask=padded, **kw)
    assert m.shape == (2, 16) and m.dtype == torch.bool          # the padding vector, not (B, 1, L, S)
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None].to(DEVICE)
    m = create_causal_mask(attention_mask=None, inputs_embeds=emb[:1], config=cfg, position_ids=pos, **{CACHE: None})
    assert m.dtype == torch.int32 and m.tolist() == [[0] * 6 + [1] * 10]   # packed sequence ids
    # decode with a cache longer than the window: one key vector (B, 1, 1, S)
    cache = DynamicCache(config=cfg)
    cache.update(torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16), 0)
    m = create_causal_mask(attention_mask=torch.ones(2, 21, dtype=torch.long), inputs_embeds=emb[:, :1], config=cfg,
                           position_ids=torch.full((2, 1), 20), **{CACHE: cache})
    assert m is None


def test_traced_mask_reads_the_mask_function():
    """Inside torch.compile the mask builder reads transformers' mask functions as outside it (from
    torch 2.13, ``_read_in_graph``; called here outside the graph, where it reads closures): a causal
    sliding window is the band (None); a packed batch (causal or not) or a causal padded batch from
    position 0 a BlockMask over its sequence ids or its keys, a bidirectional padded one the key
    vector; a chunked mask, a window beside a mask function attend does not know, or padding after
    a cache's keys is materialized: each equal to transformers' sdpa mask."""
    from transformers.masking_utils import (and_masks, bidirectional_mask_function, causal_mask_function,
                                            chunked_causal_mask_function, find_packed_sequence_indices,
                                            packed_sequence_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)

    B, L = 2, 24
    base = dict(batch_size=B, q_length=L, kv_length=L, q_offset=0, kv_offset=0, attention_mask=None,
                dtype=torch.float32, device=DEVICE, allow_is_causal_skip=True)
    sliding = dict(base, mask_function=sliding_window_causal_mask_function(WINDOW))
    ids = find_packed_sequence_indices(torch.cat([torch.arange(7), torch.arange(17)])[None].expand(B, L).to(DEVICE))
    packed = dict(base, mask_function=and_masks(sliding_window_causal_mask_function(WINDOW),
                                                packed_sequence_mask_function(ids)), allow_is_causal_skip=False)
    pad = torch.ones(B, L, dtype=torch.long, device=DEVICE)
    pad[0, :5] = 0  # left padding
    pad[1, 19:] = 0  # right padding
    padded = [dict(base, mask_function=f, attention_mask=pad) for f in (
        causal_mask_function, sliding_window_causal_mask_function(WINDOW))]
    if GRAPH_MADE_MODS:  # (before torch 2.13 these are materialized: their flex calls would leave the graph)
        assert _masks._traced_mask(dict(sliding)) is None
        bidirectional = dict(packed, mask_function=and_masks(bidirectional_mask_function,
                                                             packed_sequence_mask_function(ids)))
        for kw in (packed, bidirectional, *padded):
            got = _masks._traced_mask(dict(kw))
            want = sdpa_mask(**dict(kw, allow_is_causal_skip=False))
            assert isinstance(got, BlockMask) and torch.equal(_masks._mask_of(got), want)
        keys = _masks._traced_mask(dict(base, mask_function=bidirectional_mask_function, attention_mask=pad))
        want = sdpa_mask(**dict(base, mask_function=bidirectional_mask_function, attention_mask=pad,
                                allow_is_causal_skip=False))
        assert keys.shape == (B, 1, 1, L) and torch.equal(keys.expand(B, 1, L, L), want)
        # the call's window beside a causal mask (a model that builds one and passes a window): both kept
        causal_padded = _masks._traced_mask(dict(padded[0]))
        assert torch.equal(_masks._mask_of(_masks._with_window(causal_padded, WINDOW)), _masks._mask_of(
            _masks._traced_mask(dict(padded[1]))))
        assert _masks._with_window(causal_padded, L) is causal_padded  # a window that cuts no key
        assert _masks._with_window(causal_padded, WINDOW) is _masks._with_window(causal_padded, WINDOW)  # per forward
        q = torch.randn(B, 4, L, 16, device=DEVICE)
        with pytest.raises(ValueError, match="sliding_window must be a positive int, got 0"):
            _traced._traced_attention(types.SimpleNamespace(is_causal=True), q, q[:, :2], q[:, :2], causal_padded,
                                      0.0, None, 0, None, True, None)
        # two sets of sequence ids: no one tensor says both
        assert _masks._mask_spec(and_masks(packed["mask_function"], packed_sequence_mask_function(ids))) is None
    # a padded prefill after a cache's keys (queries not at position 0): materialized
    cached = dict(padded[0], q_length=L - 4, q_offset=4, attention_mask=pad)
    assert torch.equal(_masks._traced_mask(dict(cached)), sdpa_mask(**dict(cached, allow_is_causal_skip=False)))
    chunked = dict(base, mask_function=chunked_causal_mask_function(WINDOW, torch.zeros(B, dtype=torch.long)))
    unknown = dict(sliding, mask_function=and_masks(sliding["mask_function"], lambda b, h, q, kv: q != 3))
    for kw in (chunked, unknown):
        got = _masks._traced_mask(dict(kw))
        want = sdpa_mask(**dict(kw, allow_is_causal_skip=False))
        assert got is not None and torch.equal(got, want)
    # the chunked mask is no window: row 9 sees keys 8 and 9 only, a window of 8 would give 2..9
    assert _masks._traced_mask(dict(chunked))[0, 0, 9].nonzero().flatten().tolist() == [8, 9]


def test_layer_window_when_the_call_names_none():
    """A model whose attention call passes no sliding_window still gets its window (the mask builder
    hands over none where a band will do): the module's own (Qwen2-MoE), or the config's where it
    has no per-layer types (PhiMoE); a config with per-layer types, or use_sliding_window off, or no
    window, gives none; the call's own, None included, always wins."""
    ns = types.SimpleNamespace
    module = lambda own=None, **cfg: ns(sliding_window=own, config=ns(**cfg))
    unnamed = at.NOT_NAMED
    assert at._layer_window(module(), 5) == 5
    assert at._layer_window(module(own=8, sliding_window=8), None) is None  # a global layer that says so
    assert at._layer_window(module(own=8, layer_types=["sliding_attention"], sliding_window=8), unnamed) == 8
    assert at._layer_window(module(sliding_window=8), unnamed) == 8  # PhiMoE
    assert at._layer_window(module(sliding_window=8, layer_types=["full_attention"]), unnamed) is None
    assert at._layer_window(module(sliding_window=8, use_sliding_window=False), unnamed) is None
    assert at._layer_window(module(), unnamed) is None
    assert at._layer_window(torch.nn.Module(), unnamed) is None


def _spy_calls(name: str, ids: torch.Tensor, **kw) -> list:
    """Run the model with an attention function that records what attend would do with each call."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        plan = at.explain(query, key, value, attention_mask, **{k: v for k, v in kwargs.items() if k != "dropout"},
                          is_causal=module.is_causal)
        calls.append((query.is_contiguous(), value.is_contiguous(), plan))
        return at.attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("attend_spy", spy)
    AttentionMaskInterface.register("attend_spy", at.mask_for_attend)
    model = build(name, "attend_spy")
    with torch.no_grad():
        model(ids, **kw)
    return calls


@pytest.mark.parametrize("name,route", [("llama", "route: sdpa"), ("mistral", "route: varlen"),
                                        ("gemma2", "route: flex"), ("gpt_oss", "route: varlen")])
def test_routes_on_model_views(name, route, use_kernel):
    use_kernel("blocked")
    if name not in CONFIGS:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    calls = _spy_calls(name, tokens(2, 24), use_cache=False)  # a cache would hand over its own copies
    assert calls and any(plan.startswith(route) for _, _, plan in calls), [p for _, _, p in calls]
    # values are always (B, L, H, D) projections seen through .transpose(1, 2); queries too, except
    # where the model's rotary embedding writes a fresh tensor (gpt-oss)
    assert not any(v_contig for _, v_contig, _ in calls), "the model handed over contiguous values, not views"
    if name != "gpt_oss":
        assert not any(q_contig for q_contig, _, _ in calls), "the model handed over contiguous queries, not views"
    if name == "llama":
        assert "attend would run:" in calls[0][2]
    if name == "gemma2":
        assert "softcap" in calls[0][2] and "flex_attention: score_mod softcap 2.0 * tanh(score / 2.0)" in calls[0][2]
        assert "mask causal & sliding window 8" in calls[0][2], calls[0][2]


@pytest.mark.parametrize("name,reason", [("mistral", "dropout 0.5 with padding, packing, a sliding window"),
                                         ("gemma2", "dropout 0.5 with a softcap")])
def test_dropout_beyond_sdpa_runs_unfused_and_says_so(name, reason, use_kernel):
    """varlen_attn and flex_attention have no dropout: a training step with attention dropout on a
    windowed or softcapped layer takes the unfused path (with dropout), warns, and still trains."""
    use_kernel("blocked")
    _common._warned.clear()
    model = build(name, "attend")
    model.config.attention_dropout = 0.5
    for mod in model.modules():
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.5
    model.train()
    ids = tokens(2, 16)
    runs = flex_runs()
    with pytest.warns(at.UnfusedFeatureWarning, match=reason):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert runs()["fused"] == runs()["blocked"] == 0
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    b = model(ids).logits
    assert not torch.equal(a, b), "dropout had no effect"


def test_paged_cache_raises_naming_the_feature():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="paged continuous-batching cache"):
        at.attention_forward(torch.nn.Module(), q, k, k, None, block_table=torch.zeros(1, 1, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# Continuous batching ("paged|attend"): transformers 5.17-5.22 switch an "attend" model to it
# ----------------------------------------------------------------------------------------------

def _continuous_batching():
    """transformers' ContinuousBatchingConfig where generate_batch runs "paged|attend", else None:
    from 5.23 it accepts only transformers' own implementations."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return ContinuousBatchingConfig if (major, minor) < (5, 23) else None


CB_CONFIG = _continuous_batching()
needs_cb = pytest.mark.skipif(CB_CONFIG is None, reason="needs transformers 5.17-5.22 (continuous batching that "
                                                         "calls paged|<implementation>)")


@needs_cb
def test_bench_models_batch_phase_tiny(tmp_path, use_kernel):
    """The models bench's continuous-batching phase runs attend and sdpa (paged|attend, paged|sdpa)."""
    use_kernel("blocked")
    from attend import bench_models

    rows = bench_models.main(preset="tiny", impls=("attend", "sdpa"), json_path=str(tmp_path / "m.json"),
                             device=DEVICE, dtype=torch.float32, steps=1, new_tokens=3, models=("llama",),
                             phases=("batch",))
    assert [(r["impl"], r["ok"]) for r in rows] == [("attend", True), ("sdpa", True)], rows
    assert all(r["tokens"] == 9 and r["tokens_per_s"] > 0 for r in rows), rows


@needs_cb
@pytest.mark.parametrize("name", [m for m in ("llama", "mistral", "gemma2", "gpt_oss") if m in CONFIGS])
def test_generate_batch_matches_eager_generate(name, use_kernel, monkeypatch):
    """generate_batch (continuous batching, one packed row, the paged cache) on an "attend" model gives
    the greedy tokens of eager generate() per prompt: Llama (causal), Mistral (window, shorter than the
    prompts), Gemma 2 (softcap on flex, window on every other layer), gpt-oss (sinks, window)."""
    import transformers.generation.continuous_batching.cache as cb_cache
    from transformers import GenerationConfig

    use_kernel("blocked")
    # the CPU has no device memory for the cache to size itself from
    monkeypatch.setattr(cb_cache, "get_device_and_memory_breakdown", lambda: (torch.device(DEVICE), 1 << 30, 0, 0))
    lengths, new = (5, 13, 9), 10
    prompts = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    eager = build(name)
    refs = [eager.generate(p[None], max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]
    model = build(name, "attend")
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = CB_CONFIG(block_size=16, num_blocks=16, max_batch_tokens=48)
    seen = []
    paged = at.paged_attention_forward
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, at.PAGED_NAME,
                        lambda *a, **kw: seen.append(1) or paged(*a, **kw))
    outs = model.generate_batch([p.tolist() for p in prompts], generation_config=gc, continuous_batching_config=cb)
    assert seen, "continuous batching did not call paged|attend"
    got = [outs[k].generated_tokens for k in sorted(outs, key=lambda r: int(r.split("_")[-1]))]
    assert got == refs, f"{name}: continuous batching's tokens differ from eager generate\n{got}\n{refs}"


class _FakePagedCache:
    """The paged cache's update as continuous batching calls it: the new keys are written at
    ``write_index``, then every sequence's keys read back at ``read_index`` (an empty read: the
    new keys alone)."""

    def __init__(self, pages: int, Hkv: int, D: int):
        self.k, self.v = torch.zeros(pages, Hkv, D), torch.zeros(pages, Hkv, D)

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        for pool, new in ((self.k, key_states), (self.v, value_states)):
            pool[write_index[0]] = new[0].transpose(0, 1)
        if read_index[0].numel() == 0:
            return key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        return self.k[read_index[0]], self.v[read_index[0]]


@pytest.mark.parametrize("window", [None, 3], ids=["full layer", "sliding layer"])
def test_paged_forward_against_float64_with_padding_tokens(window):
    """paged_attention_forward on a packed batch of two sequences (3 new queries after 5 cached keys,
    1 new query after 2), plus two padding query tokens and one padding key slot as a static-shape
    batch has: each sequence's queries see its keys bottom-right (causal, and a window of ``window``
    keys on a sliding layer, whose entries the per-layer-type dicts give), padding rows are 0;
    against a float64 loop."""
    g = torch.Generator().manual_seed(5)
    H, Hkv, D = 4, 2, 16
    cache = _FakePagedCache(32, Hkv, D)
    past = [5, 2]
    for i, n in enumerate(past):  # the cached keys of each sequence, at pages 10 * i + j
        cache.k[10 * i: 10 * i + n] = torch.randn(n, Hkv, D, generator=g)
        cache.v[10 * i: 10 * i + n] = torch.randn(n, Hkv, D, generator=g)
    new = [3, 1]
    T = sum(new) + 2  # two padding tokens
    q = torch.randn(1, T, H, D, generator=g).transpose(1, 2)
    k_new, v_new = (torch.randn(1, T, Hkv, D, generator=g).transpose(1, 2) for _ in range(2))
    write = torch.tensor([10 * 0 + 5, 10 * 0 + 6, 10 * 0 + 7, 10 * 1 + 2, 30, 31])
    read = torch.tensor([*range(0, 8), *range(10, 13), 29])  # the last slot pads the keys
    cu_q = torch.tensor([0, 3, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 11], dtype=torch.int32)
    layer = "sliding_attention" if window else "full_attention"
    other = "full_attention" if window else "sliding_attention"
    module = torch.nn.Module()
    module.layer_idx = 0
    module.sliding_window = window
    out, _ = at.paged_attention_forward(module, q, k_new, v_new, None, scaling=D ** -0.5, cache=cache,
                                        read_index=[read], write_index=[write], cu_seq_lens_q=cu_q,
                                        cu_seq_lens_k={layer: cu_k, other: None}, max_seqlen_q=3,
                                        max_seqlen_k={layer: 8, other: None}, sliding_window=window)
    assert out.shape == (1, T, H, D)
    keys, vals = cache.k[read].double(), cache.v[read].double()  # (T_k, Hkv, D), the new keys written
    for b in range(2):
        qs = q[0, :, cu_q[b]:cu_q[b + 1]].double()  # (H, L, D)
        ks, vs = (t[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0) for t in (keys, vals))
        L, S = qs.shape[1], ks.shape[1]
        allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        if window:
            allowed &= ~torch.ones(L, S, dtype=torch.bool).tril(S - L - window)
        s = (qs @ ks.transpose(-1, -2) * D ** -0.5).masked_fill(~allowed, float("-inf"))
        ref = (s.softmax(-1) @ vs).transpose(0, 1)  # (L, H, D)
        err = (out[0, cu_q[b]:cu_q[b + 1]].double() - ref).abs().max().item()
        assert err < 1e-5, f"sequence {b}: max error {err:.2e}"
    assert torch.equal(out[0, 4:], torch.zeros(2, H, D)), "padding tokens must give 0"


def test_paged_forward_errors_name_the_argument():
    q = torch.randn(1, 4, 2, 16)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(ValueError, match="paged cache"):
        at.paged_attention_forward(module, q, q[:, :2], q[:, :2], None)
    with pytest.raises(NotImplementedError, match="block_table"):
        at.paged_attention_forward(module, q, q[:, :2], q[:, :2], None, cache=object(),
                                   block_table=torch.zeros(1, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout=0.1"):
        at.paged_attention_forward(module, q, q[:, :2], q[:, :2], None, dropout=0.1, cache=object())


# ----------------------------------------------------------------------------------------------
# The flex route on calls no tiny model makes, against float64
# ----------------------------------------------------------------------------------------------

def _flex_case(case: str, g: torch.Generator):
    """(q, k, v views, attention_mask, attention_forward kwargs, allowed (B, 1, L, S), additive or None)."""
    B, H, Hkv, L, S, D = 2, 4, 2, 9, 13, 16
    i = torch.arange(L)[:, None] + (S - L)  # bottom-right positions of the queries
    j = torch.arange(S)[None, :]
    kw, additive = {}, None
    if case == "padding-chunk":  # chunked prefill of a left-padded batch: softcap, window, L < S
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, :6] = False
        mask = valid
        allowed = (j <= i) & (j > i - 5) & valid[:, None, None, :] & valid[:, None, -L:, None]
        kw = dict(softcap=2.5, sliding_window=5)
    elif case == "decode-window":  # a decode step past the window of a left-padded batch: softcap, window
        L = 1
        i = torch.arange(L)[:, None] + (S - L)
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[1, :3] = False
        mask = valid
        allowed = ((j - i).abs() < 5) & valid[:, None, None, :]
        kw = dict(softcap=2.5, sliding_window=5)
    elif case == "packed-cu":  # cu_seq_lens with fewer queries than keys per sequence: softcap, window
        B = 1
        cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 13], dtype=torch.int32)
        seq_q = torch.repeat_interleave(torch.arange(2), cu_q.diff())
        seq_k = torch.repeat_interleave(torch.arange(2), cu_k.diff())
        pos = torch.arange(L) + (cu_k[1:] - cu_q[1:])[seq_q]
        pos, same = pos[:, None], seq_q[:, None] == seq_k[None, :]
        mask = None
        allowed = (same & (j <= pos) & (j > pos - 3))[None, None]
        kw = dict(softcap=2.5, sliding_window=3, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=5,
                  max_length_k=7)
    elif case == "keys-sinks":  # an encoder-style key vector with L > 1: sinks on a mask tensor
        mask = torch.rand(B, 1, 1, S, generator=g) < 0.7
        mask[..., 0] = True
        allowed = mask
        kw = dict(is_causal=False, s_aux=torch.randn(H, generator=g))
    else:  # "additive": a model's own float 4-D mask, softcap and sinks
        keep = torch.rand(B, 1, L, S, generator=g) < 0.8
        keep[..., 0] = True
        mask = torch.randn(B, 1, L, S, generator=g).masked_fill(~keep, torch.finfo(torch.float32).min)
        allowed, additive = keep, mask.masked_fill(~keep, 0.0)
        kw = dict(softcap=3.0, s_aux=torch.randn(H, generator=g))
    q = (torch.randn(B, L, H, D, generator=g) * 1.5).transpose(1, 2)   # a model's views
    k = (torch.randn(B, S, Hkv, D, generator=g) * 1.5).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    to = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return (to(q), to(k), to(v), to(mask), {n: to(x) for n, x in kw.items()}, to(allowed.expand(B, 1, L, S)),
            to(additive))


@pytest.mark.parametrize("case", ["padding-chunk", "decode-window", "packed-cu", "keys-sinks", "additive"])
def test_flex_route_against_float64(case, monkeypatch):
    """attention_forward's flex route (fused forward and backward) on the mask forms it reads: key
    padding with bottom-right queries, a decode step past the window (its keys sliced, no BlockMask
    built), cu_seq_lens with L < S per sequence, a key vector, an additive 4-D mask; out and the
    gradients of q, k, v and the sinks within a multiple of float32's error."""
    g = torch.Generator().manual_seed(11)
    q, k, v, mask, kw, allowed, additive = _flex_case(case, g)
    builds = []
    real = _routes.create_block_mask
    monkeypatch.setattr(_routes, "create_block_mask", lambda *a, **kw_: builds.append(a[3:5]) or real(*a, **kw_))
    s_aux = kw.get("s_aux")
    leaves = [t.requires_grad_() for t in (q, k, v, s_aux) if t is not None]
    scale = 0.3
    assert at.explain(q, k, v, mask, scaling=scale, **kw).startswith("route: flex")
    runs = flex_runs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", at.UnfusedFeatureWarning)
        out, _ = at.attention_forward(torch.nn.Module(), q, k, v, mask, scaling=scale, **kw)
    out = out.transpose(1, 2)
    w = torch.randn(out.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    assert_fused_flex(runs(), forwards=1, backwards=1)
    if case == "decode-window":  # the last 5 keys, their padding as -inf scores: no BlockMask
        assert builds == [], builds
    refs = {}
    for dt in (torch.float64, torch.float32):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        ref = _reference(*ls[:3], allowed, scale, kw.get("softcap"), ls[3] if s_aux is not None else None,
                         None if additive is None else additive.to(dt))
        refs[dt] = (ref, torch.autograd.grad((ref * w.to(dt)).sum(), ls))
    assert_scaled(out, refs[torch.float64][0], refs[torch.float32][0], f"{case} out")
    for name, a, r64, r32 in zip("qkvs", grads, refs[torch.float64][1], refs[torch.float32][1]):
        assert_scaled(a, r64, r32, f"{case} d{name}")


@pytest.mark.parametrize("case", ["padding-chunk", "packed-cu"])
def test_an_inference_softcap_over_packed_sequences_runs_varlen(case, monkeypatch):
    """In inference, a padded prefill's or packed sequences' softcap runs on varlen_attn's
    score_mod (the core's score hooks, one launch), no BlockMask built; float64's result."""
    g = torch.Generator().manual_seed(11)
    q, k, v, mask, kw, allowed, additive = _flex_case(case, g)
    builds = []
    real = _routes.create_block_mask
    monkeypatch.setattr(_routes, "create_block_mask", lambda *a, **kw_: builds.append(a[3:5]) or real(*a, **kw_))
    assert at.explain(q, k, v, mask, scaling=0.3, **kw).startswith("route: varlen"), case
    fused = flex_varlen.PATHS["fused"]
    with torch.no_grad():
        out, _ = at.attention_forward(torch.nn.Module(), q, k, v, mask, scaling=0.3, **kw)
    assert flex_varlen.PATHS["fused"] == fused + 1 and builds == []
    refs = [_reference(*(t.to(dt) for t in (q, k, v)), allowed, 0.3, kw["softcap"], None, None)
            for dt in (torch.float64, torch.float32)]
    assert_scaled(out.transpose(1, 2), *refs, f"{case} out")  # padded query rows: 0, as rows that see no key


def test_decode_past_the_window_builds_no_block_mask(monkeypatch):
    """A decode step of an unpadded batch past the sliding window (Gemma 2's local layers in a long
    generation) reads the window's keys as a slice: no BlockMask per step, the fused flex forward,
    float64's result."""
    builds = []
    real = _routes.create_block_mask
    monkeypatch.setattr(_routes, "create_block_mask", lambda *a, **kw: builds.append(a[3:5]) or real(*a, **kw))
    g = torch.Generator().manual_seed(13)
    B, H, Hkv, S, D, W = 2, 4, 2, 21, 16, 6
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2).to(DEVICE)
    k, v = (torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).to(DEVICE) for _ in range(2))
    runs = flex_runs()
    out, _ = at.attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.3, softcap=2.5, sliding_window=W)
    assert builds == [], builds
    assert_fused_flex(runs(), forwards=1)
    said = at.explain(q, k, v, None, scaling=0.3, softcap=2.5, sliding_window=W)
    assert said.startswith("route: flex") and f"mask the last {W} keys (a decode step past the sliding window)" in said, said
    assert "\nforward: " in said and "\nbackward: none" in said, said  # flex_attention.explain's route
    allowed = (torch.arange(S) > S - 1 - W).view(1, 1, 1, S).expand(B, 1, 1, S).to(DEVICE)
    refs = [_reference(*(t.to(dt) for t in (q, k, v)), allowed, 0.3, 2.5, None, None)
            for dt in (torch.float64, torch.float32)]
    assert_scaled(out.transpose(1, 2), *refs, "decode past the window")


@pytest.mark.parametrize("form", ["key vector", "2-D"])
def test_padded_decode_steps_take_the_plan_with_no_block_mask(form, monkeypatch):
    """Decode steps of a left-padded batch with a softcap (Gemma 2's generate() on a padded batch;
    mask_for_attend's (B, 1, 1, S) key vector, or a 2-D padding mask): the padding goes into the
    score_mod as -inf scores, so no step builds a BlockMask and every step after the first launches
    the decode plan, though each brings a new, longer mask and cache; every step float64's result,
    the padded keys weightless."""
    from attend._flex import plan
    monkeypatch.setattr(plan, "_PLANS", {})  # the first step makes the class's plan
    builds = []
    real = _routes.create_block_mask
    monkeypatch.setattr(_routes, "create_block_mask", lambda *a, **kw: builds.append(a[3:5]) or real(*a, **kw))
    g = torch.Generator().manual_seed(19)
    B, H, Hkv, D = 2, 4, 2, 16
    k, v = (torch.randn(B, 70, Hkv, D, generator=g).transpose(1, 2).to(DEVICE) for _ in range(2))
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[1, :67] = False  # row 1's padding covers a whole key block and more
    mask = mask.to(DEVICE)
    made, planned = plan.STATS["made"], plan.STATS["planned"]
    steps = 3
    for i in range(steps):
        q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2).to(DEVICE)
        k, v = (torch.cat([t, torch.randn(B, 1, Hkv, D, generator=g).transpose(1, 2).to(DEVICE)], 2) for t in (k, v))
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)  # a new tensor each step, as generate() makes
        passed = mask[:, None, None, :] if form == "key vector" else mask
        if i == 0:
            said = at.explain(q, k, v, passed, scaling=0.3, softcap=2.5)
            assert "-inf at padded keys" in said and "no BlockMask" in said, said
        with torch.no_grad():
            out, _ = at.attention_forward(torch.nn.Module(), q, k, v, passed, scaling=0.3, softcap=2.5)
        allowed = mask[:, None, None, :]
        refs = [_reference(*(t.to(dt) for t in (q, k, v)), allowed, 0.3, 2.5, None, None)
                for dt in (torch.float64, torch.float32)]
        assert_scaled(out.transpose(1, 2), *refs, f"padded decode step {i}")
    assert builds == [], builds
    assert plan.STATS["made"] == made + 1 and plan.STATS["planned"] == planned + steps - 1
    if form == "key vector":  # one that holds a sliding window cutting keys keeps its BlockMask (skips them)
        said = at.explain(q, k, v, mask[:, None, None, :], scaling=0.3, softcap=2.5, sliding_window=8)
        assert "bool mask read per block" in said and "-inf at padded keys" not in said, said


@pytest.mark.parametrize("D,Dv", [(288, 288), (16, 32)], ids=["head dim 288", "value head dim 32"])
def test_calls_varlen_refuses_take_another_route(D, Dv):
    """A padded prefill that varlen_attn cannot take (a head dim past the Triton core's 256, or a
    value head dim of its own): without a softcap the unfused path, saying why; with a softcap
    (inference) flex, where it ran before varlen took softcaps; float64's result on the real rows."""
    g = torch.Generator().manual_seed(23)
    B, H, L = 2, 2, 7
    q, k = (torch.randn(B, L, H, D, generator=g).transpose(1, 2).to(DEVICE) for _ in range(2))
    v = torch.randn(B, L, H, Dv, generator=g).transpose(1, 2).to(DEVICE)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :3] = False
    valid = valid.to(DEVICE)
    allowed = torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril() & valid[:, None, None, :]
    for softcap, route in ((None, "route: unfused"), (2.5, "route: flex")):
        said = at.explain(q, k, v, valid, scaling=0.3, softcap=softcap)
        assert said.startswith(route), said
        if softcap is None:
            assert "varlen_attn refuses the call" in said and ("288 > 256" in said or "value head dim 32" in said), said
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", at.UnfusedFeatureWarning)
            with torch.no_grad():
                out, _ = at.attention_forward(torch.nn.Module(), q, k, v, valid, scaling=0.3, softcap=softcap)
        refs = [_reference(*(t.to(dt) for t in (q, k, v)), allowed, 0.3, softcap, None, None)
                for dt in (torch.float64, torch.float32)]
        rows = valid[:, :, None, None].expand(B, L, H, Dv)  # the padded query rows are the model's to ignore
        assert_scaled(out[rows], *(r.transpose(1, 2)[rows] for r in refs), f"{route} D={D} Dv={Dv}")


def test_a_padding_mask_shorter_than_the_keys_names_the_argument():
    q = torch.randn(2, 2, 1, 16, device=DEVICE)
    k = v = torch.randn(2, 2, 20, 16, device=DEVICE)
    short = torch.ones(2, 17, dtype=torch.bool, device=DEVICE)
    for softcap in (None, 2.5):
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 17\); a 2-D padding mask needs a "
                                             r"column for each of the S = 20 keys"):
            at.attention_forward(torch.nn.Module(), q, k, v, short, scaling=0.3, softcap=softcap)


def test_explain_finds_a_packed_batch_in_position_ids_as_the_call_does():
    """A packed batch that reaches the attention call without a mask (a cache was passed) is found
    from its restarting ``position_ids`` by ``attention_forward``; ``explain`` plans the same call."""
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 12, 2, 16, generator=g).transpose(1, 2).to(DEVICE) for _ in range(3))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(DEVICE)
    assert at.explain(q, k, v, None, position_ids=pos).startswith("route: varlen (mask packed"), pos
    assert at.explain(q, k, v, None).startswith("route: sdpa (mask none")  # no restart: one sequence
    out, _ = at.attention_forward(torch.nn.Module(), q, k, v, None, position_ids=pos)
    refs = [torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[:, :, a:b].to(dt) for t in (q, k, v)), is_causal=True) for a, b in ((0, 5), (5, 12))], dim=2)
        for dt in (torch.float64, q.dtype)]
    assert_scaled(out.transpose(1, 2), *refs, "packed by position_ids")


def test_block_masks_are_built_once_per_mask(monkeypatch):
    """transformers calls the attention function once per layer with the same mask: the BlockMask
    is built once per mask (and per window), rebuilt when the mask tensor changes. (A training call:
    in inference a padded prefill's softcap runs on varlen_attn's score_mod, with no BlockMask.)"""
    builds = []
    real = _routes.create_block_mask

    def counting(*args, **kwargs):
        builds.append(args[3:5])
        return real(*args, **kwargs)
    monkeypatch.setattr(_routes, "create_block_mask", counting)
    g = torch.Generator().manual_seed(12)
    B, H, S, D = 2, 2, 16, 16
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    mask[0, :3] = False

    def layer(m, **kw):
        return at.attention_forward(torch.nn.Module(), q, k, v, m, softcap=2.0, is_causal=True, **kw)[0].detach()
    outs = [layer(mask) for _ in range(3)]
    assert len(builds) == 1, builds
    assert torch.equal(outs[0], outs[2])
    layer(mask, sliding_window=4)
    assert len(builds) == 2, "a window is another mask"
    mask[1, :5] = False  # in place: the cached lists no longer describe it
    changed = layer(mask)
    assert len(builds) == 3 and not torch.equal(changed, outs[0])
    _routes._BLOCK_MASKS.clear()
    assert torch.equal(layer(mask), changed)
    assert len(_routes._BLOCK_MASKS) <= at.BLOCK_MASK_CACHE_SIZE


# ----------------------------------------------------------------------------------------------
# The unfused path itself, against float64
# ----------------------------------------------------------------------------------------------

def _reference(q, k, v, allowed, scale, softcap, sinks, additive=None):
    """Attention by its definition (rows that see no key give 0)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if additive is not None:
        s = s + additive.to(s.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v


@pytest.mark.parametrize("block_rows", [None, 4], ids=["one-block", "blocks-of-4"])
@pytest.mark.parametrize("softcap,sinks", [(3.0, False), (None, True), (2.0, True)], ids=["softcap", "sinks", "both"])
def test_unfused_attention_and_its_gradients(softcap, sinks, block_rows):
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, L, S, D = 2, 4, 2, 9, 13, 16
    q = (torch.randn(B, L, H, D, generator=g) * 1.5).transpose(1, 2).requires_grad_()   # a model's view
    k = (torch.randn(B, S, Hkv, D, generator=g) * 1.5).transpose(1, 2).requires_grad_()
    v = torch.randn(B, Hkv, S, D, generator=g).requires_grad_()
    s_aux = torch.randn(H, generator=g).requires_grad_() if sinks else None
    allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    scale = 0.3
    leaves = [t for t in (q, k, v, s_aux) if t is not None]
    out = at.unfused_attention(q, k, v, allowed, scale=scale, softcap=softcap, s_aux=s_aux, block_rows=block_rows)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = _reference(*leaves64[:3], allowed, scale, softcap, leaves64[3] if sinks else None)
    refs = torch.autograd.grad((ref * w.double()).sum(), leaves64)
    ref32 = _reference(*[t.detach().requires_grad_() for t in leaves[:3]], allowed, scale, softcap,
                       s_aux.detach().requires_grad_() if sinks else None)
    assert_scaled(out, ref, ref32, "out", k=8)
    for name, a, r in zip("qkvs", grads, refs):
        assert torch.allclose(a.double(), r, atol=1e-4, rtol=1e-4), f"d{name}: {_err(a, r):.2e}"


def test_unfused_attention_row_without_keys_is_zero():
    q = torch.randn(1, 2, 5, 8).requires_grad_()
    k = torch.randn(1, 2, 6, 8).requires_grad_()
    allowed = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    allowed[..., 2, :] = False
    out = at.unfused_attention(q, k, k, allowed, softcap=1.5, block_rows=2)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


# ----------------------------------------------------------------------------------------------
# The model benchmark, at a tiny size
# ----------------------------------------------------------------------------------------------

def test_bench_models_first_step_in_a_fresh_process():
    """The models bench's first-step figure from a process of its own (the CUDA rows' first_fresh_ms),
    and a failure there as a row's error, not an exception."""
    from attend import bench_models

    rows = bench_models.main(preset="tiny", impls=("sdpa",), json_path=None, device="cpu", dtype=torch.float32,
                             steps=1, models=("llama",), phases=("train",), fresh_first=True)
    assert len(rows) == 1 and rows[0]["first_fresh_ms"] > 0, rows
    bad = bench_models.fresh_first_step("llama", "no-such-implementation", "tiny", "cpu", torch.float32, timeout=240)
    assert "first_fresh_ms" not in bad and "no-such-implementation" in bad["first_fresh_error"], bad


def test_fresh_first_step_counts_triton_builds(monkeypatch):
    """The fresh process's build counter: Triton's compilation listener adds each build and its time,
    and each kernel loaded from the disk cache, into the dict the child prints."""
    from triton import knobs

    from attend import bench_models

    monkeypatch.setattr(knobs.compilation, "listener", None)
    counts = bench_models._count_builds()
    times = knobs.CompileTimes(ir_initialization=250_000, lowering_stages=[("ttir", 50_000), ("ptx", 700_000)],
                               store_results=1_000)
    for hit in (False, False, True):
        knobs.compilation.listener(src=None, metadata=None, metadata_group=None, times=times, cache_hit=hit)
    assert counts == dict(compiles=2, compile_s=2.002, disk_hits=1), counts


def test_bench_models_keeps_one_triton_cache_for_its_children(monkeypatch, tmp_path):
    """While the models bench runs, TRITON_CACHE_DIR holds the directory in force at its start
    (Inductor would otherwise set it to its own once the compiled flex rows run, and the
    fresh-process children started after them would miss the kernels this process built); a
    directory the user set stays, and an unset variable is unset again afterwards."""
    from triton import knobs

    from attend import bench_models

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    default = knobs.cache.dir
    with bench_models._one_triton_cache():
        assert os.environ["TRITON_CACHE_DIR"] == default
    assert "TRITON_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with bench_models._one_triton_cache():
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)


def test_bench_models_runs_tiny(tmp_path, use_kernel):
    use_kernel("blocked")
    from attend import bench_models

    out = tmp_path / "models.json"
    rows = bench_models.main(preset="tiny", impls=("attend", "eager"), json_path=str(out), device=DEVICE,
                             dtype=torch.float32, steps=1, new_tokens=3)
    assert out.exists()
    seen = {(r["model"], r["impl"], r["phase"]) for r in rows}
    for model in ("llama", "gemma2"):
        for impl in ("attend", "eager"):
            for phase in ("train", "generate", "batch"):
                assert (model, impl, phase) in seen, (model, impl, phase)
    for r in rows:
        if r["phase"] == "batch" and r.get("skipped"):  # continuous batching that this transformers cannot run
            assert bench_models.batch_unavailable(r["impl"]) == r["skipped"], r
            continue
        if not r["ok"]:
            pytest.fail(f"bench row failed: {r}")
        if r["phase"] == "batch":
            assert r["tokens"] == 3 * 3 and r["tokens_per_s"] > 0, r
        assert r["first_ms"] > 0 and r["steady_ms"] > 0
        # the Gemma-2-shaped model's softcap runs the fused flex core with attend, forward and backward;
        # continuous batching's packed steps on the Triton kernels take varlen_attn's score_mod instead
        paths, varlen = r["flex_paths"], r["varlen_paths"]
        if (r["model"], r["impl"]) == ("gemma2", "attend"):
            on_varlen = r["phase"] == "batch" and DEVICE == "cuda"
            fused = varlen.get("fused", 0) if on_varlen else paths.get("fused", 0)
            assert fused > 0 and "blocked" not in paths and "blocked_backward" not in paths, r
            assert "per_sequence" not in varlen, r
            assert (paths.get("fused_backward", 0) > 0) == (r["phase"] == "train"), r
        else:
            assert paths == {} and varlen == {}, r

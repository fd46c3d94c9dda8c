"""Ahead-of-time builds of the flex kernels with generated hooks, for a GPU target, with no GPU.

``python -m attend._flex.build`` (TRITON_INTERPRET unset: compiling needs real JIT functions)
prints one JSON record per build: the one-tile kernel calling a score_mod's hooks (modded score,
its derivative, the captures' gradient scatter) and the block classifier calling a mask hook,
each for sm_90 and sm_80. The CI test asserts they build and that the gradient scatter is there.
"""

from __future__ import annotations

import json

import torch


def _mods():
    slopes, table = torch.rand(4), torch.randn(4, 64)
    doc = torch.randint(0, 3, (2, 64))
    score = lambda s, b, h, qi, ki: 30 * torch.tanh(s / 30) - slopes[h] * (qi - ki).abs() + table[h, qi - ki + 32]
    mask = lambda b, h, qi, ki: (doc[b, qi] == doc[b, ki]) & (qi >= ki)
    return score, mask


def table_mod():
    """A softcap plus a relative-position table per head, its one captured gradient: the score_mod
    whose hooks include the diagonal pass's (``codegen._diagonal_pass_hooks``)."""
    table = torch.randn(4, 64)
    return lambda s, b, h, qi, ki: 30 * torch.tanh(s / 30) + table[h, qi - ki + 32]


def build(archs=(90, 80)) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import codegen, kernels
    from .trace import trace

    score, mask = _mods()
    sg, mg = trace(score, "score"), trace(mask, "mask")
    fns, mfns = codegen.hooks(sg).functions, codegen.hooks(mg).functions
    ptr = lambda c: "*" + {torch.float32: "fp32", torch.int64: "i64"}[c.tensor.dtype]
    tile_sig = dict(Score="*fp32", Out="*fp32", DScore="*fp32", DS="*fp32", b="i32", h="i32", q0="i32", kv0="i32",
                    Q_LEN="i32", KV_LEN="i32", stride_m="i32", ptrs=tuple(ptr(c) for c in sg.captures), META="*i32",
                    grad_ptrs=tuple("*fp32" for _ in sg.captures))
    tile_consts = dict(SCORE_MOD=fns["score_mod"], SCORE_DSCORE=fns["score_mod_dscore"],
                       SCORE_GRAD=fns["score_mod_grad_captures"], LOAD_META=fns["load_meta"],
                       LOAD_GRAD_STRIDES=fns["load_grad_strides"], HAS_GRAD=True, BLOCK_M=64, BLOCK_N=64)
    cls_sig = dict(Status="*i8", stride_sb="i32", stride_sh="i32", stride_sm="i32", Pre="*i8", stride_pm="i32",
                   H="i32", Q_LEN="i32",
                   KV_LEN="i32", NK="i32", ptrs=tuple(ptr(c) for c in mg.captures), META="*i32")
    cls_consts = dict(MASK_MOD=mfns["mask_mod"], LOAD_META=mfns["load_meta"], BLOCK_Q=128, BLOCK_KV=128)
    out = []
    for arch in archs:
        for name, fn, sig, consts in (("mod_tile", kernels.mod_tile, tile_sig, tile_consts),
                                      ("classify_blocks", kernels.classify_blocks, cls_sig, cls_consts)):
            sig = dict(sig, **{k: "constexpr" for k in consts})
            c = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=4))
            ptx = c.asm["ptx"]
            out.append(dict(kernel=name, arch=arch, atomics="atom.global" in ptx or "red.global" in ptx,
                            ptx_lines=ptx.count("\n")))
    return out


if __name__ == "__main__":
    print(json.dumps(build()))

"""FlexAttention's private machinery: trace mods, generate Triton hooks, build block masks.

Core integration contract (hook signatures, how captures' pointers / strides / the mod's numbers
reach a kernel, the block-list layout to iterate, what the backward needs): ``docs/flex.md``.

Layers, bottom up: ``trace`` (mod -> ModGraph) and ``derivative`` -> ``codegen`` (ModGraph ->
@triton.jit hooks, cached by structure) -> ``kernels`` (Triton kernels calling the hooks) ->
``block_mask`` / ``lists`` (BlockMask, create_block_mask, the lists a call iterates) -> ``eager``
(the blocked torch path) -> ``dispatch`` (FlexCall and the one seam, ``_fused``, where the core's
flex mode plugs in) -> the public ``attend.flex_attention``.
"""

"""Bad input gets an error that names the argument, the value and what was expected."""

from __future__ import annotations

import pytest
import torch

import attend
from attend.bias import causal_lower_right
from conftest import DEVICE, rand

q4 = rand(2, 8, 16, 32)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(key=rand(2, 8, 16, 32, dtype=torch.float16)), TypeError, "share a dtype; got torch.float32, torch.float16"),
        (dict(query=torch.ones(2, 8, 16, 32, dtype=torch.int32)), TypeError, "query has dtype torch.int32; expected a floating"),
        (dict(key=rand(2, 8, 16, 16)), ValueError, "query head dim 32 != key head dim 16"),
        (dict(value=rand(2, 8, 15, 32)), ValueError, "key has 16 positions but value has 15"),
        (dict(key=rand(2, 3, 16, 32), value=rand(2, 3, 16, 32), enable_gqa=True), ValueError,
         "key has 3 heads, query has 8; 8 is not a multiple of 3"),
        (dict(key=rand(2, 2, 16, 32), value=rand(2, 2, 16, 32)), ValueError, "pass enable_gqa=True"),
        (dict(query=rand(16, 32), key=rand(16, 32), value=rand(16, 32)), ValueError, r"at least 3 dims .* shape \(16, 32\)"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
        (dict(attn_mask=torch.ones(3, 16, 16, dtype=torch.bool, device=DEVICE)), ValueError,
         r"attn_mask of shape \(3, 16, 16\) does not broadcast to \(..., L, S\) = \(2, 8, 16, 16\)"),
        (dict(attn_mask=torch.ones(16, 16, dtype=torch.bool, device=DEVICE), is_causal=True), ValueError,
         "either attn_mask or is_causal"),
        (dict(attn_mask=torch.ones(16, 16, dtype=torch.int64, device=DEVICE)), TypeError,
         "attn_mask has dtype torch.int64"),
        (dict(attn_mask=torch.ones(16, 16, dtype=torch.bool, device="meta")), ValueError, "attn_mask is on meta"),
        (dict(attn_mask=causal_lower_right(4, 16)), ValueError, r"CausalBias for \(4, 16\) but query/key lengths are \(16, 16\)"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
        (dict(key=rand(3, 8, 16, 32), value=rand(3, 8, 16, 32)), ValueError, "same batch dims"),
    ],
    ids=["dtype_mismatch", "int_dtype", "head_dim", "kv_len", "gqa_divisible", "gqa_flag", "rank", "dropout_1",
         "dropout_neg", "mask_broadcast", "mask_and_causal", "mask_dtype", "mask_device", "bias_size", "scale_nan",
         "batch"],
)
def test_errors_name_argument_and_value(kwargs, exc, pattern):
    args = dict(query=q4, key=q4, value=q4)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        attend.scaled_dot_product_attention(**args)
    with pytest.raises(exc, match=pattern):  # explain validates the same way
        attend.explain(**args)


def test_wrong_types():
    with pytest.raises(TypeError, match="query must be a torch.Tensor, got list"):
        attend.scaled_dot_product_attention([1.0], q4, q4)
    with pytest.raises(TypeError, match="attn_mask must be a Tensor, a CausalBias or None, got str"):
        attend.scaled_dot_product_attention(q4, q4, q4, attn_mask="causal")


def test_bias_constructors_validate():
    with pytest.raises(ValueError, match="two sizes"):
        causal_lower_right(4)
    with pytest.raises(ValueError, match="seq_len_q must be a non-negative int, got -1"):
        causal_lower_right(-1, 3)
    with pytest.raises(TypeError, match="CausalVariant"):
        attend.bias.CausalBias(2, 3, 3)
    assert torch.equal(causal_lower_right(3, 4).materialize(),
                       torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_flex_attention_validates_its_arguments():
    with pytest.raises(ValueError, match=r"query must be 4-D \(B, H, seq, dim\), got shape \(8, 16, 32\)"):
        attend.flex_attention.flex_attention(q4[0], q4[0], q4[0])


def test_mask_helpers():
    from attend.flex_attention import and_masks, create_mask, noop_mask, or_masks

    causal = lambda b, h, q, kv: q >= kv
    even = lambda b, h, q, kv: kv % 2 == 0
    assert torch.equal(create_mask(causal, 1, 1, 4, 4)[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    both = create_mask(and_masks(causal, even), 2, 3, 4, 5)
    assert both.shape == (2, 3, 4, 5)
    assert torch.equal(both, create_mask(causal, 2, 3, 4, 5) & create_mask(even, 2, 3, 4, 5))
    assert torch.equal(create_mask(or_masks(causal, even), None, None, 4, 5)[0, 0],
                       create_mask(causal, 1, 1, 4, 5)[0, 0] | create_mask(even, 1, 1, 4, 5)[0, 0])
    assert create_mask(noop_mask, 1, 1, 3, 3).all()

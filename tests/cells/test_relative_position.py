"""Tests of the relative position bias (cells/relative_position.py): the buckets against transformers'
T5 bucketing, the bias as table rows, one bias per stack added by every layer, and KV-cache decoding."""

from __future__ import annotations

import math

import pytest
import torch

import glassformer as gf
from glassformer.cells.relative_position import RelativePositionBias, relative_bucket


@pytest.mark.parametrize("n_buckets, max_distance", [(32, 128), (8, 16), (16, 40), (10, 7), (4, 3)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_transformers(n_buckets, max_distance, bidirectional):
    """Every distance from -300 to 300 (keys before and after the query, past max_distance) falls in
    the bucket transformers' T5 gives it."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    distance = torch.arange(-300, 301)[None, :] + torch.arange(3)[:, None]  # (3, 601)
    expected = t5.T5Attention._relative_position_bucket(distance, bidirectional, n_buckets, max_distance)
    ours = relative_bucket(distance, bidirectional, n_buckets, max_distance)
    assert torch.equal(ours, expected)
    assert ours.min() >= 0 and ours.max() == n_buckets - 1


def make_cfg(**overrides) -> gf.Config:
    base = dict(d_model=16, n_layers=2, n_heads=4, d_vocab=23, n_ctx=40, positional="relative")
    return gf.Config(**{**base, "relative_buckets": 8, "relative_max_distance": 12, **overrides})


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bias_is_the_table_row_of_each_bucket(bidirectional):
    """bias[0, h, i, j] = W_rel[bucket(key j − query i), h]; queries may sit anywhere among the keys."""
    cell = RelativePositionBias(make_cfg(), bidirectional)
    with torch.no_grad():
        cell.W_rel.copy_(torch.randn(8, 4))
        q_slots = torch.tensor([3, 4, 9])
        bias = cell(q_slots, 14)
    assert bias.shape == (1, 4, 3, 14)
    for i, q in enumerate(q_slots.tolist()):
        for j in range(14):
            bucket = relative_bucket(torch.tensor(j - q), bidirectional, 8, 12)
            assert torch.equal(bias[0, :, i, j], cell.W_rel[bucket].detach())


def test_every_layer_adds_the_one_bias_of_its_stack():
    """hook_position_bias fires once per stack and forward; each layer's scores are q·k·scale + bias
    (then the causal mask), and changing the bias through the hook changes every layer."""
    model = gf.Transformer(make_cfg(), seed=0).eval()
    tokens = torch.randint(0, 23, (2, 15), generator=torch.Generator().manual_seed(1))
    calls = []
    with torch.no_grad(), model.hooks([("hook_position_bias", lambda x, hook: calls.append(x.shape))]):
        _, cache = model.run_with_cache(tokens)
    assert calls == [(1, 4, 15, 15)]
    bias = cache["hook_position_bias"]
    causal = torch.ones(15, 15).tril().bool()
    for layer in range(2):
        q, k = cache["q", layer], cache["k", layer]  # (batch, pos, n_heads, d_head)
        expected = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(4) + bias
        scores = cache["attn_scores", layer]
        torch.testing.assert_close(scores[..., causal], expected[..., causal])
        assert torch.isneginf(scores[..., ~causal]).all()
    with torch.no_grad():
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("hook_position_bias", lambda x, hook: x * 0)])
        model.rel_pos.W_rel.zero_()
        torch.testing.assert_close(zeroed, model(tokens))


def test_decoding_with_the_kv_cache_equals_the_full_pass():
    """A left-padded batch decoded with the KV cache (the bias of each new query slot against every
    cache slot) picks the tokens a full pass over the whole sequence picks at each step."""
    model = gf.Transformer(make_cfg(n_layers=3), seed=0).eval()
    prompt = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    out = model.generate(prompt, 24, attention_mask=mask)
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones(2, 24, dtype=mask.dtype)], 1)
        logits = model(out[:, :-1], attention_mask=full_mask[:, :-1])  # (batch, pos, d_vocab)
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])

"""Direct logit attribution: the components' shares add up to the logit the model computed."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.attribution import direct_logit_attribution

TOKENS = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 0, 6, 1]])


def model(**kw):
    """Random weights with non-trivial norm gains and biases, so every term of the formula matters."""
    cfg = gf.Config(**{**dict(n_layers=2, d_model=16, n_heads=4, d_vocab=13, n_ctx=8), **kw})
    m = gf.Transformer(cfg, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in m.parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return m


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # LayerNorm, pre-norm, biases
        dict(norm="rmsnorm", act="swiglu", positional="rotary", n_kv_heads=2, bias=False),
        dict(parallel_attn_mlp=True, tie_embeddings=True),
        dict(norm="rmsnorm", positional="relative", relative_buckets=4, relative_max_distance=4, unembed_scale=0.25),
        dict(norm="none", positional="sinusoidal"),
        dict(arch="encoder", embed_norm=True, n_token_types=2),
    ],
)
def test_components_sum_to_the_logit(kw):
    m = model(**kw)
    attribution = direct_logit_attribution(m, TOKENS, target=3)
    with torch.no_grad():
        logits = m(TOKENS)
    torch.testing.assert_close(attribution.logit, logits[:, -1, 3])
    torch.testing.assert_close(attribution.values.sum(0), attribution.logit, atol=1e-5, rtol=0)
    assert attribution.values.shape == (len(attribution.labels), 2)
    heads = [label for label in attribution.labels if label[0] == "L" and "H" in label]
    assert len(heads) == 2 * 4 and attribution.heads(2, 4).shape == (2, 4)


def test_logit_difference_and_other_positions():
    m = model()
    attribution = direct_logit_attribution(m, TOKENS, target=3, wrong=5, position=2)
    with torch.no_grad():
        logits = m(TOKENS)
    expected = logits[:, 2, 3] - logits[:, 2, 5]
    torch.testing.assert_close(attribution.values.sum(0), expected, atol=1e-5, rtol=0)


def test_encoder_decoder_decomposes_the_decoder_stream_with_cross_attention_heads():
    m = model(arch="encoder-decoder", n_layers=1)
    tgt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    attribution = direct_logit_attribution(m, TOKENS, target=7, tgt=tgt)
    with torch.no_grad():
        logits = m(TOKENS, tgt)
    torch.testing.assert_close(attribution.values.sum(0), logits[:, -1, 7], atol=1e-5, rtol=0)
    assert {"L0X0", "L0 cross b_O", "L0H3", "L0 mlp", "embed", "pos_embed", "bias"} <= set(attribution.labels)


def test_a_head_share_is_what_removing_that_head_costs_when_nothing_else_reads_it():
    """One attention-only layer, no norm: zeroing head h's output moves the logit by exactly its share."""
    m = model(n_layers=1, attn_only=True, norm="none")
    attribution = direct_logit_attribution(m, TOKENS, target=3)
    shares = attribution.heads(1, 4)[0]  # (n_heads,), mean over the batch

    def without(head):
        def hook(z, hook):
            z[:, :, head] = 0
            return z

        with torch.no_grad():
            return m.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_z", hook)])[:, -1, 3]

    for head in range(4):
        assert (attribution.logit - without(head)).mean().item() == pytest.approx(shares[head].item(), abs=1e-5)
    assert str(attribution).startswith("logit[3] ") and "L0H0" in str(attribution)


def test_models_that_are_not_a_sum_are_refused():
    with pytest.raises(ValueError, match="pre-norm"):
        direct_logit_attribution(model(norm_position="post"), TOKENS, target=0)
    with pytest.raises(ValueError, match="head_transform"):
        direct_logit_attribution(model(arch="encoder", head_transform=True), TOKENS, target=0)


def test_text_and_token_strings_give_the_same_shares(text_model):
    text = "the cat sat on the"
    tokens = text_model.to_tokens(text)
    cat, dog = text_model.to_single_token(" cat"), text_model.to_single_token(" dog")
    by_text = direct_logit_attribution(text_model, text, " cat", " dog")
    by_ids = direct_logit_attribution(text_model, tokens, cat, dog)
    assert by_text.labels == by_ids.labels
    torch.testing.assert_close(by_text.values, by_ids.values, atol=0, rtol=0)
    assert str(by_text).startswith("logit[' cat'] - logit[' dog'] ")
    with pytest.raises(gf.InputError, match="not a single token"):
        direct_logit_attribution(text_model, text, " cat sat")

"""Tests of the embedding and the output head (cells/embed.py): W_E / W_U shapes, hook_embed is a row
lookup, the logits are `x @ W_U + b_U`, and tied embeddings share one matrix."""

from __future__ import annotations

import pytest
import torch

import glassformer as gf

D_MODEL, D_VOCAB, BATCH, POS = 6, 11, 2, 4


def make_model(**overrides) -> gf.Transformer:
    base = dict(d_model=D_MODEL, n_layers=1, n_heads=2, d_vocab=D_VOCAB, n_ctx=8)
    model = gf.Transformer(gf.Config(**{**base, **overrides}), seed=0).eval()
    with torch.no_grad():
        if model.unembed.b_U is not None:
            model.unembed.b_U.copy_(torch.randn(D_VOCAB, generator=torch.Generator().manual_seed(1)))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (BATCH, POS), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tie", [False, True])
def test_shapes_and_the_two_ends_of_the_model(tie):
    """W_E (d_vocab, d_model), W_U (d_model, d_vocab), b_U (d_vocab,); hook_embed = W_E[tokens]
    (batch, pos, d_model); logits = ln_final.hook_normalized @ W_U + b_U (batch, pos, d_vocab)."""
    model = make_model(tie_embeddings=tie)
    assert model.embed.W_E.shape == (D_VOCAB, D_MODEL)
    assert model.unembed.W_U.shape == (D_MODEL, D_VOCAB)
    assert model.unembed.b_U.shape == (D_VOCAB,)
    toks = tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
        assert cache["hook_embed"].shape == (BATCH, POS, D_MODEL)
        torch.testing.assert_close(cache["hook_embed"], model.embed.W_E[toks])
        expected = cache["ln_final.hook_normalized"] @ model.unembed.W_U + model.unembed.b_U
    assert logits.shape == cache["hook_logits"].shape == (BATCH, POS, D_VOCAB)
    torch.testing.assert_close(logits, expected)


def test_tied_embeddings_share_one_matrix():
    """With tie_embeddings, W_U is W_E transposed and a write to either is seen through the other;
    the model holds no separate unembedding parameter."""
    tied, untied = make_model(tie_embeddings=True), make_model()
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == D_VOCAB * D_MODEL
    torch.testing.assert_close(tied.unembed.W_U, tied.embed.W_E.T)
    with torch.no_grad():
        tied.unembed.W_U.zero_()
    assert torch.equal(tied.embed.W_E, torch.zeros(D_VOCAB, D_MODEL))


def test_untied_embeddings_are_independent():
    """Without tying, zeroing W_U leaves W_E alone and makes the logits equal b_U."""
    model = make_model()
    W_E = model.embed.W_E.detach().clone()
    with torch.no_grad():
        model.unembed.W_U.zero_()
        logits = model(tokens())
    assert torch.equal(model.embed.W_E, W_E)
    torch.testing.assert_close(logits, model.unembed.b_U.detach().expand(BATCH, POS, D_VOCAB))

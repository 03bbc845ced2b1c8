"""Logit lens: each layer's residual read through the model's own final norm and unembedding."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.lens import logit_lens

TOKENS = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 0, 6, 1]])


def model(**kw):
    cfg = gf.Config(**{**dict(n_layers=3, d_model=16, n_heads=4, d_vocab=13, n_ctx=8), **kw})
    return gf.Transformer(cfg, seed=0).eval()


@pytest.mark.parametrize("kw", [dict(), dict(norm="rmsnorm", tie_embeddings=True), dict(norm_position="post")])
def test_last_layer_of_the_lens_is_the_model_output(kw):
    m = model(**kw)
    lens = logit_lens(m, TOKENS)
    with torch.no_grad():
        logits = m(TOKENS)
    assert lens.layers == ["embed", "0", "1", "2"] and lens.logits.shape == (4, 2, 6, 13)
    torch.testing.assert_close(lens.logits[-1], logits, atol=1e-6, rtol=0)


def test_each_row_reads_that_layer_through_ln_final_and_unembed():
    m = model()
    lens = logit_lens(m, TOKENS)
    with torch.no_grad():
        _, cache = m.run_with_cache(TOKENS)
        embed = cache["hook_embed"] + cache["hook_pos_embed"]
        mid = cache["blocks.1.hook_resid_post"]
        ln = m.ln_final
        for row, resid in ((0, embed), (2, mid)):
            expected = torch.nn.functional.layer_norm(resid, (16,), ln.w, ln.b, ln.eps) @ m.unembed.W_U + m.unembed.b_U
            torch.testing.assert_close(lens.logits[row], expected, atol=1e-5, rtol=0)


def test_top_tokens_and_text():
    m = model()
    lens = logit_lens(m, TOKENS)
    top = lens.top(position=-1)
    assert [layer for layer, _, _ in top] == lens.layers
    assert top[-1][1] == int(m(TOKENS)[0, -1].argmax())
    text = lens.render(vocab=[chr(ord("a") + i) for i in range(13)])
    assert text.count("p=") == 4 and "'" in text


def test_encoder_decoder_lens_reads_the_decoder_and_needs_its_tokens():
    m = model(arch="encoder-decoder", n_layers=2)
    tgt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    lens = logit_lens(m, TOKENS, tgt)
    torch.testing.assert_close(lens.logits[-1], m(TOKENS, tgt).detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="decoder tokens"):
        logit_lens(m, TOKENS)


def test_text_gives_the_same_lens_and_the_tokenizers_strings(text_model):
    text = "the cat sat on the"
    tokens = text_model.to_tokens(text)
    lens = logit_lens(text_model, text)
    torch.testing.assert_close(lens.logits, logit_lens(text_model, tokens).logits, atol=0, rtol=0)
    assert lens.labels == text_model.to_str_tokens(tokens)
    top = lens.top()
    strings = lens.top_strings()
    assert [s for _, s, _ in strings] == text_model.tokenizer.token_strings([t for _, t, _ in top])
    text_out = lens.render()
    assert text_out.startswith("logit lens, position -1 (' the')") and repr(strings[-1][1]) in text_out
    bare = logit_lens(model(), TOKENS)
    assert bare.labels is None and bare.top_strings()[0][1] == str(bare.top()[0][1])

"""`process_weights`: folded and centred weights, the same probabilities, the input untouched."""

import pytest
import torch

import glassformer as gf
from glassformer.cells.norm import Norm
from glassformer.inspect.processing import process_weights

TOKENS = torch.tensor([[3, 7, 1, 9, 4, 2, 11, 0], [5, 5, 8, 0, 6, 1, 12, 12]])


def model(**kw):
    """Random weights with non-trivial norm gains and biases, so that folding has something to fold."""
    cfg = gf.Config(**{**dict(n_layers=2, d_model=16, n_heads=4, d_vocab=13, n_ctx=8), **kw})
    m = gf.Transformer(cfg, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in m.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.add_(0.3 * noise if param.dim() == 1 else 0.05 * noise)
    return m


def run(m, tokens=TOKENS):
    with torch.no_grad():
        return m(tokens, tokens[:, :5]) if m.cfg.arch == "encoder-decoder" else m(tokens)


CONFIGS = [
    dict(),  # LayerNorm pre-norm with biases, untied
    dict(tie_embeddings=True),
    dict(positional="rotary", n_kv_heads=2, d_mlp=24),
    dict(norm="rmsnorm", act="swiglu", bias=False, tie_embeddings=True),
    dict(act="swiglu"),  # LayerNorm with a bias before a gate without one: ln2 stays
    dict(parallel_attn_mlp=True),
    dict(parallel_attn_mlp=True, shared_norm=True, positional="rotary", rotary_interleaved=True),
    dict(arch="encoder-decoder"),
    dict(arch="encoder", embed_norm=True, n_token_types=2),
    dict(norm_position="post", arch="encoder"),
    dict(attn_only=True, positional="sinusoidal"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_processed_model_computes_the_same_probabilities(kw):
    m = model(**kw)
    before = {name: t.clone() for name, t in m.state_dict().items()}
    processed = process_weights(m)
    probs, new_probs = run(m).softmax(-1), run(processed).softmax(-1)
    assert (probs - new_probs).abs().max().item() < 1e-5
    assert all(torch.equal(before[name], t) for name, t in m.state_dict().items())  # input untouched
    assert m.cfg.tie_embeddings == kw.get("tie_embeddings", False) and not processed.cfg.tie_embeddings
    assert processed.cfg.extra["processed"]


def test_layernorm_weights_are_folded_away():
    m = model(tie_embeddings=True)
    processed = process_weights(m)
    norms = [mod for mod in processed.modules() if isinstance(mod, Norm)]
    assert len(norms) == 5  # ln1, ln2 per block and ln_final
    for norm in norms:
        assert torch.equal(norm.w, torch.ones(16)) and torch.equal(norm.b, torch.zeros(16))
    block, old = processed.blocks[0], m.blocks[0]
    expected_q = old.attn.W_Q * old.ln1.w[None, :, None]
    torch.testing.assert_close(block.attn.W_Q, expected_q)
    expected_b_q = old.attn.b_Q + torch.einsum("m,hmd->hd", old.ln1.b, old.attn.W_Q)
    torch.testing.assert_close(block.attn.b_Q, expected_b_q)
    assert processed.cfg.extra["processed"] == [
        "fold_ln",
        "fold_value_biases",
        "centre_writing_weights",
        "centre_unembed",
    ]


def test_writing_weights_and_unembedding_are_centred_and_value_biases_moved():
    processed = process_weights(model())
    zero = torch.zeros(())
    for block in processed.blocks:
        torch.testing.assert_close(block.attn.W_O.mean(-1).abs().max(), zero, atol=1e-6, rtol=0)
        torch.testing.assert_close(block.attn.b_O.mean(), zero, atol=1e-6, rtol=0)
        torch.testing.assert_close(block.mlp.W_out.mean(-1).abs().max(), zero, atol=1e-6, rtol=0)
        assert torch.equal(block.attn.b_V, torch.zeros_like(block.attn.b_V))
    torch.testing.assert_close(processed.embed.W_E.mean(-1).abs().max(), zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(processed.pos_embed.W_pos.mean(-1).abs().max(), zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(processed.unembed.W_U.mean(-1).abs().max(), zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(processed.unembed.b_U.mean(), zero, atol=1e-6, rtol=0)


def test_steps_that_would_change_the_output_are_skipped():
    post = process_weights(model(norm_position="post", arch="encoder"))
    assert post.cfg.extra["processed"] == ["fold_value_biases", "centre_unembed"]  # a post-norm cannot be folded
    rms = process_weights(model(norm="rmsnorm"))
    assert "centre_writing_weights" not in rms.cfg.extra["processed"]  # RMSNorm keeps the mean
    gated = process_weights(model(act="swiglu"))
    assert "fold_ln kept blocks.0.ln2, blocks.1.ln2 (W_gate has no bias)" in gated.cfg.extra["processed"]
    assert not torch.equal(gated.blocks[0].ln2.w, torch.ones(16))
    only = process_weights(model(), fold_ln=False, fold_value_biases=False, centre_writing_weights=False)
    assert only.cfg.extra["processed"] == ["centre_unembed"]


def test_processed_model_saves_and_loads(tmp_path):
    processed = process_weights(model(tie_embeddings=True))
    processed.save(tmp_path)
    loaded = gf.Transformer.load(tmp_path)
    assert torch.equal(run(loaded), run(processed))

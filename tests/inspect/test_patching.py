"""Activation patching: a clean activation written into the corrupted run restores what it carries."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.patching import (
    clean_cache,
    logit_diff,
    patch_heads,
    patch_residual,
    patched_logits,
    restored_fraction,
)

CLEAN = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 0, 6, 1]])
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 2] = torch.tensor([11, 12])  # the runs differ at position 2 only


def model(**kw):
    cfg = gf.Config(**{**dict(n_layers=2, d_model=16, n_heads=4, d_vocab=13, n_ctx=8), **kw})
    return gf.Transformer(cfg, seed=0).eval()


@pytest.mark.parametrize("kw", [dict(), dict(norm="rmsnorm", positional="rotary"), dict(parallel_attn_mlp=True)])
def test_patching_the_whole_clean_residual_restores_the_clean_logits_exactly(kw):
    m = model(**kw)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    cache = clean_cache(m, CLEAN, names)
    with torch.no_grad():
        clean, corrupted = m(CLEAN), m(CORRUPTED)
    assert not torch.equal(clean, corrupted)
    for name in names:
        assert torch.equal(patched_logits(m, CORRUPTED, cache, name), clean), name


def test_patching_the_whole_clean_residual_restores_an_encoder_decoder_too():
    m = model(arch="encoder-decoder")
    tgt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cache = clean_cache(m, (CLEAN, tgt), ["encoder.blocks.0.hook_resid_pre"])
    with torch.no_grad():
        clean = m(CLEAN, tgt)
    assert torch.equal(patched_logits(m, (CORRUPTED, tgt), cache, "encoder.blocks.0.hook_resid_pre"), clean)


def test_residual_patching_by_layer_and_position():
    """In layer 0 the runs differ only where the tokens differ: patching that position gives exactly the
    clean metric, any other position exactly the corrupted one."""
    m = model()
    metric = logit_diff(correct=3, wrong=4)
    with torch.no_grad():
        clean, corrupted = metric(m(CLEAN)).item(), metric(m(CORRUPTED)).item()
    table = patch_residual(m, CLEAN, CORRUPTED, metric)  # (n_layers, pos)
    assert table.shape == (2, 6)
    assert table[0, 2].item() == pytest.approx(clean, abs=1e-6)
    others = table[0, [0, 1, 3, 4, 5]]
    assert torch.allclose(others, torch.full_like(others, corrupted), atol=1e-6)
    assert torch.allclose(table[:, :2], torch.full((2, 2), corrupted), atol=1e-6)  # causal: nothing flows back
    fraction = restored_fraction(table, clean, corrupted)
    assert fraction[0, 2].item() == pytest.approx(1.0, abs=1e-4)


def test_head_patching_adds_up_in_a_model_linear_in_its_heads():
    """With no norm and one attention-only layer the logits are linear in each head's z: the head
    effects add up to the whole clean-minus-corrupted difference."""
    m = model(n_layers=1, attn_only=True, norm="none")
    metric = logit_diff(correct=3, wrong=4)
    with torch.no_grad():
        clean, corrupted = metric(m(CLEAN)).item(), metric(m(CORRUPTED)).item()
    heads = patch_heads(m, CLEAN, CORRUPTED, metric)  # (n_layers, n_heads)
    assert heads.shape == (1, 4)
    assert (heads - corrupted).sum().item() == pytest.approx(clean - corrupted, abs=1e-5)
    per_position = patch_heads(m, CLEAN, CORRUPTED, metric, per_position=True)  # (n_layers, pos, n_heads)
    assert per_position.shape == (1, 6, 4)
    assert torch.allclose(
        per_position[0, :5], torch.full((5, 4), corrupted), atol=1e-6
    )  # metric reads the last position
    assert torch.allclose(per_position[0, 5], heads[0], atol=1e-6)


def test_patching_refuses_runs_of_different_lengths():
    m = model()
    cache = clean_cache(m, CLEAN, ["blocks.0.hook_resid_pre"])
    with pytest.raises(gf.InputError, match="differs from clean"):
        patched_logits(m, CORRUPTED[:, :4], cache, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="no hook point"):
        patch_residual(m, CLEAN, CORRUPTED, logit_diff(0, 1), hook="hook_nothing")


def test_text_inputs_patch_the_same_as_their_tokens(text_model):
    clean, corrupted = "the cat sat on the mat", "the dog sat on the mat"
    clean_tokens, corrupted_tokens = text_model.to_tokens(clean), text_model.to_tokens(corrupted)
    assert clean_tokens.shape == corrupted_tokens.shape
    by_text_metric = logit_diff(" cat", " dog", model=text_model)
    ids = text_model.to_single_token(" cat"), text_model.to_single_token(" dog")
    by_ids_metric = logit_diff(*ids)
    by_text = patch_residual(text_model, clean, corrupted, by_text_metric)
    torch.testing.assert_close(by_text, patch_residual(text_model, clean_tokens, corrupted_tokens, by_ids_metric))
    heads = patch_heads(text_model, clean, corrupted, by_text_metric)
    torch.testing.assert_close(heads, patch_heads(text_model, clean_tokens, corrupted_tokens, by_ids_metric))


def test_texts_of_different_token_lengths_are_refused_clearly(text_model):
    metric = logit_diff(0, 1)
    with pytest.raises(gf.InputError, match="the clean input has 4 tokens and the corrupted one 2"):
        patch_residual(text_model, "the cat sat on", "the dog", metric)
    with pytest.raises(TypeError, match="need the model"):
        logit_diff(" cat", " dog")

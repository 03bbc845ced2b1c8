"""Attribution patching: the gradient estimate of activation patching, checked against the real thing."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.attribution_patching import attribution_patching
from glassformer.inspect.patching import clean_cache, logit_diff, patch_heads, patch_residual, patched_logits

CLEAN = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 0, 6, 1]])
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 2] = torch.tensor([11, 12])  # the runs differ at position 2 only
METRIC = logit_diff(correct=3, wrong=4)


def model(scale=1.0, **kw):
    """Random weights; `scale` multiplies every matrix, which sharpens softmaxes and GELUs (less linear)."""
    cfg = gf.Config(**{**dict(n_layers=1, d_model=16, n_heads=4, d_vocab=13, n_ctx=8), **kw})
    m = gf.Transformer(cfg, seed=0).eval()
    with torch.no_grad():
        for param in m.parameters():
            if param.dim() > 1:
                param.mul_(scale)
    return m


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_exact_where_the_metric_is_linear_in_the_activation():
    """One attention-only layer, no norm: the logits are linear in z, attn_out and resid_post, so the
    first-order estimate is activation patching itself."""
    m = model(attn_only=True, norm="none")
    close(attribution_patching(m, CLEAN, CORRUPTED, METRIC).values, patch_heads(m, CLEAN, CORRUPTED, METRIC))
    close(
        attribution_patching(m, CLEAN, CORRUPTED, METRIC, over="head_positions").values,
        patch_heads(m, CLEAN, CORRUPTED, METRIC, per_position=True),
    )
    for over in ("attn_out", "resid_post"):
        real = patch_residual(m, CLEAN, CORRUPTED, METRIC, hook=f"hook_{over}")
        close(attribution_patching(m, CLEAN, CORRUPTED, METRIC, over=over).values, real)


def test_neurons_of_the_last_mlp_are_exact_with_no_norm():
    m = model(norm="none", d_mlp=8)
    estimate = attribution_patching(m, CLEAN, CORRUPTED, METRIC, over="neurons")
    assert estimate.values.shape == (1, 6, 8) and estimate.axes == ["layer", "pos", "neuron"]
    name = "blocks.0.mlp.hook_post"
    cache = clean_cache(m, CLEAN, [name])
    real = torch.tensor(
        [[METRIC(patched_logits(m, CORRUPTED, cache, name, (pos, n))).item() for n in range(8)] for pos in range(6)]
    )
    close(estimate.values[0], real)


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_close_to_activation_patching_in_a_non_linear_model():
    """Three layers with LayerNorm, GELU MLPs and sharpened softmaxes: not exact, but it ranks the
    components as activation patching does (correlation over every grid cell)."""
    m = model(scale=5.0, n_layers=3, d_model=32)
    grids = [
        ("heads", patch_heads(m, CLEAN, CORRUPTED, METRIC)),
        ("head_positions", patch_heads(m, CLEAN, CORRUPTED, METRIC, per_position=True)),
        ("resid_pre", patch_residual(m, CLEAN, CORRUPTED, METRIC)),
    ]
    for over, real in grids:
        estimate = attribution_patching(m, CLEAN, CORRUPTED, METRIC, over=over).values
        assert correlation(estimate, real) >= 0.9, over
        assert (estimate - real).abs().max() > 1e-3, over  # not linear: the check means something


def test_direction_metrics_and_labels_match_activation_patching():
    m = model(n_layers=2)
    estimate = attribution_patching(m, CLEAN, CORRUPTED, METRIC, over="head_positions")
    with torch.no_grad():
        assert estimate.clean == pytest.approx(METRIC(m(CLEAN)).item(), abs=1e-6)
        assert estimate.corrupted == pytest.approx(METRIC(m(CORRUPTED)).item(), abs=1e-6)
    assert estimate.labels == [["L0", "L1"], [str(p) for p in range(6)], ["H0", "H1", "H2", "H3"]]
    assert torch.allclose(estimate.values[:, :2], torch.tensor(estimate.corrupted))  # causal: nothing before 2
    (label, effect), *_ = estimate.top(1)
    layer, pos, head = torch.unravel_index((estimate.values - estimate.corrupted).abs().argmax(), (2, 6, 4))
    assert label == f"L{layer}H{head} @{pos}" and effect == pytest.approx(
        (estimate.values[layer, pos, head] - estimate.corrupted).item()
    )
    torch.testing.assert_close(
        estimate.restored(), (estimate.values - estimate.corrupted) / (estimate.clean - estimate.corrupted)
    )
    assert "largest estimated effects" in str(estimate)


def test_text_inputs_label_positions_with_their_tokens(text_model):
    clean, corrupted = "the cat sat on the mat", "the dog sat on the mat"
    estimate = attribution_patching(
        text_model, clean, corrupted, logit_diff(" mat", " log", model=text_model), over="resid_pre"
    )
    assert estimate.labels[1] == text_model.to_str_tokens(clean)
    assert "'" in estimate.top(1)[0][0]  # "L0 @1 ' cat'"


def test_unknown_grid_and_non_scalar_metric_are_errors():
    m = model()
    with pytest.raises(ValueError, match="over='head'.*'heads'"):
        attribution_patching(m, CLEAN, CORRUPTED, METRIC, over="head")
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(m, CLEAN, CORRUPTED, lambda logits: logits[:, -1, 3])

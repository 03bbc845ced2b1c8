"""The cell-by-cell trace: the two-heads worked example's numbers, and every cell for every arch."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.examples import two_heads


def step(trace, cell, op_start=""):
    return next(s for s in trace.steps if s.cell == cell and s.op.startswith(op_start))


def test_two_heads_worked_example_numbers():
    """r3's head-1 weights ≈ [0.248, 0.248, 0.503], head-2 ≈ [0.248, 0.503, 0.248], edit ≈
    [0.376, 0.376, 0.500, 0.752], updated stream ≈ [1.376, 1.376, 0.500, 1.752]."""
    model, tokens, labels = two_heads()
    trace = gf.trace(model, tokens, position=2, labels=labels)
    expect = torch.testing.assert_close
    expect(
        step(trace, "softmax").values, torch.tensor([[0.248, 0.248, 0.503], [0.248, 0.503, 0.248]]), atol=6e-4, rtol=0
    )
    expect(step(trace, "attention output").values, torch.tensor([0.376, 0.376, 0.500, 0.752]), atol=6e-4, rtol=0)
    expect(step(trace, "residual add").values, torch.tensor([1.376, 1.376, 0.500, 1.752]), atol=6e-4, rtol=0)
    # The scores cell as three steps: raw dot products, scaled by 1/sqrt(2), then masked.
    expect(step(trace, "attention scores", "q · k").values, torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 1.0]]))
    expect(step(trace, "attention scores", "×").values, torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 1.0]]) / 2**0.5)
    text = str(trace)
    assert '"r3"' in text and "[0.248, 0.248, 0.503]" in text and "[1.376, 1.376, 0.500, 1.752]" in text


def test_masked_keys_show_as_minus_infinity():
    model, tokens, _ = two_heads()
    masked = step(gf.trace(model, tokens, position=0), "attention mask").values
    assert torch.isinf(masked[:, 1:]).all() and torch.isfinite(masked[:, 0]).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="decoder", positional="rotary", norm="rmsnorm", act="swiglu", n_kv_heads=1),
        dict(arch="encoder", norm_position="post", positional="sinusoidal"),
        dict(arch="encoder-decoder"),
        dict(parallel_attn_mlp=True),
        dict(arch="encoder-decoder", positional="relative", relative_buckets=4, relative_max_distance=3),
    ],
)
def test_every_cell_appears_in_order(kw):
    cfg = gf.Config(**{**dict(n_layers=1, d_model=8, n_heads=2, d_vocab=11, n_ctx=6), **kw})
    model = gf.Transformer(cfg, seed=0)
    tokens = torch.tensor([[1, 2, 3, 4]])
    trace = gf.trace(model, tokens, tokens if cfg.arch == "encoder-decoder" else None, position=1)
    cells = [s.cell for s in trace.steps]
    assert cells[0] == "token embedding" and cells[-1] == "output head"
    for needed in ("query projection", "softmax", "weighted sum", "per-head result", "attention output", "MLP output"):
        assert needed in cells
    if cfg.arch == "encoder-decoder":
        assert "cross-attention output" in cells
        assert step(trace, "key projection").shape == (1, 4, 2, 4)
    if cfg.positional == "rotary":
        assert "rotary (queries)" in cells
    if cfg.positional == "relative":  # the decoder's bias, added to the scaled scores of self-attention only
        bias = step(trace, "relative position bias")
        assert bias.hook == "decoder.hook_position_bias" and bias.shape == (1, 2, 4, 4)
        scaled, biased = step(trace, "attention scores", "×").values, step(trace, "attention scores", "+").values
        torch.testing.assert_close(biased, scaled + bias.values)
        assert cells.count("relative position bias") == 1
    if cfg.norm_position == "post":
        assert step(trace, "residual add").op == "resid_mid = norm(resid_pre + attn_out)"
    if cfg.parallel_attn_mlp:  # one add for both cells, read from the block's output
        assert step(trace, "residual add").hook == "blocks.0.hook_resid_post" and "MLP in" in cells
    assert all(s.values.numel() > 0 for s in trace.steps)


def test_gemma_style_cells_are_traced_with_their_own_numbers():
    """q/k norms, the configured scale, the sliding window, soft-capping, the norms after each cell
    and the capped logits each show as a step, read from its own hook."""
    cfg = gf.Config(
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_vocab=11,
        n_ctx=8,
        positional="rotary",
        norm="rmsnorm",
        norm_position="sandwich",
        act="geglu",
        qk_norm="head",
        attn_scale=0.3,
        sliding_window=2,
        attn_softcap=1.5,
        final_softcap=4.0,
    )
    model = gf.Transformer(cfg, seed=0)
    trace = gf.trace(model, torch.tensor([[1, 2, 3, 4, 5]]), position=4)
    cells = [s.cell for s in trace.steps]
    for needed in ("query norm", "key norm", "soft-capping", "RMSNorm (of the attention output)"):
        assert needed in cells
    assert "sliding window of 2 keys" in step(trace, "attention mask").op
    assert torch.isinf(step(trace, "attention mask").values[:, :3]).all()  # keys 0-2 are outside the window
    q = step(trace, "query norm").values
    dots = step(trace, "attention scores", "q · k").values
    torch.testing.assert_close(step(trace, "attention scores", "× the configured").values, dots * 0.3)
    capped = [s for s in trace.steps if s.cell == "soft-capping"]
    assert capped[0].hook == "blocks.0.attn.hook_attn_scores_capped" and capped[-1].hook == "hook_logits"
    assert capped[-1].values.abs().max() < 4.0 and q.shape == (2, 4)
    assert step(trace, "attention output").op == "attn_out = norm(Σ_h result_h + b_O)"
    assert step(trace, "MLP activation").op == "post = gelu_tanh(gate) · lin"
def test_a_mixture_of_experts_shows_router_weights_and_each_chosen_expert():
    cfg = gf.Config(
        n_layers=1, d_model=8, n_heads=2, d_vocab=11, n_ctx=6, act="swiglu", n_experts=4, d_shared_expert_mlp=6
    )
    model = gf.Transformer(cfg, seed=0)
    tokens = torch.tensor([[1, 2, 3, 4]])
    trace = gf.trace(model, tokens, position=1)
    _, cache = model.run_with_cache(tokens)
    weights = cache["blocks.0.mlp.hook_expert_weights"][0, 1]
    chosen = [s for s in trace.steps if ".hook_expert_out." in s.hook]
    assert [s.cell for s in chosen] == [f"expert {e}" for e in weights.nonzero().flatten().tolist()]
    assert len(chosen) == 2
    assert step(trace, "router").shape == step(trace, "expert weights").shape == (1, 4, 4)
    torch.testing.assert_close(step(trace, "expert weights").values, weights)
    shared = step(trace, "shared expert").values
    torch.testing.assert_close(sum(s.values for s in chosen) + shared, step(trace, "MLP output").values)
    assert step(trace, "MLP output").op == "mlp_out = Σ_e expert_out_e + shared" and "residual add" in str(trace)


@pytest.mark.parametrize(("position", "batch_index"), [(3, 0), (-4, 0), (0, 1)])
def test_a_position_or_sequence_outside_the_input_is_a_clear_error(position, batch_index):
    model, tokens, _ = two_heads()
    with pytest.raises(gf.InputError, match="outside the"):
        gf.trace(model, tokens, position=position, batch_index=batch_index)


def test_text_traces_the_same_numbers_labelled_with_the_token_strings(text_model):
    text = "the cat sat on the log"
    tokens = text_model.to_tokens(text)
    by_text, by_tokens = gf.trace(text_model, text, position=2), gf.trace(text_model, tokens, position=2)
    assert [s.hook for s in by_text.steps] == [s.hook for s in by_tokens.steps]
    for a, b in zip(by_text.steps, by_tokens.steps, strict=True):
        assert torch.equal(a.values, b.values), a.hook
    label = text_model.to_str_tokens(tokens)[2]
    assert by_text.title == by_tokens.title and f'token 2 ("{label}")' in by_text.title
    assert '("r") of' in gf.trace(text_model, tokens, position=2, labels=list("abr" + "x" * 9)).title

"""Tests of the residual block (cells/block.py): a block runs alone on a residual tensor, the residual
hooks have shape (batch, pos, d_model) and are wired as pre-norm / post-norm blocks are drawn."""

from __future__ import annotations

import pytest
import torch

import glassformer as gf

BATCH, POS = 2, 5

CONFIGS = {
    "decoder-pre-learned": dict(),
    "decoder-post-sinusoidal": dict(norm_position="post", positional="sinusoidal", act="relu"),
    "decoder-rotary-gqa-swiglu": dict(positional="rotary", n_kv_heads=2, act="swiglu", norm="rmsnorm", bias=False),
    "decoder-attn-only-nonorm": dict(attn_only=True, norm="none", positional="none"),
    "decoder-sandwich-geglu": dict(norm_position="sandwich", norm="rmsnorm", act="geglu", positional="rotary"),
    "decoder-output-norm-qk": dict(norm_position="output", norm="rmsnorm", qk_norm="projection", bias=False),
    "decoder-sliding-softcap": dict(sliding_window=2, layer_types=["sliding", "full"], attn_softcap=3.0),
    "encoder-post": dict(arch="encoder", norm_position="post"),
    "encoder-rotary-mqa": dict(arch="encoder", positional="rotary", n_kv_heads=1),
}


def make_model(**overrides) -> gf.Transformer:
    cfg = gf.Config(**{**dict(d_model=12, n_layers=2, n_heads=4, d_head=4, d_mlp=7, d_vocab=11, n_ctx=16), **overrides})
    model = gf.Transformer(cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1) weights, non-zero biases and gains != 1, so every term matters
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.2 * noise if name.endswith(".w") else 0.4 * noise)
    return model


def cached_run(model: gf.Transformer):
    tokens = torch.randint(0, model.cfg.d_vocab, (BATCH, POS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.run_with_cache(tokens)[1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_runs_alone_on_its_cached_input(name):
    """`blocks[i](resid)` on the cached hook_resid_pre of block i returns its cached hook_resid_post."""
    model = make_model(**CONFIGS[name])
    cache = cached_run(model)
    for i, block in enumerate(model.blocks):
        with torch.no_grad():
            out = block(cache[f"blocks.{i}.hook_resid_pre"])
        assert out.shape == (BATCH, POS, model.cfg.d_model)
        torch.testing.assert_close(out, cache[f"blocks.{i}.hook_resid_post"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_residual_stream_is_chained_and_shaped(name):
    """Residual hooks are (batch, pos, d_model), and block i+1 reads exactly what block i wrote."""
    model = make_model(**CONFIGS[name])
    cache = cached_run(model)
    for i in range(model.cfg.n_layers):
        for hook in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_resid_post"):
            assert cache[f"blocks.{i}.{hook}"].shape == (BATCH, POS, model.cfg.d_model), hook
        if not model.cfg.attn_only:
            assert cache[f"blocks.{i}.hook_mlp_out"].shape == (BATCH, POS, model.cfg.d_model)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_pre_norm_wiring(norm):
    """Pre-norm: resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out, and the
    attention reads ln1(resid_pre) (its q is ln1.hook_normalized @ W_Q + b_Q)."""
    model = make_model(norm=norm)
    cache = cached_run(model)
    attn = model.blocks[0].attn
    b = "blocks.0."
    torch.testing.assert_close(cache[b + "hook_resid_mid"], cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"])
    torch.testing.assert_close(cache[b + "hook_resid_post"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"])
    with torch.no_grad():
        q = torch.einsum("bpd,hde->bphe", cache[b + "ln1.hook_normalized"], attn.W_Q) + attn.b_Q
    torch.testing.assert_close(cache[b + "attn.hook_q"], q, atol=1e-5, rtol=1e-5)


def test_post_norm_wiring():
    """Post-norm: resid_mid = ln1(resid_pre + attn_out) and resid_post = ln2(resid_mid + mlp_out);
    the block output is normalised (it equals ln2.hook_normalized)."""
    model = make_model(norm_position="post")
    cache = cached_run(model)
    b, ln1, ln2 = "blocks.0.", model.blocks[0].ln1, model.blocks[0].ln2

    def layernorm(x, ln):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln.w.detach(), ln.b.detach(), model.cfg.eps)

    mid = layernorm(cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"], ln1)
    torch.testing.assert_close(cache[b + "hook_resid_mid"], mid, atol=1e-5, rtol=1e-5)
    post = layernorm(cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"], ln2)
    torch.testing.assert_close(cache[b + "hook_resid_post"], post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[b + "hook_resid_post"], cache[b + "ln2.hook_normalized"])


def test_sandwich_norm_wiring():
    """Sandwich (Gemma 2/3): each cell reads ln(resid) and what it adds is its output through
    ln_post: attn_out = ln1_post(attn(ln1(resid_pre))), mlp_out = ln2_post(mlp(ln2(resid_mid)))."""
    model = make_model(norm_position="sandwich", norm="rmsnorm")
    cache = cached_run(model)
    b, block = "blocks.0.", model.blocks[0]
    torch.testing.assert_close(cache[b + "hook_attn_out"], cache[b + "ln1_post.hook_normalized"])
    torch.testing.assert_close(cache[b + "hook_mlp_out"], cache[b + "ln2_post.hook_normalized"])
    with torch.no_grad():
        attn_out = block.ln1_post(block.attn(block.ln1(cache[b + "hook_resid_pre"])))
    torch.testing.assert_close(cache[b + "hook_resid_mid"], cache[b + "hook_resid_pre"] + attn_out)
    torch.testing.assert_close(cache[b + "hook_resid_post"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"])


def test_output_norm_wiring():
    """Output norm (OLMo 2): the cells read the raw stream, their outputs are normed before the add."""
    model = make_model(norm_position="output", norm="rmsnorm", bias=False)
    cache = cached_run(model)
    b, block = "blocks.0.", model.blocks[0]
    assert not hasattr(block.ln1, "hook_normalized")  # no norm before the cell
    with torch.no_grad():
        q = torch.einsum("bpd,hde->bphe", cache[b + "hook_resid_pre"], block.attn.W_Q)
    torch.testing.assert_close(cache[b + "attn.hook_q"], q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[b + "hook_attn_out"], cache[b + "ln1_post.hook_normalized"])
    torch.testing.assert_close(cache[b + "hook_resid_post"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"])


def test_block_rejects_a_residual_of_the_wrong_width():
    """A residual whose last dimension is not d_model raises InputError naming d_model."""
    model = make_model()
    with pytest.raises(gf.InputError, match="d_model"):
        model.blocks[0](torch.zeros(1, 3, 5))


def test_parallel_block_with_a_shared_norm():
    """shared_norm (GPT-J): resid_post = resid_pre + attn_out + mlp_out and the MLP reads ln1's output,
    as the attention does; the block has no ln2."""
    model = make_model(parallel_attn_mlp=True, shared_norm=True, positional="rotary")
    cache = cached_run(model)
    block, b = model.blocks[0], "blocks.0."
    assert block.ln2 is None and b + "ln2.hook_normalized" not in model.hook_dict
    resid_post = cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"] + cache[b + "hook_mlp_out"]
    torch.testing.assert_close(cache[b + "hook_resid_post"], resid_post)
    with torch.no_grad():
        pre = cache[b + "ln1.hook_normalized"] @ block.mlp.W_in + block.mlp.b_in
    torch.testing.assert_close(cache[b + "mlp.hook_pre"], pre, atol=1e-5, rtol=1e-5)

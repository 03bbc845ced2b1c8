"""Mixture-of-experts checkpoints (checkpoints/moe.py) against transformers' Mixtral and Qwen2-MoE:
routing, ablation, both tensor layouts, and models made in glassformer. Logits, hidden states,
generation and round trips are in test_hf.py's family parametrisations."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import glassformer as gf  # noqa: E402
from tests.checkpoints.test_hf import build, padded_batch  # noqa: E402

MOE_FAMILIES = ["mixtral", "qwen2-moe"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_logits_equal_transformers(family):
    hf = build(family)
    model = gf.Transformer.from_hf(hf)
    tokens, mask = padded_batch(101)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(tokens, attention_mask=mask, position_ids=positions, output_router_logits=True)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: "router_logits" in n)
    real = mask.bool().flatten()
    for i in range(model.cfg.n_layers):
        ours = cache[f"blocks.{i}.mlp.hook_router_logits"].flatten(0, 1)  # (batch * pos, n_experts), as theirs
        assert (ours - ref.router_logits[i])[real].abs().max() <= 1e-4, f"layer {i}"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_ablating_an_expert_through_the_hook_equals_zeroing_its_down_projection_in_transformers(family):
    hf = build(family)
    model = gf.Transformer.from_hf(hf)
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(6))

    def ablate(w, _hook):
        w = w.clone()
        w[..., 1] = 0
        return w

    with torch.no_grad():
        ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_expert_weights", ablate)])
        hf.model.layers[0].mlp.experts.down_proj[1].zero_()  # transformers 5 stacks the experts
        expected = hf(tokens).logits
        assert (ablated - expected).abs().max() <= 1e-4
        assert (ablated - model(tokens)).abs().max() > 1e-3  # expert 1 did contribute


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_both_tensor_layouts_open_with_every_tensor_used(tmp_path, family, stacked):
    """save_pretrained writes one tensor per expert (the hub's layout); save_original_format=False
    writes the stacked tensors transformers 5 holds in memory."""
    import warnings

    hf = build(family)
    hf.save_pretrained(tmp_path, save_original_format=not stacked)
    from safetensors.torch import load_file

    assert any("experts.gate_up_proj" in k for k in load_file(tmp_path / "model.safetensors")) == stacked
    tokens, mask = padded_batch(101)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = gf.Transformer.from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_experts_converted_from_a_live_model_do_not_share_its_storage():
    hf = build("mixtral")
    model = gf.Transformer.from_hf(hf)
    with torch.no_grad():
        for expert in model.blocks[0].mlp.experts:
            expert.W_in.zero_()
    assert all(p.abs().sum() > 0 for p in hf.model.layers[0].mlp.experts.gate_up_proj)


def test_qwen2_moe_with_dense_layers_is_refused_clearly():
    hf = build("qwen2-moe")
    hf.config.mlp_only_layers = [1]
    with pytest.raises(gf.CheckpointError, match="mlp_only_layers=\\[1\\].*not supported"):
        gf.Transformer.from_hf(hf)


MOE = dict(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=50, n_ctx=16, positional="rotary", norm="rmsnorm",
    act="swiglu", n_experts=4, d_expert_mlp=24,
)  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "architecture"),
    [
        (dict(bias=False), "MixtralForCausalLM"),
        (dict(d_shared_expert_mlp=40, norm_topk_prob=False), "Qwen2MoeForCausalLM"),
        (dict(d_shared_expert_mlp=40, n_experts_per_token=3), "Qwen2MoeForCausalLM"),
    ],
)
def test_a_mixture_made_in_glassformer_opens_in_transformers(tmp_path, kw, architecture):
    model = gf.Transformer(gf.Config(**MOE, **kw), seed=0).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router_weight.normal_(0, 1.0)  # a decisive router
            if model.cfg.bias:
                block.attn.qkv_bias.normal_(0, 0.1)
    model.to_hf(tmp_path)
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reopened).__name__ == architecture
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(reopened(tokens).logits, model(tokens), atol=1e-5, rtol=0)


def test_a_mixture_no_family_holds_is_refused_with_the_reasons(tmp_path):
    model = gf.Transformer(gf.Config(**MOE, norm_topk_prob=False), seed=0)
    with pytest.raises(gf.CheckpointError, match="(?s)no Hugging Face decoder family.*norm_topk_prob=False.*shared"):
        model.to_hf(tmp_path)
    assert list(tmp_path.iterdir()) == []

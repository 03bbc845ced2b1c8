"""Rotary scaling of Llama-family checkpoints (checkpoints/rope.py): logits, every layer and greedy
decoding equal transformers' past the pre-training context, and to_hf writes the scaling back."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import glassformer as gf  # noqa: E402

ORIGINAL = 16  # the pre-training context; the tests run to 4x it
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    vocab_size=101,
)
ROPES = {  # transformers' rope_parameters of each variant (head_dim 8: 4 frequencies)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    "longrope": {
        "rope_type": "longrope",
        "original_max_position_embeddings": ORIGINAL,
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [1.0, 2.0, 3.0, 4.0],
    },
}


def build(variant: str):
    """A small LlamaForCausalLM with random weights and that rotary scaling. Under dynamic NTK,
    max_position_embeddings is the pre-training context (transformers scales past it)."""
    torch.manual_seed(0)
    max_positions = ORIGINAL if variant == "dynamic" else 4 * ORIGINAL
    config = transformers.LlamaConfig(
        **SMALL,
        initializer_range=0.3,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 500.0, **ROPES[variant]},
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("variant", list(ROPES))
def test_scaled_llama_matches_transformers_past_the_original_context(variant):
    hf = build(variant)
    model = gf.Transformer.from_hf(hf)
    assert model.cfg.rotary_scaling["type"] == variant and model.cfg.n_ctx == 4 * ORIGINAL
    tokens = torch.randint(0, 101, (2, 4 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens)
    assert (ref.logits - logits).abs().max() <= 1e-4
    assert (ref.hidden_states[1] - cache["resid_post", 0]).abs().max() <= 1e-4
    assert (ref.hidden_states[2] - cache["ln_final.hook_normalized"]).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["dynamic"])
def test_greedy_generation_across_the_original_context_matches_transformers(variant):
    """Dynamic NTK recomputes its frequencies as the sequence grows past the original context; keys
    already cached keep their rotation. 48 new tokens from a 6-token prompt cross the 16-position
    context, with a left-padded row. (LongRoPE re-rotates every cached key there, as transformers'
    Phi-3 does and its Llama does not: tested on Phi-3 in test_hf.py.)"""
    hf = build(variant)
    model = gf.Transformer.from_hf(hf)
    prompt = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    expected = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(model.generate(prompt, 48, attention_mask=mask), expected)


@pytest.mark.parametrize("variant", list(ROPES))
def test_from_hf_to_hf_from_hf_keeps_the_scaling(tmp_path, variant):
    hf = build(variant)
    model = gf.Transformer.from_hf(hf)
    model.to_hf(tmp_path)
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reopened.config.rope_parameters["rope_type"] == variant
    assert reopened.config.max_position_embeddings == hf.config.max_position_embeddings
    again = gf.Transformer.from_hf(tmp_path)
    assert again.cfg.rotary_scaling == model.cfg.rotary_scaling and again.cfg.n_ctx == model.cfg.n_ctx
    tokens = torch.randint(0, 101, (1, 4 * ORIGINAL), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reopened(tokens).logits, hf(tokens).logits, atol=1e-6, rtol=0)
        assert torch.equal(again(tokens), model(tokens))


def test_older_configs_rope_scaling_and_top_level_original_context(tmp_path):
    """`rope_scaling` with `type` (transformers 4) and Phi-3's top-level original_max_position_embeddings."""
    from glassformer.checkpoints.rope import rotary_scaling

    old = {"max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rotary_scaling(old) == {"type": "linear", "factor": 2.0}
    phi3 = {
        "max_position_embeddings": 64,
        "original_max_position_embeddings": 16,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    }
    assert rotary_scaling(phi3)["original_n_ctx"] == 16
    with pytest.raises(gf.CheckpointError, match="rotary scaling 'mrope' is not supported; supported: linear"):
        rotary_scaling({"rope_parameters": {"rope_type": "mrope"}})

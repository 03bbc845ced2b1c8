"""Llama family (`llama`, `mistral`, `qwen2`): rotary positions, pre-RMSNorm, SwiGLU,
grouped-query attention, no biases except Q/K/V where the config asks for them (Qwen2)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.tables import (
    PLAIN_DECODER,
    Family,
    HFState,
    Row,
    fit,
    map_biases,
    map_rows,
    require_zero,
    same,
    stacked,
    standard_sizes,
    unmap_rows,
    zeros_like_bias,
)
from glassformer.config import Config
from glassformer.errors import CheckpointError

LAYER = [
    ("ln1.w", "input_layernorm.weight", same),
    ("attn.qkv_weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), stacked),
    ("attn.o_weight", "self_attn.o_proj.weight", same),
    ("ln2.w", "post_attention_layernorm.weight", same),
    ("mlp.gate_weight", "mlp.gate_proj.weight", same),
    ("mlp.in_weight", "mlp.up_proj.weight", same),
    ("mlp.out_weight", "mlp.down_proj.weight", same),
]
# With any bias in the config every linear map has one; those the checkpoint lacks are zeros.
BIASES = [
    ("attn.qkv_bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), stacked),
    ("attn.b_O", "self_attn.o_proj.bias", same),
    ("mlp.b_in", "mlp.up_proj.bias", same),
    ("mlp.b_out", "mlp.down_proj.bias", same),
]


def rope_theta(hf: dict[str, Any]) -> float:
    """transformers 5 keeps rotary settings in `rope_parameters`; older configs at top level."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"rotary scaling {rope.get('rope_type', rope.get('type'))!r} is not supported yet")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config(hf: dict[str, Any], get: HFState) -> Config:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"Llama-family hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    sizes = standard_sizes(hf)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", hf["model_type"] == "mistral") else None
    if window:  # attention within the window is full attention: cap the context there, never be silently wrong
        sizes["n_ctx"] = min(sizes["n_ctx"], window)
    return Config(
        arch="decoder",
        **sizes,
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_head=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        positional="rotary",
        rotary_base=rope_theta(hf),
        norm="rmsnorm",
        eps=hf["rms_norm_eps"],
        act="swiglu",
        bias=qkv_bias(hf) or bool(hf.get("attention_bias") or hf.get("mlp_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        extra={"hf_model_type": hf["model_type"]},
    )


def qkv_bias(hf: dict[str, Any]) -> bool:
    return hf["model_type"] == "qwen2" or bool(hf.get("attention_bias"))


def weights(get: HFState, cfg: Config, layer: list[Row] = LAYER, biases: list[Row] = BIASES) -> dict[str, Tensor]:
    """Our tensors from theirs; `layer`/`biases` are the rows of each layer (a family that replaces
    the MLP passes fewer)."""
    state = {"embed.W_E": get("embed_tokens.weight"), "ln_final.w": get("norm.weight")}
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        state |= map_rows(get, layer, cfg, ours, theirs)
        if cfg.bias:
            state |= map_biases(get, biases, cfg, ours, theirs, like=state["embed.W_E"])
    if cfg.bias:
        state["unembed.b_U"] = zeros_like_bias(cfg.d_vocab, state["embed.W_E"])
    return state


def nonzero(state: dict[str, Tensor], cfg: Config, *names: str) -> bool:
    """Whether any layer has a non-zero tensor among `names` (those the model lacks count as zero)."""
    return any(
        bool(state[f"blocks.{i}.{n}"].any())
        for i in range(cfg.n_layers)
        for n in names
        if cfg.bias and f"blocks.{i}.{n}" in state
    )


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit(
        cfg,
        "llama",
        **PLAIN_DECODER,
        positional="rotary",
        rotary_dim=cfg.d_head,
        norm="rmsnorm",
        act="swiglu",
        parallel_attn_mlp=False,
    )
    attention_bias = nonzero(state, cfg, "attn.qkv_bias", "attn.b_O")
    mlp_bias = nonzero(state, cfg, "mlp.b_in", "mlp.b_out")
    if nonzero(state, cfg, "attn.qkv_bias") and not (mlp_bias or nonzero(state, cfg, "attn.b_O")):
        model_type = "qwen2"  # Q/K/V biases only
    else:
        model_type = "mistral" if cfg.extra.get("hf_model_type") == "mistral" and not attention_bias else "llama"
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {
        "model_type": model_type,
        "architectures": [architecture[model_type]],
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.eps,
        "vocab_size": cfg.d_vocab,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "sliding_window": None,
        "use_sliding_window": False,
        "attention_dropout": cfg.dropout,
    }


def export(state: dict[str, Tensor], cfg: Config, layer: list[Row] = LAYER) -> dict[str, Tensor]:
    """Their tensors from ours, under their names without the model prefix; `layer` as for `weights`."""
    require_zero(state, ["unembed.b_U"], "a Llama-family model")
    attention_bias = nonzero(state, cfg, "attn.qkv_bias", "attn.b_O")
    mlp_bias = nonzero(state, cfg, "mlp.b_in", "mlp.b_out")
    qwen2 = nonzero(state, cfg, "attn.qkv_bias") and not (mlp_bias or nonzero(state, cfg, "attn.b_O"))
    biases = BIASES[:1] if qwen2 else BIASES[:2] * attention_bias + BIASES[2:] * mlp_bias
    out = {"embed_tokens.weight": state["embed.W_E"], "norm.weight": state["ln_final.w"]}
    for i in range(cfg.n_layers):
        out |= unmap_rows(state, layer + biases, cfg, ours=f"blocks.{i}.", theirs=f"layers.{i}.")
    return out


FAMILY = Family(config, weights, prefixes=("model.",), export=export, hf_config=hf_config)

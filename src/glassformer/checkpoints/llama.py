"""Llama family (`llama`, `mistral`, `qwen2`): rotary positions, pre-RMSNorm, SwiGLU,
grouped-query attention, no biases except Q/K/V where the config asks for them (Qwen2)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.tables import (
    PLAIN_DECODER,
    Family,
    HFState,
    fit,
    hf_layer_types,
    map_biases,
    map_rows,
    require_zero,
    same,
    sliding_layers,
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
    # Mistral slides in every layer; Qwen2 (with use_sliding_window) from layer max_window_layers on.
    first_sliding = hf.get("max_window_layers", 0) if hf["model_type"] == "qwen2" else 0
    return Config(
        arch="decoder",
        **standard_sizes(hf),
        **sliding_layers(hf, default=lambda i: i >= first_sliding),
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


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = {"embed.W_E": get("embed_tokens.weight"), "ln_final.w": get("norm.weight")}
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        state |= map_rows(get, LAYER, cfg, ours, theirs)
        if cfg.bias:
            state |= map_biases(get, BIASES, cfg, ours, theirs, like=state["embed.W_E"])
    if cfg.bias:
        state["unembed.b_U"] = zeros_like_bias(cfg.d_vocab, state["embed.W_E"])
    return state


def nonzero(state: dict[str, Tensor], cfg: Config, *names: str) -> bool:
    return any(bool(state[f"blocks.{i}.{n}"].any()) for i in range(cfg.n_layers) for n in names if cfg.bias)


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit(
        cfg,
        "llama",
        **{**PLAIN_DECODER, "sliding_window": cfg.sliding_window},
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
    elif cfg.sliding_window is not None:  # Mistral: every layer slides, no biases
        if "full" in cfg.layer_types or attention_bias or mlp_bias:
            raise CheckpointError("cannot be written as mistral: its layers all slide and it has no biases")
        model_type = "mistral"
    else:
        model_type = "mistral" if cfg.extra.get("hf_model_type") == "mistral" and not attention_bias else "llama"
    windows: dict[str, Any] = {"sliding_window": cfg.sliding_window, "use_sliding_window": bool(cfg.sliding_window)}
    if cfg.sliding_window is not None and model_type == "qwen2":  # Mistral takes no layer_types (Ministral does)
        windows |= {"layer_types": hf_layer_types(cfg), "max_window_layers": cfg.layer_types.index("sliding")}
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
        **windows,
        "attention_dropout": cfg.dropout,
    }


def export(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    require_zero(state, ["unembed.b_U"], "a Llama-family model")
    attention_bias = nonzero(state, cfg, "attn.qkv_bias", "attn.b_O")
    mlp_bias = nonzero(state, cfg, "mlp.b_in", "mlp.b_out")
    qwen2 = nonzero(state, cfg, "attn.qkv_bias") and not (mlp_bias or nonzero(state, cfg, "attn.b_O"))
    biases = BIASES[:1] if qwen2 else BIASES[:2] * attention_bias + BIASES[2:] * mlp_bias
    out = {"embed_tokens.weight": state["embed.W_E"], "norm.weight": state["ln_final.w"]}
    for i in range(cfg.n_layers):
        out |= unmap_rows(state, LAYER + biases, cfg, ours=f"blocks.{i}.", theirs=f"layers.{i}.")
    return out


FAMILY = Family(config, weights, prefixes=("model.",), export=export, hf_config=hf_config)

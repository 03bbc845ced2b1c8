"""GPT-NeoX / Pythia (`model_type: gpt_neox`): partial rotary, attention and MLP in parallel
(`use_parallel_residual`), LayerNorm, GELU, and Q/K/V fused per head in one matrix."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.tables import (
    PLAIN_DECODER,
    Family,
    HFState,
    Transform,
    activation,
    fit,
    hf_activation,
    map_biases,
    map_rows,
    require_zero,
    same,
    standard_sizes,
    unmap_rows,
    zeros_like_bias,
)
from glassformer.config import Config
from glassformer.errors import CheckpointError


def _regroup(t: Tensor, outer: int, inner: int) -> Tensor:
    """Rows grouped (outer, inner, d_head) -> (inner, outer, d_head), same shape overall."""
    return t.reshape(outer, inner, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# NeoX orders the fused rows [q0 k0 v0 q1 k1 v1 …] (per head); glassformer [Q… K… V…].
by_head = Transform(lambda ts, cfg: _regroup(ts[0], cfg.n_heads, 3), lambda t, cfg: (_regroup(t, 3, cfg.n_heads),))


LAYER = [
    ("ln1.w", "input_layernorm.weight", same),
    ("ln1.b", "input_layernorm.bias", same),
    ("ln2.w", "post_attention_layernorm.weight", same),
    ("ln2.b", "post_attention_layernorm.bias", same),
    ("attn.qkv_weight", "attention.query_key_value.weight", by_head),
    ("attn.o_weight", "attention.dense.weight", same),
    ("mlp.in_weight", "mlp.dense_h_to_4h.weight", same),
    ("mlp.b_in", "mlp.dense_h_to_4h.bias", same),
    ("mlp.out_weight", "mlp.dense_4h_to_h.weight", same),
    ("mlp.b_out", "mlp.dense_4h_to_h.bias", same),
]
# Absent when the config sets attention_bias=False: then zeros.
ATTN_BIASES = [("attn.qkv_bias", "attention.query_key_value.bias", by_head), ("attn.b_O", "attention.dense.bias", same)]


def rotary(hf: dict[str, Any]) -> tuple[float, float]:
    """(fraction of each head rotated, base), from transformers 5's rope_parameters or older keys."""
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise CheckpointError("GPT-NeoX rotary scaling is not supported yet")
    fraction = rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
    return float(fraction), float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))


def config(hf: dict[str, Any], get: HFState) -> Config:
    fraction, base = rotary(hf)
    d_head = hf["hidden_size"] // hf["num_attention_heads"]
    parallel = bool(hf.get("use_parallel_residual", True))
    return Config(
        arch="decoder",
        **standard_sizes(hf),
        positional="rotary",
        rotary_dim=int(d_head * fraction),
        rotary_base=base,
        norm="layernorm",
        eps=hf["layer_norm_eps"],
        act=activation(hf["hidden_act"]),
        parallel_attn_mlp=parallel,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        extra={"hf_model_type": "gpt_neox"},
    )


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = {
        "embed.W_E": get("embed_in.weight"),
        "ln_final.w": get("final_layer_norm.weight"),
        "ln_final.b": get("final_layer_norm.bias"),
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        state |= map_rows(get, LAYER, cfg, ours, theirs)
        state |= map_biases(get, ATTN_BIASES, cfg, ours, theirs, like=state["embed.W_E"])
    if not cfg.tie_embeddings:
        head = get.find("embed_out.weight")  # older checkpoints; newer ones name it lm_head
        state["unembed.weight"] = head if head is not None else get("lm_head.weight")
    state["unembed.b_U"] = zeros_like_bias(cfg.d_vocab, state["embed.W_E"])
    return state


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit(
        cfg,
        "gpt_neox",
        **PLAIN_DECODER,
        positional="rotary",
        rotary_scaling=None,
        rotary_interleaved=False,
        shared_norm=False,
        norm="layernorm",
        bias=True,
        n_kv_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
    )
    fraction = cfg.rotary_dim / cfg.d_head
    return {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_mlp,
        "vocab_size": cfg.d_vocab,
        "max_position_embeddings": cfg.n_ctx,
        "layer_norm_eps": cfg.eps,
        "hidden_act": hf_activation(cfg.act),
        "use_parallel_residual": cfg.parallel_attn_mlp,
        "rotary_pct": fraction,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": fraction},
        "attention_bias": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "hidden_dropout": cfg.dropout,
    }


def export(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    require_zero(state, ["unembed.b_U"], "gpt_neox")
    out = {
        "embed_in.weight": state["embed.W_E"],
        "final_layer_norm.weight": state["ln_final.w"],
        "final_layer_norm.bias": state["ln_final.b"],
    }
    for i in range(cfg.n_layers):
        out |= unmap_rows(state, LAYER + ATTN_BIASES, cfg, ours=f"blocks.{i}.", theirs=f"layers.{i}.")
    return out


FAMILY = Family(config, weights, prefixes=("gpt_neox.",), export=export, hf_config=hf_config)

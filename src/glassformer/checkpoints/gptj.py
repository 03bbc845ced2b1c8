"""GPT-J (`model_type: gptj`): attention and MLP in parallel, both reading the one LayerNorm ln_1
(`shared_norm`), partial rotary on neighbouring pairs (`rotary_interleaved`, base 10000), Q/K/V and
out_proj without biases, an MLP and an unembedding with them."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.tables import (
    PLAIN_DECODER,
    Family,
    HFState,
    activation,
    fit,
    hf_activation,
    map_rows,
    require_zero,
    same,
    stacked,
    unmap_rows,
    zeros_like_bias,
)
from glassformer.config import Config

LAYER = [
    ("ln1.w", "ln_1.weight", same),
    ("ln1.b", "ln_1.bias", same),
    ("attn.qkv_weight", ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"), stacked),
    ("attn.o_weight", "attn.out_proj.weight", same),
    ("mlp.in_weight", "mlp.fc_in.weight", same),
    ("mlp.b_in", "mlp.fc_in.bias", same),
    ("mlp.out_weight", "mlp.fc_out.weight", same),
    ("mlp.b_out", "mlp.fc_out.bias", same),
]
ROTARY_BASE = 10000.0  # fixed in GPT-J


def config(hf: dict[str, Any], get: HFState) -> Config:
    d_head = hf["n_embd"] // hf["n_head"]
    return Config(
        arch="decoder",
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_mlp=hf.get("n_inner") or 4 * hf["n_embd"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf["n_positions"],
        positional="rotary",
        rotary_dim=hf.get("rotary_dim") or d_head,
        rotary_base=ROTARY_BASE,
        rotary_interleaved=True,
        norm="layernorm",
        eps=hf["layer_norm_epsilon"],
        act=activation(hf["activation_function"]),
        parallel_attn_mlp=True,
        shared_norm=True,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        extra={"hf_model_type": "gptj"},
    )


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = {"embed.W_E": get("wte.weight"), "ln_final.w": get("ln_f.weight"), "ln_final.b": get("ln_f.bias")}
    for i in range(cfg.n_layers):
        state |= map_rows(get, LAYER, cfg, f"blocks.{i}.", f"h.{i}.")
        state[f"blocks.{i}.attn.qkv_bias"] = zeros_like_bias(3 * cfg.d_model, state["embed.W_E"])
        state[f"blocks.{i}.attn.b_O"] = zeros_like_bias(cfg.d_model, state["embed.W_E"])
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    state["unembed.b_U"] = get("lm_head.bias")
    return state


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit(
        cfg,
        "gptj",
        **{**PLAIN_DECODER, "rotary_interleaved": True, "shared_norm": True},
        positional="rotary",
        rotary_base=ROTARY_BASE,
        norm="layernorm",
        parallel_attn_mlp=True,
        bias=True,
        n_kv_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
    )
    return {
        "model_type": "gptj",
        "architectures": ["GPTJForCausalLM"],
        "vocab_size": cfg.d_vocab,
        "n_positions": cfg.n_ctx,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "rotary_dim": cfg.rotary_dim,
        "n_inner": cfg.d_mlp,
        "activation_function": hf_activation(cfg.act),
        "layer_norm_epsilon": cfg.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attn_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
    }


def export(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    biases = [f"blocks.{i}.attn.{name}" for i in range(cfg.n_layers) for name in ("qkv_bias", "b_O")]
    require_zero(state, biases, "gptj")
    out = {
        "wte.weight": state["embed.W_E"],
        "ln_f.weight": state["ln_final.w"],
        "ln_f.bias": state["ln_final.b"],
        "lm_head.bias": state["unembed.b_U"],  # beside the body, not under its prefix
    }
    for i in range(cfg.n_layers):
        out |= unmap_rows(state, LAYER, cfg, ours=f"blocks.{i}.", theirs=f"h.{i}.")
    return out


FAMILY = Family(config, weights, prefixes=("transformer.",), export=export, hf_config=hf_config)

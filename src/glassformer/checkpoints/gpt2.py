"""GPT-2 (`model_type: gpt2`): learned positions, pre-LayerNorm, GELU (tanh), tied head, Conv1D
weights stored (in, out)."""

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
    transposed,
    unmap_rows,
    zeros_like_bias,
)
from glassformer.config import Config
from glassformer.errors import CheckpointError

LAYER = [
    ("ln1.w", "ln_1.weight", same),
    ("ln1.b", "ln_1.bias", same),
    ("attn.qkv_weight", "attn.c_attn.weight", transposed),
    ("attn.qkv_bias", "attn.c_attn.bias", same),
    ("attn.o_weight", "attn.c_proj.weight", transposed),
    ("attn.b_O", "attn.c_proj.bias", same),
    ("ln2.w", "ln_2.weight", same),
    ("ln2.b", "ln_2.bias", same),
    ("mlp.in_weight", "mlp.c_fc.weight", transposed),
    ("mlp.b_in", "mlp.c_fc.bias", same),
    ("mlp.out_weight", "mlp.c_proj.weight", transposed),
    ("mlp.b_out", "mlp.c_proj.bias", same),
]
TOP = [
    ("embed.W_E", "wte.weight", same),
    ("pos_embed.W_pos", "wpe.weight", same),
    ("ln_final.w", "ln_f.weight", same),
    ("ln_final.b", "ln_f.bias", same),
]


def config(hf: dict[str, Any], get: HFState) -> Config:
    unsupported = [k for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn") if hf.get(k)]
    if not hf.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=False")
    if unsupported:
        raise CheckpointError(f"GPT-2 options not supported: {unsupported}")
    return Config(
        arch="decoder",
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf["n_positions"],
        d_mlp=hf.get("n_inner") or 4 * hf["n_embd"],
        act=activation(hf["activation_function"]),
        eps=hf["layer_norm_epsilon"],
        positional="learned",
        norm="layernorm",
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        extra={"hf_model_type": "gpt2"},
    )


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = map_rows(get, TOP, cfg)
    for i in range(cfg.n_layers):
        state |= map_rows(get, LAYER, cfg, ours=f"blocks.{i}.", theirs=f"h.{i}.")
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    state["unembed.b_U"] = zeros_like_bias(cfg.d_vocab, state["embed.W_E"])
    return state


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit(
        cfg,
        "gpt2",
        **PLAIN_DECODER,
        positional="learned",
        norm="layernorm",
        bias=True,
        parallel_attn_mlp=False,
        n_kv_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
    )
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "vocab_size": cfg.d_vocab,
        "n_positions": cfg.n_ctx,
        "n_inner": cfg.d_mlp,
        "activation_function": hf_activation(cfg.act),
        "layer_norm_epsilon": cfg.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
    }


def export(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    require_zero(state, ["unembed.b_U"], "gpt2")
    out = unmap_rows(state, TOP, cfg)
    for i in range(cfg.n_layers):
        out |= unmap_rows(state, LAYER, cfg, ours=f"blocks.{i}.", theirs=f"h.{i}.")
    return out


FAMILY = Family(config, weights, prefixes=("transformer.",), export=export, hf_config=hf_config)

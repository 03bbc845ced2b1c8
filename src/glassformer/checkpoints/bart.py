"""BART and Marian (`bart`, `marian`): encoder-decoder, post-norm, shared token embeddings.

BART: learned positions stored with an offset of 2, a LayerNorm after each stack's embeddings.
Marian: sinusoidal positions in the [sin | cos] halves layout (taken from the checkpoint, or
computed when it omits them), embeddings scaled by sqrt(d_model). Both: a final logits bias.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from glassformer.checkpoints.tables import Family, HFState, activation, map_rows, same, stacked
from glassformer.config import Config
from glassformer.errors import CheckpointError


def attention(theirs: str) -> list:
    return [
        ("qkv_weight", tuple(f"{theirs}.{p}_proj.weight" for p in "qkv"), stacked),
        ("qkv_bias", tuple(f"{theirs}.{p}_proj.bias" for p in "qkv"), stacked),
        ("o_weight", f"{theirs}.out_proj.weight", same),
        ("b_O", f"{theirs}.out_proj.bias", same),
    ]


def norm(ours: str, theirs: str) -> list:
    return [(f"{ours}.w", f"{theirs}.weight", same), (f"{ours}.b", f"{theirs}.bias", same)]


MLP = [
    ("mlp.in_weight", "fc1.weight", same),
    ("mlp.b_in", "fc1.bias", same),
    ("mlp.out_weight", "fc2.weight", same),
    ("mlp.b_out", "fc2.bias", same),
]
ENCODER_LAYER = (
    [(f"attn.{a}", b, c) for a, b, c in attention("self_attn")]
    + norm("ln1", "self_attn_layer_norm")
    + MLP
    + norm("ln2", "final_layer_norm")
)
DECODER_LAYER = (
    ENCODER_LAYER
    + [(f"cross_attn.{a}", b, c) for a, b, c in attention("encoder_attn")]
    + norm("ln_cross", "encoder_attn_layer_norm")
)


def marian_table(n_ctx: int, d_model: int) -> Tensor:
    """Marian's sinusoid: sin in the first half of the dims, cos in the second."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-2 * torch.arange(d_model // 2, dtype=torch.float64) / d_model)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float()  # (n_ctx, d_model)


def config(hf: dict[str, Any], get: HFState) -> Config:
    marian = hf["model_type"] == "marian"
    problems = []
    if hf["encoder_attention_heads"] != hf["decoder_attention_heads"]:
        problems.append("different head counts in encoder and decoder")
    if hf["encoder_ffn_dim"] != hf["decoder_ffn_dim"]:
        problems.append("different MLP widths in encoder and decoder")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        problems.append("pre-norm (mBART-style) layers")
    if not hf.get("share_encoder_decoder_embeddings", True):
        problems.append("separate encoder and decoder embeddings")
    if problems:
        raise CheckpointError(f"{hf['model_type']} checkpoint with {', '.join(problems)} is not supported")
    return Config(
        arch="encoder-decoder",
        d_model=hf["d_model"],
        n_layers=hf["encoder_layers"],
        n_decoder_layers=hf["decoder_layers"],
        n_heads=hf["encoder_attention_heads"],
        d_mlp=hf["encoder_ffn_dim"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf["max_position_embeddings"],
        positional="learned",
        norm="layernorm",
        norm_position="post",
        act=activation(hf["activation_function"]),
        embed_norm=not marian,
        embed_scale=math.sqrt(hf["d_model"]) if hf.get("scale_embedding") else 1.0,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        extra={"hf_model_type": hf["model_type"]},
    )


def positions(get: HFState, cfg: Config, stack: str) -> Tensor:
    table = get.find(f"{stack}.embed_positions.weight")
    if cfg.extra["hf_model_type"] == "marian":
        return marian_table(cfg.n_ctx, cfg.d_model) if table is None else table
    return get(f"{stack}.embed_positions.weight")[2:]  # BART's learned positions start at row 2


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = {"embed.W_E": get("shared.weight"), "unembed.b_U": get("final_logits_bias")[0]}
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    for stack, n_layers, layer in (
        ("encoder", cfg.n_layers, ENCODER_LAYER),
        ("decoder", cfg.n_decoder_layers, DECODER_LAYER),
    ):
        state[f"{stack}.pos_embed.W_pos"] = positions(get, cfg, stack)
        if cfg.embed_norm:
            state |= map_rows(get, norm(f"{stack}.ln_embed", f"{stack}.layernorm_embedding"), cfg)
        for i in range(n_layers):
            state |= map_rows(get, layer, cfg, ours=f"{stack}.blocks.{i}.", theirs=f"{stack}.layers.{i}.")
    return state


FAMILY = Family(config, weights, prefixes=("model.",))

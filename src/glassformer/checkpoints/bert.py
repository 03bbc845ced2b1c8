"""BERT (`model_type: bert`): encoder, learned positions plus segment (token type) embeddings,
LayerNorm after the embeddings and after each sub-layer (post-norm), GELU; the MLM head's
dense+act+norm transform and the pooler when the checkpoint has them."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.tables import (
    Family,
    HFState,
    activation,
    map_rows,
    same,
    stacked,
    standard_sizes,
    zeros_like_bias,
)
from glassformer.config import Config
from glassformer.errors import CheckpointError

TOP = [
    ("embed.W_E", "embeddings.word_embeddings.weight", same),
    ("pos_embed.W_pos", "embeddings.position_embeddings.weight", same),
    ("token_type_embed.W_token_type", "embeddings.token_type_embeddings.weight", same),
    ("ln_embed.w", "embeddings.LayerNorm.weight", same),
    ("ln_embed.b", "embeddings.LayerNorm.bias", same),
]
LAYER = [
    (
        "attn.qkv_weight",
        ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"),
        stacked,
    ),
    ("attn.qkv_bias", ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"), stacked),
    ("attn.o_weight", "attention.output.dense.weight", same),
    ("attn.b_O", "attention.output.dense.bias", same),
    ("ln1.w", "attention.output.LayerNorm.weight", same),
    ("ln1.b", "attention.output.LayerNorm.bias", same),
    ("mlp.in_weight", "intermediate.dense.weight", same),
    ("mlp.b_in", "intermediate.dense.bias", same),
    ("mlp.out_weight", "output.dense.weight", same),
    ("mlp.b_out", "output.dense.bias", same),
    ("ln2.w", "output.LayerNorm.weight", same),
    ("ln2.b", "output.LayerNorm.bias", same),
]
MLM_HEAD = [
    ("unembed.transform_weight", "cls.predictions.transform.dense.weight", same),
    ("unembed.b_transform", "cls.predictions.transform.dense.bias", same),
    ("unembed.ln_transform.w", "cls.predictions.transform.LayerNorm.weight", same),
    ("unembed.ln_transform.b", "cls.predictions.transform.LayerNorm.bias", same),
    ("unembed.b_U", "cls.predictions.bias", same),
]
POOLER = [("pooler.weight", "pooler.dense.weight", same), ("pooler.b_pool", "pooler.dense.bias", same)]


def config(hf: dict[str, Any], get: HFState) -> Config:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported")
    head = get.find(MLM_HEAD[0][1]) is not None
    return Config(
        arch="encoder",
        **standard_sizes(hf),
        positional="learned",
        norm="layernorm",
        norm_position="post",
        eps=hf["layer_norm_eps"],
        act=activation(hf["hidden_act"]),
        embed_norm=True,
        n_token_types=hf["type_vocab_size"],
        head_transform=head,
        pooler=get.find(POOLER[0][1]) is not None,
        bias=True,
        tie_embeddings=not head or bool(hf.get("tie_word_embeddings", True)),  # an untied MLM decoder has its own
        extra={"hf_model_type": "bert"},
    )


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = map_rows(get, TOP, cfg)
    for i in range(cfg.n_layers):
        state |= map_rows(get, LAYER, cfg, ours=f"blocks.{i}.", theirs=f"encoder.layer.{i}.")
    if cfg.head_transform:
        state |= map_rows(get, MLM_HEAD, cfg)
        decoder_bias = get.find("cls.predictions.decoder.bias")  # what the decoder adds; the same tensor when tied
        if decoder_bias is not None:
            state["unembed.b_U"] = decoder_bias
        if not cfg.tie_embeddings:
            state["unembed.weight"] = get("cls.predictions.decoder.weight")
    else:  # a bare encoder: the head is the tied embedding, for completeness only
        state["unembed.b_U"] = zeros_like_bias(cfg.d_vocab, state["embed.W_E"])
    if cfg.pooler:
        state |= map_rows(get, POOLER, cfg)
    return state


FAMILY = Family(config, weights, prefixes=("bert.",))

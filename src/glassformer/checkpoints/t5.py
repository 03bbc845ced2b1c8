"""T5 (`model_type: t5`): encoder-decoder, pre-RMSNorm without bias, no 1/sqrt(d_head) scaling, a
relative position bias on the self-attention scores (its table in block 0 of each stack), a final
norm on both stacks, token embeddings shared by both stacks.

Original T5: ReLU MLP, tied head reading the decoder output times d_model**-0.5. T5 v1.1 / Flan-T5:
gated-GELU MLP (`wi_0` the gate, `wi_1` the linear branch), its own `lm_head`, no output scaling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from glassformer.checkpoints.tables import (
    Family,
    HFState,
    Row,
    activation,
    fit,
    hf_activation,
    map_rows,
    same,
    stacked,
    unmap_rows,
)
from glassformer.config import Config
from glassformer.errors import CheckpointError

GATED = {"gelu_new": "geglu", "silu": "swiglu"}  # `gated-{act}` -> our gated activation
STACKS = ("encoder", "decoder")


def attention(ours: str, theirs: str) -> list[Row]:
    return [
        (f"{ours}.qkv_weight", tuple(f"{theirs}.{p}.weight" for p in "qkv"), stacked),
        (f"{ours}.o_weight", f"{theirs}.o.weight", same),
    ]


def layer(cross: bool, gated: bool) -> list[Row]:
    """One block: self-attention (`layer.0`), cross-attention (`layer.1`, decoder), the MLP last."""
    rows = [*attention("attn", "layer.0.SelfAttention"), ("ln1.w", "layer.0.layer_norm.weight", same)]
    if cross:
        rows += [*attention("cross_attn", "layer.1.EncDecAttention"), ("ln_cross.w", "layer.1.layer_norm.weight", same)]
    ff = "layer.2" if cross else "layer.1"
    dense = f"{ff}.DenseReluDense"
    if gated:
        rows += [("mlp.gate_weight", f"{dense}.wi_0.weight", same), ("mlp.in_weight", f"{dense}.wi_1.weight", same)]
    else:
        rows.append(("mlp.in_weight", f"{dense}.wi.weight", same))
    return [*rows, ("mlp.out_weight", f"{dense}.wo.weight", same), ("ln2.w", f"{ff}.layer_norm.weight", same)]


TOP = [("embed.W_E", "shared.weight", same)] + [
    row
    for stack in STACKS
    for row in (
        (f"{stack}.ln_final.w", f"{stack}.final_layer_norm.weight", same),
        (f"{stack}.rel_pos.W_rel", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", same),
    )
]
# Copies of shared.weight some checkpoints store, and a cross-attention bias table transformers ignores.
REDUNDANT = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


def feed_forward(hf: dict[str, Any]) -> str:
    """`feed_forward_proj` ("relu", "gated-gelu", …) -> our activation, as transformers reads it."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(f"T5 feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
    act = activation("gelu_new" if proj == "gated-gelu" else parts[-1])
    if len(parts) == 1:
        return act
    if act not in GATED:
        raise CheckpointError(f"T5 feed_forward_proj {proj!r}: a gated MLP needs GELU (tanh) or SiLU")
    return GATED[act]


def tied_head(get: HFState) -> bool:
    """Whether the output head is the shared embedding: no lm_head, or one equal to it."""
    head, shared = get.find("lm_head.weight"), get("shared.weight")
    return head is None or head.data_ptr() == shared.data_ptr() or torch.equal(head, shared)


def config(hf: dict[str, Any], get: HFState) -> Config:
    # Original T5 scales the decoder output (its configs tie the head); transformers 5 records the choice
    # as scale_decoder_outputs.
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    start = hf.get("decoder_start_token_id")
    return Config(
        arch="encoder-decoder",
        d_model=hf["d_model"],
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        n_heads=hf["num_heads"],
        d_head=hf["d_kv"],
        d_mlp=hf["d_ff"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf.get("n_positions") or 512,  # relative positions set no limit; transformers' tokenizers use 512
        positional="relative",
        relative_buckets=hf["relative_attention_num_buckets"],
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        attn_scale=1.0,
        norm="rmsnorm",
        eps=hf["layer_norm_epsilon"],
        act=feed_forward(hf),
        bias=False,
        tie_embeddings=tied_head(get),
        unembed_scale=hf["d_model"] ** -0.5 if scaled else 1.0,
        extra={
            "hf_model_type": "t5",
            "decoder_start_token_id": hf.get("pad_token_id", 0) if start is None else start,
        },
    )


def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
    state = map_rows(get, TOP, cfg)
    for stack, n_layers in zip(STACKS, (cfg.n_layers, cfg.n_decoder_layers), strict=True):
        rows = layer(cross=stack == "decoder", gated=cfg.gated)
        for i in range(n_layers):
            state |= map_rows(get, rows, cfg, ours=f"{stack}.blocks.{i}.", theirs=f"{stack}.block.{i}.")
    if not cfg.tie_embeddings:
        state["unembed.weight"] = get("lm_head.weight")
    for name in REDUNDANT:
        get.find(name)
    return state


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit(
        cfg,
        "t5",
        arch="encoder-decoder",
        positional="relative",
        norm="rmsnorm",
        norm_position="pre",
        bias=False,
        attn_scale=1.0,
        attn_only=False,
        n_kv_heads=cfg.n_heads,
        qk_norm="none",
        embed_norm=False,
        embed_scale=1.0,
        head_transform=False,
        pooler=False,
        attn_softcap=None,
        final_softcap=None,
    )
    scaled = math.isclose(cfg.unembed_scale, cfg.d_model**-0.5)
    if not (scaled and cfg.tie_embeddings or cfg.unembed_scale == 1.0):
        raise CheckpointError(
            f"cannot be written as t5: unembed_scale={cfg.unembed_scale!r} with tie_embeddings={cfg.tie_embeddings} "
            f"(needs 1.0, or d_model**-0.5 with a tied head)"
        )
    gated = {ours: f"gated-{'gelu' if theirs == 'gelu_new' else theirs}" for theirs, ours in GATED.items()}
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "is_encoder_decoder": True,
        "vocab_size": cfg.d_vocab,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_head,
        "d_ff": cfg.d_mlp,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_decoder_layers,
        "num_heads": cfg.n_heads,
        "n_positions": cfg.n_ctx,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.eps,
        "feed_forward_proj": gated.get(cfg.act) or hf_activation(cfg.act),
        "tie_word_embeddings": scaled,  # transformers scales the decoder output exactly when this is true
        "dropout_rate": cfg.dropout,
        "decoder_start_token_id": cfg.extra.get("decoder_start_token_id", 0),
    }


def export(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    out = unmap_rows(state, TOP, cfg)
    for stack, n_layers in zip(STACKS, (cfg.n_layers, cfg.n_decoder_layers), strict=True):
        rows = layer(cross=stack == "decoder", gated=cfg.gated)
        for i in range(n_layers):
            out |= unmap_rows(state, rows, cfg, ours=f"{stack}.blocks.{i}.", theirs=f"{stack}.block.{i}.")
    if cfg.tie_embeddings and cfg.unembed_scale == 1.0:  # tied, unscaled: only an lm_head of its own says so
        out["lm_head.weight"] = state["embed.W_E"]
    return out


FAMILY = Family(config, weights, prefixes=(), export=export, hf_config=hf_config)

"""Phi-3 (`phi3`), laid out as Llama but with Q, K, V in one `qkv_proj` and the MLP's gate and up
projections in one `gate_up_proj` (gate rows first); partial rotary where the config asks for it,
and Mistral's sliding window in every layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from glassformer.checkpoints.llama import Layout, bias_kinds, family, fit_rotary, hf_body, rotary_decoder
from glassformer.checkpoints.tables import HFState, Transform, same, sliding_layers
from glassformer.config import Config
from glassformer.errors import CheckpointError

# One (2 d_mlp, d_model) matrix <-> our gate and up (in) matrices.
halves = Transform(lambda ts, cfg: ts[0].chunk(2, dim=0), lambda ts, cfg: (torch.cat(ts, dim=0),))
LAYOUT = Layout(
    attention=(
        ("attn.qkv_weight", "self_attn.qkv_proj.weight", same),
        ("attn.o_weight", "self_attn.o_proj.weight", same),
    ),
    mlp=(
        (("mlp.gate_weight", "mlp.in_weight"), "mlp.gate_up_proj.weight", halves),
        ("mlp.out_weight", "mlp.down_proj.weight", same),
    ),
)


def config(hf: dict[str, Any], get: HFState) -> Config:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"Phi-3 hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    d_head = hf["hidden_size"] // hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return rotary_decoder(
        hf, **sliding_layers(hf, default=lambda i: True), rotary_dim=int(d_head * fraction), bias=False
    )


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit_rotary(
        cfg,
        "phi3",
        sliding_window=cfg.sliding_window,
        rotary_scaling=cfg.rotary_scaling,
        rotary_dim=cfg.rotary_dim,  # partial rotary: any
        d_head=cfg.d_model // cfg.n_heads,
        layer_types=["full" if cfg.sliding_window is None else "sliding"] * cfg.n_layers,
    )
    if any(bias_kinds(state, cfg).values()):
        raise CheckpointError("cannot be written as phi3: it has no biases")
    body = hf_body(cfg, "phi3")
    fraction = cfg.rotary_dim / cfg.d_head
    body["rope_parameters"] |= {"partial_rotary_factor": fraction}
    original = (cfg.rotary_scaling or {}).get("original_n_ctx", cfg.n_ctx)
    body |= {"sliding_window": cfg.sliding_window, "original_max_position_embeddings": original}
    # Phi-3's defaults name tokens of its own 32k vocabulary: the tokenizer, if any, carries the ids.
    return {**body, "hidden_act": "silu", "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


FAMILY = family(config, hf_config, LAYOUT)

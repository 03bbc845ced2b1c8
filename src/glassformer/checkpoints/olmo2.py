"""OLMo 2 (`olmo2`), laid out as Llama with the norms moved: none before attention and MLP, one
after each (`norm_position="output"`), and q/k RMSNorm over the whole projection, before rotary."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints.llama import Layout, bias_kinds, family, fit_rotary, hf_body, rotary_decoder
from glassformer.checkpoints.tables import HFState
from glassformer.config import Config
from glassformer.errors import CheckpointError


def config(hf: dict[str, Any], get: HFState) -> Config:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"OLMo 2 hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    return rotary_decoder(hf, norm_position="output", qk_norm="projection")


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    fit_rotary(cfg, "olmo2", norm_position="output", qk_norm="projection")
    biases = bias_kinds(state, cfg)
    if biases["mlp"] or biases["qkv_only"]:
        raise CheckpointError("cannot be written as olmo2: its biases are on all four attention maps or none")
    return {**hf_body(cfg, "olmo2"), "hidden_act": "silu", "attention_bias": biases["attention"]}


FAMILY = family(config, hf_config, Layout())

"""Mixture-of-experts families (`mixtral`, `qwen2_moe`, `qwen3_moe`): Llama-family norms and attention
(llama.py's rows: Mixtral's are Mistral's, Qwen2-MoE's Qwen2's, Qwen3-MoE's Qwen3's, q/k norms included),
and in place of the MLP a router, SwiGLU experts and, in Qwen2-MoE, a shared expert with a sigmoid gate.

Saved checkpoints hold one tensor per expert and projection (Mixtral's under `block_sparse_moe.`,
named w1/w3/w2); a transformers 5 model in memory stacks them, gate and up together in
`experts.gate_up_proj (n_experts, 2 * d_expert_mlp, d_model)`. Both are read; `to_hf` writes the
per-expert layout that the hub's checkpoints have and transformers reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from glassformer.checkpoints import llama
from glassformer.checkpoints.tables import (
    Family,
    HFState,
    Row,
    Transform,
    fit,
    map_rows,
    require_zero,
    same,
    unmap_rows,
)
from glassformer.config import Config
from glassformer.errors import CheckpointError

# Norms and attention as in llama.py; the experts' rows below take the MLP's place.
LAYOUT = llama.Layout(mlp=(), biases=tuple(row for row in llama.BIASES if not row[0].startswith("mlp.")))
# The shared expert's gate is (1, d_model) in transformers; llama.cpp keeps it as a (d_model,) vector.
as_row = Transform(lambda ts, cfg: ts[0].reshape(1, -1), lambda t, cfg: (t,))
SHARED = [
    ("mlp.shared_expert.gate_weight", "shared_expert.gate_proj.weight", same),
    ("mlp.shared_expert.in_weight", "shared_expert.up_proj.weight", same),
    ("mlp.shared_expert.out_weight", "shared_expert.down_proj.weight", same),
    ("mlp.shared_gate_weight", "shared_expert_gate.weight", as_row),
]


@dataclass(frozen=True)
class Experts:
    """Where a family keeps a layer's mixture of experts."""

    blocks: tuple[str, ...]  # the MoE block in a layer: its name on disk first, then in memory
    projections: tuple[str, str, str]  # one expert's gate, up and down projections


MIXTRAL = Experts(("block_sparse_moe.", "mlp."), ("w1", "w3", "w2"))
QWEN2_MOE = Experts(("mlp.",), ("gate_proj", "up_proj", "down_proj"))


def expert_rows(table: Experts, block: str, cfg: Config) -> list[Row]:
    """The router's row and one row per expert and projection (names relative to a layer)."""
    rows: list[Row] = [("mlp.router_weight", f"{block}gate.weight", same)]
    for e in range(cfg.n_experts):
        for mine, theirs in zip(("gate_weight", "in_weight", "out_weight"), table.projections, strict=True):
            rows.append((f"mlp.experts.{e}.{mine}", f"{block}experts.{e}.{theirs}.weight", same))
    if cfg.d_shared_expert_mlp:
        rows += [(mine, block + theirs, transform) for mine, theirs, transform in SHARED]
    return rows


def read_experts(get: HFState, cfg: Config, table: Experts, ours: str, theirs: str) -> dict[str, Tensor]:
    """One layer's router, experts and shared expert, stored per expert or stacked."""
    block = next((b for b in table.blocks if get.find(f"{theirs}{b}gate.weight") is not None), table.blocks[0])
    fused = get.find(f"{theirs}{block}experts.gate_up_proj")
    if fused is None:
        return map_rows(get, expert_rows(table, block, cfg), cfg, ours, theirs)
    gate, up = fused.chunk(2, dim=1)  # (n_experts, d_expert_mlp, d_model) each
    down = get(f"{theirs}{block}experts.down_proj")  # (n_experts, d_model, d_expert_mlp)
    rest = [row for row in expert_rows(table, block, cfg) if ".experts." not in row[0]]
    state = map_rows(get, rest, cfg, ours, theirs)
    for e in range(cfg.n_experts):  # copies: views would share storage with the (live) stacked tensors
        parts = (("gate_weight", gate), ("in_weight", up), ("out_weight", down))
        state |= {f"{ours}mlp.experts.{e}.{mine}": t[e].clone() for mine, t in parts}
    get.release([f"{theirs}{block}experts.gate_up_proj", f"{theirs}{block}experts.down_proj"])
    return state


def moe_config(hf: dict[str, Any], get: HFState, attention: str, **experts: Any) -> Config:
    """The Llama-family config of `attention`'s model_type, with the experts' fields."""
    base = llama.config({**hf, "model_type": attention}, get)
    fields = dict(n_experts_per_token=hf["num_experts_per_tok"], extra={"hf_model_type": hf["model_type"]})
    return dataclasses.replace(base, **fields, **experts)


def mixtral_config(hf: dict[str, Any], get: HFState) -> Config:
    return moe_config(hf, get, "mistral", n_experts=hf["num_local_experts"], d_expert_mlp=hf["intermediate_size"])


def every_layer_sparse(hf: dict[str, Any]) -> None:
    """Qwen's MoE configs may keep dense MLPs in some layers: not supported yet, said so."""
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise CheckpointError(
            f"{hf['model_type']} with dense MLP layers (decoder_sparse_step={hf.get('decoder_sparse_step')}, "
            f"mlp_only_layers={hf.get('mlp_only_layers')}) is not supported yet: every layer must be a mixture"
        )


def qwen2_moe_config(hf: dict[str, Any], get: HFState) -> Config:
    every_layer_sparse(hf)
    return moe_config(
        hf,
        get,
        "qwen2",
        n_experts=hf["num_experts"],
        d_expert_mlp=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        d_shared_expert_mlp=hf["shared_expert_intermediate_size"],
        bias=bool(hf.get("qkv_bias", True)),
    )


def qwen3_moe_config(hf: dict[str, Any], get: HFState) -> Config:
    every_layer_sparse(hf)
    return moe_config(
        hf,
        get,
        "qwen3",
        n_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 names it as Mixtral does
        d_expert_mlp=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def weights_of(table: Experts) -> Callable[[HFState, Config], dict[str, Tensor]]:
    """`Family.weights` for a table: llama.py's norms and attention, then the experts."""

    def weights(get: HFState, cfg: Config) -> dict[str, Tensor]:
        state = LAYOUT.weights(get, cfg)
        for i in range(cfg.n_layers):
            state |= read_experts(get, cfg, table, f"blocks.{i}.", f"layers.{i}.")
        return state

    return weights


def export_of(table: Experts) -> Callable[[dict[str, Tensor], Config], dict[str, Tensor]]:
    """`Family.export` for a table: the per-expert layout under the on-disk block name."""

    def export(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
        out = LAYOUT.export(state, cfg)
        for i in range(cfg.n_layers):
            out |= unmap_rows(state, expert_rows(table, table.blocks[0], cfg), cfg, f"blocks.{i}.", f"layers.{i}.")
        return out

    return export


def base_config(cfg: Config, state: dict[str, Tensor], family: str, **needs: Any) -> dict[str, Any]:
    """llama.py's config fields for the attention, after checking that `cfg` is a mixture `family` holds."""
    if not cfg.n_experts:
        raise CheckpointError(f"cannot be written as {family}: n_experts=0 (a dense MLP, not a mixture of experts)")
    fit(cfg, family, **needs)
    hf = llama.hf_config(dataclasses.replace(cfg, n_experts=0), state)
    for key in ("attention_bias", "mlp_bias"):  # Llama's switches; these families have their own
        del hf[key]
    return hf | {"num_experts_per_tok": cfg.n_experts_per_token, "output_router_logits": False}


def layer_names(cfg: Config, *names: str) -> list[str]:
    return [f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in names]


def mixtral_hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    hf = base_config(cfg, state, "mixtral", norm_topk_prob=True, d_shared_expert_mlp=0)
    require_zero(state, layer_names(cfg, "attn.qkv_bias", "attn.b_O"), "mixtral")
    return hf | {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": cfg.d_expert_mlp,
        "num_local_experts": cfg.n_experts,
        "router_jitter_noise": 0.0,
    }


def qwen2_moe_hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    if not cfg.d_shared_expert_mlp:
        raise CheckpointError("cannot be written as qwen2_moe: d_shared_expert_mlp=0 (it always has a shared expert)")
    hf = base_config(cfg, state, "qwen2_moe")
    require_zero(state, layer_names(cfg, "attn.b_O"), "qwen2_moe")
    return hf | {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "intermediate_size": cfg.d_mlp,
        "num_experts": cfg.n_experts,
        "moe_intermediate_size": cfg.d_expert_mlp,
        "shared_expert_intermediate_size": cfg.d_shared_expert_mlp,
        "norm_topk_prob": cfg.norm_topk_prob,
        "qkv_bias": llama.nonzero(state, cfg, "attn.qkv_bias"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def qwen3_moe_hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    hf = base_config(cfg, state, "qwen3_moe", qk_norm="head", d_shared_expert_mlp=0)
    return hf | {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "intermediate_size": cfg.d_mlp,
        "num_experts": cfg.n_experts,
        "moe_intermediate_size": cfg.d_expert_mlp,
        "norm_topk_prob": cfg.norm_topk_prob,
        "attention_bias": llama.nonzero(state, cfg, "attn.qkv_bias", "attn.b_O"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


PREFIXES = ("model.",)
MIXTRAL_FAMILY = Family(mixtral_config, weights_of(MIXTRAL), PREFIXES, export_of(MIXTRAL), mixtral_hf_config)
QWEN2_MOE_FAMILY = Family(qwen2_moe_config, weights_of(QWEN2_MOE), PREFIXES, export_of(QWEN2_MOE), qwen2_moe_hf_config)
QWEN3_MOE_FAMILY = Family(qwen3_moe_config, weights_of(QWEN2_MOE), PREFIXES, export_of(QWEN2_MOE), qwen3_moe_hf_config)

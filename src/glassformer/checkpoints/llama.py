"""Llama family (`llama`, `mistral`, `qwen2`, `qwen3`): rotary positions, pre-RMSNorm, SwiGLU,
grouped-query attention, no biases except Q/K/V where the config asks for them (Qwen2), q/k norms
(Qwen3). The layer table here serves every rotary decoder laid out as Llama is (Gemma, OLMo 2,
Phi-3): their norms sit where `norm_position` says, under the names transformers gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from glassformer.checkpoints import rope
from glassformer.checkpoints.tables import (
    PLAIN_DECODER,
    Family,
    HFState,
    Row,
    Transform,
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

ATTENTION = [
    ("attn.qkv_weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), stacked),
    ("attn.o_weight", "self_attn.o_proj.weight", same),
]
MLP = [
    ("mlp.gate_weight", "mlp.gate_proj.weight", same),
    ("mlp.in_weight", "mlp.up_proj.weight", same),
    ("mlp.out_weight", "mlp.down_proj.weight", same),
]
# Our norm gains and theirs, by Config.norm_position; q/k norms when Config.qk_norm asks for them.
NORMS = {
    "pre": [("ln1.w", "input_layernorm.weight"), ("ln2.w", "post_attention_layernorm.weight")],
    "sandwich": [
        ("ln1.w", "input_layernorm.weight"),
        ("ln1_post.w", "post_attention_layernorm.weight"),
        ("ln2.w", "pre_feedforward_layernorm.weight"),
        ("ln2_post.w", "post_feedforward_layernorm.weight"),
    ],
    "output": [("ln1_post.w", "post_attention_layernorm.weight"), ("ln2_post.w", "post_feedforward_layernorm.weight")],
}
QK_NORMS = [("attn.q_norm.w", "self_attn.q_norm.weight"), ("attn.k_norm.w", "self_attn.k_norm.weight")]
LAYER = [(ours, theirs, same) for ours, theirs in NORMS["pre"]] + ATTENTION + MLP  # Llama's own layer
# With any bias in the config every linear map has one; those the checkpoint lacks are zeros.
BIASES = [
    ("attn.qkv_bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), stacked),
    ("attn.b_O", "self_attn.o_proj.bias", same),
    ("mlp.b_in", "mlp.up_proj.bias", same),
    ("mlp.b_out", "mlp.down_proj.bias", same),
]


@dataclass(frozen=True)
class Layout:
    """How a rotary decoder's checkpoint stores a layer: its attention and MLP rows (none when a
    mixture of experts replaces the MLP), their bias rows, and the transform of every norm gain
    (Gemma stores `w - 1`)."""

    norm: Transform = same
    attention: Sequence[Row] = tuple(ATTENTION)
    mlp: Sequence[Row] = tuple(MLP)
    biases: Sequence[Row] = tuple(BIASES)

    def layer(self, cfg: Config) -> list[Row]:
        norms = NORMS[cfg.norm_position] + (QK_NORMS if cfg.qk_norm != "none" else [])
        return [*self.attention, *self.mlp, *((ours, theirs, self.norm) for ours, theirs in norms)]

    def weights(self, get: HFState, cfg: Config) -> dict[str, Tensor]:
        """Their tensors (prefix stripped) -> our state dict."""
        state = {
            "embed.W_E": get("embed_tokens.weight"),
            "ln_final.w": self.norm.to_ours((get("norm.weight"),), cfg),
        }
        if not cfg.tie_embeddings:
            state["unembed.weight"] = get("lm_head.weight")
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"layers.{i}."
            state |= map_rows(get, self.layer(cfg), cfg, ours, theirs)
            if cfg.bias:
                state |= map_biases(get, self.biases, cfg, ours, theirs, like=state["embed.W_E"])
        if cfg.bias:
            state["unembed.b_U"] = zeros_like_bias(cfg.d_vocab, state["embed.W_E"])
        return state

    def export(self, state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
        """Our state dict -> their tensors (unprefixed), with the biases the model really has."""
        require_zero(state, ["unembed.b_U"], "a Llama-family model")
        biases = bias_kinds(state, cfg)
        rows = [BIASES[0]] if biases["qkv_only"] else BIASES[:2] * biases["attention"] + BIASES[2:] * biases["mlp"]
        (final_norm,) = self.norm.to_theirs(state["ln_final.w"], cfg)
        out = {"embed_tokens.weight": state["embed.W_E"], "norm.weight": final_norm}
        for i in range(cfg.n_layers):
            out |= unmap_rows(state, self.layer(cfg) + rows, cfg, ours=f"blocks.{i}.", theirs=f"layers.{i}.")
        return out


def nonzero(state: dict[str, Tensor], cfg: Config, *names: str) -> bool:
    """Whether any layer has a non-zero tensor among `names` (those the model lacks count as zero)."""
    return any(
        bool(state[f"blocks.{i}.{n}"].any())
        for i in range(cfg.n_layers)
        for n in names
        if cfg.bias and f"blocks.{i}.{n}" in state
    )


def bias_kinds(state: dict[str, Tensor], cfg: Config) -> dict[str, bool]:
    """Which biases a model really uses: attention (Q/K/V/O), MLP, or Q/K/V alone (Qwen2)."""
    attention = nonzero(state, cfg, "attn.qkv_bias", "attn.b_O")
    mlp = nonzero(state, cfg, "mlp.b_in", "mlp.b_out")
    qkv_only = nonzero(state, cfg, "attn.qkv_bias") and not (mlp or nonzero(state, cfg, "attn.b_O"))
    return {"attention": attention, "mlp": mlp, "qkv_only": qkv_only}


def rotary_decoder(hf: dict[str, Any], **fields: Any) -> Config:
    """The Config fields every Llama-laid-out decoder reads the same way; `fields` add or override."""
    scaling = rope.rotary_scaling(hf)
    return Config(
        **{
            "arch": "decoder",
            **standard_sizes(hf),
            "n_ctx": rope.n_ctx(hf, scaling),
            "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
            "d_head": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            "positional": "rotary",
            "rotary_base": rope.rope_theta(hf),
            "rotary_scaling": scaling,
            "norm": "rmsnorm",
            "eps": hf["rms_norm_eps"],
            "act": "swiglu",
            "bias": bool(hf.get("attention_bias") or hf.get("mlp_bias")),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "extra": {"hf_model_type": hf["model_type"]},
            **fields,
        }
    )


def config(hf: dict[str, Any], get: HFState) -> Config:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"Llama-family hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
    # Mistral slides in every layer; Qwen2/3 (with use_sliding_window) from layer max_window_layers on.
    first_sliding = hf.get("max_window_layers", 0) if hf["model_type"] in ("qwen2", "qwen3") else 0
    qwen2 = hf["model_type"] == "qwen2"  # Q/K/V biases always
    return rotary_decoder(
        hf,
        **sliding_layers(hf, default=lambda i: i >= first_sliding),
        qk_norm="head" if hf["model_type"] == "qwen3" else "none",
        bias=qwen2 or bool(hf.get("attention_bias") or hf.get("mlp_bias")),
    )


def fit_rotary(cfg: Config, family: str, **needs: Any) -> None:
    """`fit` for a Llama-laid-out family: a plain sequential decoder with full rotate-half rotary,
    RMSNorm and SwiGLU, unless `needs` says otherwise (what the family can also hold)."""
    base = dict(PLAIN_DECODER, positional="rotary", rotary_dim=cfg.d_head, norm="rmsnorm", act="swiglu")
    fit(cfg, family, **{**base, "parallel_attn_mlp": False, **needs})


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    qk_norm = "head" if cfg.qk_norm == "head" else "none"  # Qwen3's, or none
    fit_rotary(cfg, "llama", sliding_window=cfg.sliding_window, qk_norm=qk_norm, rotary_scaling=cfg.rotary_scaling)
    biases = bias_kinds(state, cfg)
    if cfg.qk_norm == "head":  # Qwen3: q/k norms; biases on all four attention maps or none
        if biases["mlp"]:
            raise CheckpointError("cannot be written as qwen3: it has no MLP biases")
        model_type = "qwen3"
    elif biases["qkv_only"]:
        model_type = "qwen2"
    elif cfg.sliding_window is not None:  # Mistral: every layer slides, no biases
        if "full" in cfg.layer_types or biases["attention"] or biases["mlp"]:
            raise CheckpointError("cannot be written as mistral: its layers all slide and it has no biases")
        model_type = "mistral"
    else:
        mistral = cfg.extra.get("hf_model_type") == "mistral" and not biases["attention"]
        model_type = "mistral" if mistral else "llama"
    windows: dict[str, Any] = {"sliding_window": cfg.sliding_window, "use_sliding_window": bool(cfg.sliding_window)}
    if cfg.sliding_window is not None and model_type != "mistral":  # Mistral takes no layer_types (Ministral does)
        windows |= {"layer_types": hf_layer_types(cfg), "max_window_layers": cfg.layer_types.index("sliding")}
    return {
        **hf_body(cfg, model_type),
        "hidden_act": "silu",
        "attention_bias": biases["attention"] or biases["qkv_only"],
        "mlp_bias": biases["mlp"],
        **windows,
    }


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def hf_body(cfg: Config, model_type: str) -> dict[str, Any]:
    """The config entries every Llama-laid-out decoder writes the same way."""
    return {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "rms_norm_eps": cfg.eps,
        "vocab_size": cfg.d_vocab,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope.hf_rope(cfg),
        "attention_dropout": cfg.dropout,
    }


def family(config: Callable[[dict[str, Any], HFState], Config], hf_config: Callable, layout: Layout) -> Family:
    """A Llama-laid-out family from its config mapping, its way back, and its layer layout."""
    return Family(config, layout.weights, prefixes=("model.",), export=layout.export, hf_config=hf_config)


FAMILY = family(config, hf_config, Layout())

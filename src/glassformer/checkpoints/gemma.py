"""Gemma family (`gemma`, `gemma2`, `gemma3_text`), laid out as Llama with its own norms and scales.

Gemma 1: GeGLU (tanh GELU gate), embeddings × √d_model, RMSNorm gains stored as `w - 1` (the model
multiplies by `1 + w`: converted once, so `ln1.w` is the gain the model really applies). Gemma 2 adds
a norm after attention and after the MLP (the sandwich), the `query_pre_attn_scalar` scale,
attention and final-logit soft-capping, and alternating sliding-window layers. Gemma 3 adds q/k
norms and a rotary base of its own for the sliding layers (five of them to one global layer).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from glassformer.checkpoints import rope
from glassformer.checkpoints.llama import Layout, bias_kinds, family, fit_rotary, hf_body, rotary_decoder
from glassformer.checkpoints.tables import HFState, Transform, activation, hf_layer_types, sliding_layers
from glassformer.config import Config
from glassformer.errors import CheckpointError

plus_one = Transform(lambda ts, cfg: ts[0] + 1, lambda t, cfg: (t - 1,))  # Gemma's gain w -> 1 + w

# Sliding layers by default, when a config has no layer_types: Gemma 2 alternates (from the first),
# Gemma 3 makes every sixth layer global.
PATTERNS = {"gemma2": lambda i: (i + 1) % 2 != 0, "gemma3_text": lambda i: (i + 1) % 6 != 0}


def rotary_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """Rotary base and scaling of the global layers and, for Gemma 3, the sliding layers' own base
    (unscaled). transformers 5 keeps one set of rotary parameters per layer type; older configs
    `rope_theta`, `rope_scaling` and `rope_local_base_freq`."""
    params = hf.get("rope_parameters") or {}
    full, local = None, {}
    if "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    view = hf if full is None else {**hf, "rope_parameters": full}
    scaling = rope.rotary_scaling(view)
    settings = {"rotary_base": rope.rope_theta(view), "rotary_scaling": scaling, "n_ctx": rope.n_ctx(hf, scaling)}
    if hf["model_type"] == "gemma3_text":
        settings["rotary_base_local"] = float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))
    return settings


def config(hf: dict[str, Any], get: HFState) -> Config:
    model_type = hf["model_type"]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation("gelu_pytorch_tanh" if act == "gelu" else act) != "gelu_new":  # Gemma's legacy "gelu" is tanh
        raise CheckpointError(f"Gemma activation {act!r} is not supported (expected the tanh GELU)")
    later = model_type != "gemma"  # Gemma 2 and 3
    scalar = hf.get("query_pre_attn_scalar")
    return rotary_decoder(
        hf,
        **rotary_settings(hf),
        **(sliding_layers(hf, default=PATTERNS[model_type]) if later else {}),
        act="geglu",
        embed_scale=hf["hidden_size"] ** 0.5,
        norm_position="sandwich" if later else "pre",
        qk_norm="head" if model_type == "gemma3_text" else "none",
        attn_scale=scalar**-0.5 if later and scalar is not None else None,
        attn_softcap=hf.get("attn_logit_softcapping") if later else None,
        final_softcap=hf.get("final_logit_softcapping") if later else None,
        bias=bool(hf.get("attention_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def version(cfg: Config) -> str:
    """Which Gemma can hold the config: q/k norms need Gemma 3, the sandwich Gemma 2."""
    if cfg.qk_norm == "head":
        return "gemma3_text"
    return "gemma2" if cfg.norm_position == "sandwich" else "gemma"


def hf_config(cfg: Config, state: dict[str, Tensor]) -> dict[str, Any]:
    model_type = version(cfg)
    later = model_type != "gemma"
    holds: dict[str, Any] = {"norm_position": "sandwich" if later else "pre", "embed_scale": cfg.d_model**0.5}
    if later:  # what Gemma 2/3 can hold, whatever it is
        holds |= dict(sliding_window=cfg.sliding_window, attn_scale=cfg.attn_scale, attn_softcap=cfg.attn_softcap)
        holds |= dict(final_softcap=cfg.final_softcap, rotary_base_local=cfg.rotary_base_local, qk_norm=cfg.qk_norm)
    fit_rotary(cfg, model_type, **holds, rotary_scaling=cfg.rotary_scaling, act="geglu")
    if model_type == "gemma3_text" and cfg.attn_softcap is not None:
        raise CheckpointError("cannot be written as gemma3_text: it has no attention soft-capping")
    biases = bias_kinds(state, cfg)
    if biases["mlp"] or biases["qkv_only"]:
        raise CheckpointError(f"cannot be written as {model_type}: its biases are on all four attention maps or none")
    out = {**hf_body(cfg, model_type), "hidden_activation": "gelu_pytorch_tanh", "attention_bias": biases["attention"]}
    if model_type == "gemma":
        return out | {"hidden_act": "gelu_pytorch_tanh"}
    scalar = (cfg.attn_scale if cfg.attn_scale is not None else cfg.d_head**-0.5) ** -2
    if abs(scalar - round(scalar)) > 1e-6 * scalar:  # transformers takes an integer
        raise CheckpointError(f"cannot be written as {model_type}: attn_scale={cfg.attn_scale} is not 1/√(an integer)")
    out |= {
        "query_pre_attn_scalar": round(scalar),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_softcap,
        "sliding_window": cfg.sliding_window,
        "layer_types": hf_layer_types(cfg),
    }
    if model_type == "gemma3_text":
        local = cfg.rotary_base if cfg.rotary_base_local is None else cfg.rotary_base_local
        out["rope_parameters"] = {
            "full_attention": out["rope_parameters"],
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    return out


FAMILY = family(config, hf_config, Layout(norm=plus_one))

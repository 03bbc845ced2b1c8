"""Rotary scaling in GGUF files <-> the Hugging Face `rope_scaling` our family tables read.

llama.cpp keeps linear and YaRN scaling as `{arch}.rope.scaling.*` metadata, and Llama 3's as the
tensor `rope_freqs.weight`: one divisor per frequency (convert_hf_to_gguf.py). Read back, that tensor
is LongRoPE with equal short and long factors and no attention factor, which computes the same angles.
Phi-3's LongRoPE is two tensors, `rope_factors_long.weight` and `rope_factors_short.weight` (float32,
rotary_dim/2 each), beside `{arch}.rope.scaling.attn_factor` and `.original_context_length` (llama.cpp's
Phi3MiniModel); an attention factor equal to the one computed from the contexts is left implicit on reading.
Dynamic NTK (which llama.cpp lacks), and LongRoPE with two sets of factors outside such an architecture,
are not written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from glassformer.cells.rotary_scaling import frequencies, inverse_frequencies, longrope_attention
from glassformer.config import Config
from glassformer.errors import CheckpointError

FREQS = "rope_freqs.weight"
FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
ROPE_TENSORS = (FREQS, *FACTORS.values())  # the file's tensors that are rotary scaling, not weights
YARN_BETAS = {"yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


def rope_scaling(meta: Mapping[str, Any], prefix: str, name: str) -> dict[str, Any] | None:
    """The Hugging Face rope_scaling of the file's `{arch}.rope.scaling.*` keys (None: no scaling)."""
    kind = meta.get(prefix + "rope.scaling.type", "none")
    if kind in ("none", "", None):
        return None
    if kind not in ("linear", "yarn"):
        raise CheckpointError(f"{name}: rotary scaling {kind!r} is not supported in GGUF files (linear, yarn are)")
    scaling = {"rope_type": kind, "factor": float(meta[prefix + "rope.scaling.factor"])}
    if kind == "yarn":
        if (
            meta.get(prefix + "rope.scaling.attn_factor", 1.0) != 1.0
            or prefix + "rope.scaling.yarn_log_multiplier" in meta
        ):
            raise CheckpointError(f"{name}: YaRN with an attention factor of llama.cpp's own is not supported")
        scaling["original_max_position_embeddings"] = int(meta[prefix + "rope.scaling.original_context_length"])
        scaling |= {
            ours: float(meta[prefix + f"rope.scaling.{key}"])
            for key, ours in YARN_BETAS.items()
            if prefix + f"rope.scaling.{key}" in meta
        }
    return scaling


def tensor_scaling(
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str, n_ctx: int, name: str
) -> dict[str, Any]:
    """The Hugging Face rope_scaling of the file's ROPE_TENSORS (each (rotary_dim/2,), at least one)."""
    if set(tensors) == {FREQS}:
        return frequency_divisors(tensors[FREQS], n_ctx)
    if set(tensors) != set(FACTORS.values()):
        found, expected = ", ".join(sorted(tensors)), " and ".join(FACTORS.values())
        raise CheckpointError(f"{name}: rotary scaling tensors {found}: not {FREQS}, nor {expected}")
    return longrope_factors(tensors, meta, prefix, n_ctx)


def frequency_divisors(divisors: Tensor, n_ctx: int) -> dict[str, Any]:
    """`rope_freqs.weight` as a Hugging Face rope_scaling: LongRoPE with those factors throughout."""
    factors = [float(f) for f in divisors.flatten()]
    return {
        "rope_type": "longrope",
        "short_factor": factors,
        "long_factor": factors,
        "original_max_position_embeddings": n_ctx,
        "attention_factor": 1.0,
    }


def longrope_factors(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str, n_ctx: int) -> dict[str, Any]:
    """Phi-3's two factor tensors and their metadata as a Hugging Face LongRoPE rope_scaling."""
    original = int(meta.get(prefix + "rope.scaling.original_context_length", n_ctx))
    ours = {k: [float(f) for f in tensors[t].flatten()] for k, t in FACTORS.items()}
    scaling = {"rope_type": "longrope", **ours, "original_max_position_embeddings": original}
    stored = meta.get(prefix + "rope.scaling.attn_factor")
    implied = longrope_attention({"original_n_ctx": original}, n_ctx)
    if stored is not None and np.float32(stored) != np.float32(implied):  # the file keeps float32
        scaling["attention_factor"] = float(stored)
    return scaling


def gguf_rope_scaling(cfg: Config, factor_tensors: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """cfg.rotary_scaling as llama.cpp keeps it: metadata (keys after "{arch}.") and tensors to add;
    `factor_tensors` where the architecture reads LongRoPE as FACTORS (Phi-3)."""
    scaling = cfg.rotary_scaling
    if scaling is None or scaling["type"] == "default":
        return {}, {}
    kind = scaling["type"]
    if kind == "longrope" and factor_tensors:
        meta = {
            "rope.scaling.attn_factor": longrope_attention(scaling, cfg.n_ctx),
            "rope.scaling.original_context_length": int(scaling["original_n_ctx"]),
        }
        return meta, {t: np.asarray(scaling[k], dtype=np.float32) for k, t in FACTORS.items()}  # (rotary_dim/2,)
    if kind == "linear":
        return {"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling["factor"])}, {}
    if kind == "yarn":
        if {"attention_factor", "mscale", "mscale_all_dim"} & set(scaling) or not scaling.get("truncate", True):
            raise CheckpointError("YaRN with its own attention factor or truncate=False has no GGUF form")
        meta = {
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": float(scaling["factor"]),
            "rope.scaling.original_context_length": int(scaling["original_n_ctx"]),
        }
        return meta | {
            f"rope.scaling.{k}": float(scaling[ours]) for k, ours in YARN_BETAS.items() if ours in scaling
        }, {}
    one_set = kind == "longrope" and scaling["short_factor"] == scaling["long_factor"]
    if kind == "llama3" or (one_set and scaling.get("attention_factor") == 1.0):
        scaled, _ = frequencies(cfg.rotary_base, cfg.rotary_dim, scaling, cfg.n_ctx)  # (rotary_dim/2,)
        divisors = inverse_frequencies(cfg.rotary_base, cfg.rotary_dim) / scaled
        return {}, {FREQS: divisors.float().numpy()}
    raise CheckpointError(f"rotary scaling {kind!r} has no GGUF form (llama.cpp has linear, yarn and llama3's)")

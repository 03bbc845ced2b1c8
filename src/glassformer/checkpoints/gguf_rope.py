"""Rotary scaling in GGUF files <-> the Hugging Face `rope_scaling` our family tables read.

llama.cpp keeps linear and YaRN scaling as `{arch}.rope.scaling.*` metadata, and Llama 3's as the
tensor `rope_freqs.weight`: one divisor per frequency (convert_hf_to_gguf.py). Read back, that tensor
is LongRoPE with equal short and long factors and no attention factor, which computes the same angles.
Dynamic NTK (which llama.cpp lacks) and LongRoPE with two sets of factors are not written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from glassformer.cells.rotary_scaling import frequencies, inverse_frequencies
from glassformer.config import Config
from glassformer.errors import CheckpointError

FREQS = "rope_freqs.weight"
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


def gguf_rope_scaling(cfg: Config) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """cfg.rotary_scaling as llama.cpp keeps it: metadata (keys after "{arch}.") and tensors to add."""
    scaling = cfg.rotary_scaling
    if scaling is None or scaling["type"] == "default":
        return {}, {}
    kind = scaling["type"]
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

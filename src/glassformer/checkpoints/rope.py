"""Rotary settings of a Hugging Face config <-> `Config.rotary_base`, `rotary_scaling` and `n_ctx`, for
every family with rotary positions. transformers 5 keeps them in `rope_parameters`; older configs in
`rope_scaling` (`type` for `rope_type`) beside a top-level `rope_theta`.

Our scaling dicts use transformers' key names, except `original_n_ctx` for
`original_max_position_embeddings`. Dynamic NTK differs in one way: transformers' max_position_embeddings
is then the pre-training context the model runs past, so ours is `factor` times it.
"""

from __future__ import annotations

from typing import Any

from glassformer.config import ROTARY_SCALINGS, Config
from glassformer.errors import CheckpointError

ORIGINAL = "original_max_position_embeddings"


def parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The config's rotary dict, whichever transformers version wrote it."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def rope_theta(hf: dict[str, Any]) -> float:
    return float(parameters(hf).get("rope_theta", hf.get("rope_theta", 10000.0)))


def rotary_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    """Our `rotary_scaling` for the config's rope type (None for "default"); a CheckpointError names an
    unsupported type."""
    rope = parameters(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROTARY_SCALINGS:
        supported = ", ".join(k for k in ROTARY_SCALINGS if k != "default")
        raise CheckpointError(f"rotary scaling {kind!r} is not supported; supported: {supported}")
    required, optional = ROTARY_SCALINGS[kind]
    scaling = {"type": kind} | {k: rope[k] for k in sorted(required | optional) if rope.get(k) is not None}
    if kind == "dynamic":  # transformers scales past max_position_embeddings
        scaling["original_n_ctx"] = hf["max_position_embeddings"]
    elif "original_n_ctx" in required:  # a top-level value wins, as in transformers (Phi-3 keeps it there)
        scaling["original_n_ctx"] = hf.get(ORIGINAL) or rope.get(ORIGINAL) or hf["max_position_embeddings"]
    if kind == "yarn" and "factor" not in scaling:  # transformers: the ratio of the two contexts
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_n_ctx"]
    return scaling


def n_ctx(hf: dict[str, Any], scaling: dict[str, Any] | None) -> int:
    """Our context: max_position_embeddings, or factor times it under dynamic NTK scaling."""
    if scaling is not None and scaling["type"] == "dynamic":
        return int(hf["max_position_embeddings"] * scaling["factor"])
    return hf["max_position_embeddings"]


def hf_rope(cfg: Config) -> dict[str, Any]:
    """`rope_theta`, `rope_parameters` and `max_position_embeddings` of a transformers config."""
    scaling = cfg.rotary_scaling or {"type": "default"}
    rope = {"rope_type": scaling["type"], "rope_theta": cfg.rotary_base}
    rope |= {ORIGINAL if k == "original_n_ctx" else k: v for k, v in scaling.items() if k != "type"}
    max_positions = rope.pop(ORIGINAL) if scaling["type"] == "dynamic" else cfg.n_ctx
    return {"rope_theta": cfg.rotary_base, "rope_parameters": rope, "max_position_embeddings": max_positions}

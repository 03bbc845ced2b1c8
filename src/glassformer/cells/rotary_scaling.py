"""Rotary scaling variants: the frequencies that stretch a model's rotary positions past the context it
was pre-trained with (`original_n_ctx`), and the factor some of them multiply cos and sin by.

`scaling` is a `Config.rotary_scaling` dict (validated there); the formulas are those of transformers'
`modeling_rope_utils` (linear, dynamic NTK, YaRN, Llama 3, LongRoPE), computed in float64 for the
tables built once, and in float32 for dynamic NTK, whose frequencies follow each call's length.
Legend: half = rotary_dim / 2, one frequency per rotated pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Scaling = dict[str, Any]
TABLES = dict(dtype=torch.float64, device="cpu")  # fixed tables: float64 on the CPU, moved with the model


def inverse_frequencies(base: float, rotary_dim: int) -> Tensor:
    """Unscaled rotary frequencies base^(-2i / rotary_dim), (half,) float64."""
    return base ** -(torch.arange(0, rotary_dim, 2, **TABLES) / rotary_dim)


def linear(inv_freq: Tensor, base: float, scaling: Scaling, n_ctx: int) -> tuple[Tensor, float]:
    """Position interpolation: every position divided by `factor`."""
    return inv_freq / scaling["factor"], 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn(inv_freq: Tensor, base: float, scaling: Scaling, n_ctx: int) -> tuple[Tensor, float]:
    """YaRN: high frequencies kept, low ones interpolated by `factor`, a linear ramp between (by how
    many turns each makes over original_n_ctx); cos and sin scaled by the attention factor."""
    factor, original, dim = scaling["factor"], scaling["original_n_ctx"], 2 * len(inv_freq)
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        both = mscale and mscale_all_dim
        attention = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if both else _yarn_mscale(factor)
        )

    def dim_of(turns: float) -> float:  # the dimension whose frequency makes `turns` turns over original_n_ctx
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling.get("beta_fast", 32)), dim_of(scaling.get("beta_slow", 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, **TABLES) - low) / (high - low)).clamp(0, 1)  # (half,) 0: keep, 1: interpolate
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention)


def llama3(inv_freq: Tensor, base: float, scaling: Scaling, n_ctx: int) -> tuple[Tensor, float]:
    """Llama 3.1: wavelengths past original_n_ctx / low_freq_factor divided by `factor`, those under
    original_n_ctx / high_freq_factor kept, a smooth blend between."""
    factor, low, high, original = (
        scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_n_ctx")
    )
    wavelength = 2 * math.pi / inv_freq  # (half,)
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, blended, scaled), 1.0


def longrope(
    inv_freq: Tensor, base: float, scaling: Scaling, n_ctx: int, which: str = "short_factor"
) -> tuple[Tensor, float]:
    """LongRoPE (Phi-3): each frequency divided by its own factor, `short_factor` up to original_n_ctx
    and `long_factor` past it; cos and sin scaled by sqrt(1 + log(factor) / log(original_n_ctx))."""
    return inv_freq / torch.tensor(scaling[which], **TABLES), longrope_attention(scaling, n_ctx)


def longrope_attention(scaling: Scaling, n_ctx: int) -> float:
    """LongRoPE's cos/sin factor: `attention_factor`, else sqrt(1 + log(factor) / log(original_n_ctx)) with
    factor n_ctx / original_n_ctx unless given (1 when not above 1)."""
    original = scaling["original_n_ctx"]
    factor = scaling.get("factor") or n_ctx / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return float(attention)


FIXED: dict[str, Callable[[Tensor, float, Scaling, int], tuple[Tensor, float]]] = {
    "default": lambda inv_freq, base, scaling, n_ctx: (inv_freq, 1.0),
    "linear": linear,
    "yarn": yarn,
    "llama3": llama3,
    "longrope": longrope,  # its short factors; Rotary adds the long ones
}


def frequencies(base: float, rotary_dim: int, scaling: Scaling, n_ctx: int) -> tuple[Tensor, float]:
    """(inverse frequencies (half,) float64, cos/sin factor) of a variant whose frequencies are fixed."""
    return FIXED[scaling["type"]](inverse_frequencies(base, rotary_dim), base, scaling, n_ctx)


def dynamic_frequencies(base: float, rotary_dim: int, scaling: Scaling, seq_len: Tensor) -> Tensor:
    """Dynamic NTK: past original_n_ctx the base grows with the length seq_len (a 0-dim tensor, so no
    host sync) as base * (factor * seq_len / original_n_ctx - factor + 1)^(d / (d - 2)); (half,) float32,
    the same float32 steps as transformers."""
    factor, original = scaling["factor"], scaling["original_n_ctx"]
    seq_len = seq_len.clamp(min=original)
    grown = base * ((factor * seq_len / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=seq_len.device).float() / rotary_dim
    return 1.0 / (grown**exponents)

"""Cell 2, positional encoding: a table added to the embedding (sinusoidal or learned), or rotary
angles applied to q and k inside attention.

Legend: batch, pos, n_heads, d_head, d_model; rotary_dim = the rotated part of each head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.cells.rotary_scaling import TABLES, dynamic_frequencies, frequencies, inverse_frequencies, longrope
from glassformer.config import Config, check_rotary_scaling

# Fixed tables (TABLES: float64 on the CPU) are built on the CPU even inside `with torch.device("meta")`
# (how checkpoints load): they are computed, never stored, so they must be real. `model.to(device)` moves them.


def sinusoid_table(n_ctx: int, d_model: int) -> Tensor:
    """The fixed table of 'Attention Is All You Need': sin on even dims, cos on odd dims."""
    pos = torch.arange(n_ctx, **TABLES)[:, None]  # (n_ctx, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, **TABLES) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_ctx, d_model, **TABLES)  # (n_ctx, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table.float()


class PosEmbed(nn.Module):
    """Absolute positions: W_pos is a learned parameter, or the sinusoidal table built once."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        else:
            self.register_buffer("W_pos", sinusoid_table(cfg.n_ctx, cfg.d_model), persistent=False)

    def forward(self, positions: Tensor | None, batch: int, n_pos: int) -> Tensor:
        if positions is None:
            return self.W_pos[:n_pos].expand(batch, n_pos, -1)  # (batch, pos, d_model), a view
        return F.embedding(positions, self.W_pos)  # (batch, pos, d_model)


def spread(angles: Tensor, interleaved: bool) -> Tensor:
    """One angle per rotated pair (..., rotary_dim/2) -> per dimension (..., rotary_dim): pairs (2i, 2i+1)
    when interleaved, else (i, i + rotary_dim/2)."""
    return angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)


def signs(rotary_dim: int, interleaved: bool) -> Tensor:
    """(rotary_dim,) the sign each dimension's sin takes in a rotation: -1 for the first member of a
    pair, +1 for the second (the rotated pair is `(x₁ cos − x₂ sin, x₂ cos + x₁ sin)`)."""
    pair = torch.tensor([-1.0, 1.0], **TABLES)
    return pair.repeat(rotary_dim // 2) if interleaved else pair.repeat_interleave(rotary_dim // 2)


def lookup(cos: Tensor, sin: Tensor, n_pos: int, positions: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rows of (n_ctx, rotary_dim) tables: (pos, 1, rotary_dim), or (batch, pos, 1, rotary_dim) at positions."""
    if positions is None:
        return cos[:n_pos, None], sin[:n_pos, None]
    return cos[positions][:, :, None], sin[positions][:, :, None]


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer): the rotate-half layout of GPT-NeoX and Llama, or pairs of
    neighbours (GPT-J, `cfg.rotary_interleaved`), with the scaling variants of cells/rotary_scaling.py.

    One instance is shared by every attention layer. Its cos/sin tables are built once, except under
    dynamic NTK scaling, whose frequencies follow the length of each call (as in transformers).
    `base` and `scaling` override cfg.rotary_base and cfg.rotary_scaling (None: take the config's);
    `scaling={"type": "default"}` is no scaling.
    """

    def __init__(self, cfg: Config, base: float | None = None, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if scaling is not None:
            check_rotary_scaling(scaling, cfg.rotary_dim, name="Rotary(scaling=...)")
        self.base = cfg.rotary_base if base is None else base
        self.scaling = scaling or cfg.rotary_scaling or {"type": "default"}
        self.rotary_dim, self.interleaved, self.kind = cfg.rotary_dim, cfg.rotary_interleaved, self.scaling["type"]
        self._step: tuple[Tensor, int, Tensor, Tensor] | None = None  # step_angles' last positions and result
        if self.kind == "dynamic":
            return  # no tables: the frequencies depend on each call's length
        inv_freq, factor = frequencies(self.base, cfg.rotary_dim, self.scaling, cfg.n_ctx)  # (rotary_dim/2,)
        self.original = self.scaling.get("original_n_ctx", cfg.n_ctx)
        self.add_tables("", inv_freq, factor, self.original if self.kind == "longrope" else cfg.n_ctx)
        if self.kind == "longrope":  # the short factors above serve up to original_n_ctx, the long ones past it
            inv_freq, factor = longrope(
                inverse_frequencies(self.base, cfg.rotary_dim), self.base, self.scaling, cfg.n_ctx, "long_factor"
            )
            self.add_tables("long_", inv_freq, factor, cfg.n_ctx)

    def add_tables(self, prefix: str, inv_freq: Tensor, factor: float, n_ctx: int) -> None:
        """Non-persistent `cos`/`signed_sin` buffers (n_ctx, rotary_dim), times the variant's cos/sin
        factor; `signed_sin` carries each dimension's sign in the rotation (`signs`)."""
        angles = spread(torch.outer(torch.arange(n_ctx, **TABLES), inv_freq), self.interleaved)  # (n_ctx, rotary_dim)
        self.register_buffer(prefix + "cos", (angles.cos() * factor).float(), persistent=False)
        signed_sin = angles.sin() * factor * signs(self.rotary_dim, self.interleaved)
        self.register_buffer(prefix + "signed_sin", signed_sin.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        """Rotate the first rotary_dim dims of each head of x (batch, pos, heads, d_head) by position."""
        return self.turn(x, *self.cos_sin(x, positions))

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """q and k of the same positions rotated, the angles looked up once for both."""
        cos, signed_sin = self.cos_sin(q, positions)  # (pos, 1, rotary_dim) or (batch, pos, 1, rotary_dim)
        return self.turn(q, cos, signed_sin), self.turn(k, cos, signed_sin)

    def turn(self, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        """`rot · cos + swap(rot) · sin`, swap exchanging the two members of each rotated pair (the sign
        of the rotation is in the sin table: `(-x₂, x₁)` per pair)."""
        if x.shape[-1] > self.rotary_dim:  # partial rotary: the rest of each head passes unchanged
            rot, rest = x.split([self.rotary_dim, x.shape[-1] - self.rotary_dim], dim=-1)
            return torch.cat([self.turn(rot, cos, signed_sin), rest], dim=-1)
        if self.interleaved:
            swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (batch, pos, heads, rotary_dim)
        else:
            swapped = x.roll(self.rotary_dim // 2, dims=-1)  # (batch, pos, heads, rotary_dim): second half first
        return torch.addcmul(x * cos, swapped, signed_sin)  # (batch, pos, heads, rotary_dim)

    def step_angles(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """`cos_sin` as contiguous tensors, looked up once for all the layers of a decoding step (they
        share this module and the step's `positions` tensor)."""
        last = self._step
        if last is None or last[0] is not positions or last[1] != positions._version:
            cos, sin = self.cos_sin(x, positions)
            last = self._step = (positions, positions._version, cos.contiguous(), sin.contiguous())
        return last[2], last[3]

    def cos_sin(self, x: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """cos and signed sin for x's positions (0..pos-1 when positions is None)."""
        n_pos = x.shape[1]
        if self.kind == "dynamic":
            return self.dynamic_cos_sin(x, n_pos, positions)
        if self.kind != "longrope":
            return lookup(self.cos, self.signed_sin, n_pos, positions)
        if positions is None:  # the long factors once the sequence is longer than original_n_ctx
            return (
                lookup(self.long_cos, self.long_signed_sin, n_pos, None)
                if n_pos > self.original
                else lookup(self.cos, self.signed_sin, n_pos, None)
            )
        long = positions.max() + 1 > self.original  # a 0-dim bool tensor: no host sync
        short_cos, short_sin = lookup(self.cos, self.signed_sin, n_pos, positions.clamp(max=self.original - 1))
        long_cos, long_sin = lookup(self.long_cos, self.long_signed_sin, n_pos, positions)
        return torch.where(long, long_cos, short_cos), torch.where(long, long_sin, short_sin)

    def dynamic_cos_sin(self, x: Tensor, n_pos: int, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """Dynamic NTK: frequencies for the length max(positions) + 1, in float32 as transformers does."""
        positions = torch.arange(n_pos, device=x.device) if positions is None else positions  # (pos) or (batch, pos)
        inv_freq = dynamic_frequencies(self.base, self.rotary_dim, self.scaling, positions.max() + 1)  # (rotary_dim/2,)
        angles = spread(positions[..., None].float() * inv_freq, self.interleaved)[
            ..., None, :
        ]  # (…, pos, 1, rotary_dim)
        signed_sin = angles.sin() * signs(self.rotary_dim, self.interleaved).to(angles)
        return angles.cos().to(x.dtype), signed_sin.to(x.dtype)

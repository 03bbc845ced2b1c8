"""Cell 2, positional encoding: a table added to the embedding (sinusoidal or learned), or rotary
angles applied to q and k inside attention.

Legend: batch, pos, n_heads, d_head, d_model; rotary_dim = the rotated part of each head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.config import Config

# Fixed tables are built on the CPU even inside `with torch.device("meta")` (how checkpoints load):
# they are computed, never stored, so they must be real. `model.to(device)` moves them.
TABLES = dict(dtype=torch.float64, device="cpu")


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


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer; the rotate-half layout of GPT-NeoX and Llama).

    One instance is shared by every attention layer; its cos/sin tables are built once.
    """

    def __init__(self, cfg: Config, base: float | None = None) -> None:
        """`base` overrides `cfg.rotary_base` (Gemma 3's sliding-window layers have their own)."""
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        half = torch.arange(0, cfg.rotary_dim, 2, **TABLES) / cfg.rotary_dim
        inv_freq = (cfg.rotary_base if base is None else base) ** -half  # (rotary_dim / 2,)
        angles = torch.outer(torch.arange(cfg.n_ctx, **TABLES), inv_freq)  # (n_ctx, rotary_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n_ctx, rotary_dim)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        """Rotate the first rotary_dim dims of each head of x (batch, pos, heads, d_head) by position."""
        n_pos = x.shape[1]
        if positions is None:
            cos, sin = self.cos[:n_pos, None], self.sin[:n_pos, None]  # (pos, 1, rotary_dim)
        else:
            cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (batch, pos, 1, rotary_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        first, second = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin  # (batch, pos, heads, rotary_dim)
        return rotated if rest.shape[-1] == 0 else torch.cat([rotated, rest], dim=-1)

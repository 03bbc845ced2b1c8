"""Cell 2 for T5: relative position bias. Each (query, key) distance falls in one of `num_buckets`
buckets (exact for small distances, logarithmically wider up to `max_distance`, one bucket past it;
separate buckets for keys before and after the query when attention is bidirectional), and each
bucket has a learned score per head that is added to the attention scores.

One table per stack, computed once per forward and shared by every self-attention layer of the
stack, as T5 does. Legend: n_heads, pos (queries), k_pos (keys).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from glassformer.config import Config
from glassformer.hooks import HookPoint


def bucket(relative: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each `relative = key - query` distance (an integer tensor, any shape)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets  # keys after the query: the upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # only keys at or before the query count
    exact = num_buckets // 2
    # The other half of the buckets: logarithmically wider bins, up to max_distance.
    scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    wide = (exact + scaled.long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, wide)


class RelativePositionBias(nn.Module):
    """`W_rel (num_buckets, n_heads)`: a learned score per distance bucket and head."""

    def __init__(self, cfg: Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.W_rel = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))
        self.hook_position_bias = HookPoint()  # (1, n_heads, pos, k_pos)

    def forward(self, q_idx: Tensor, k_len: int) -> Tensor:
        """The bias of queries at slots `q_idx (pos,)` against keys at slots 0..k_len-1."""
        relative = torch.arange(k_len, device=q_idx.device)[None, :] - q_idx[:, None]  # (pos, k_pos)
        buckets = bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = self.W_rel[buckets].permute(2, 0, 1)[None]  # (1, n_heads, pos, k_pos)
        return self.hook_position_bias(bias)

"""Relative position bias (T5): a learned bias per head for each bucket of key − query distance,
added to the attention scores in place of position embeddings.

Near distances get a bucket each, farther ones share logarithmically wider buckets up to
`relative_max_distance`, beyond which all fall in the last. An encoder (bidirectional) splits the
buckets between keys before and after the query; a decoder (causal) uses them all for keys before.
The bias is computed once per stack and forward pass, and every layer of the stack adds it.
Legend: n_heads, pos (queries), k_pos (keys), n_buckets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.config import Config


def relative_bucket(distance: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """The bucket in [0, n_buckets) of each `distance` (key position − query position, int64)."""
    if bidirectional:
        n_buckets //= 2
        offset = (distance > 0).long() * n_buckets  # keys after the query: the upper half of the buckets
        distance = distance.abs()
    else:
        offset = torch.zeros_like(distance)
        distance = (-distance).clamp(min=0)  # how far back the key is; keys ahead are masked anyway
    exact = n_buckets // 2  # distances below this have a bucket each
    # Then log-spaced bins: `exact` at distance `exact`, n_buckets at max_distance (clamped to the last).
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Bucketed distance -> a learned `(n_buckets, n_heads)` table row -> the scores' additive bias."""

    def __init__(self, cfg: Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.W_rel = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))

    def forward(self, q_slots: Tensor, k_len: int) -> Tensor:
        """Bias `(1, n_heads, pos, k_pos)` for queries at positions `q_slots (pos,)` against keys 0 … k_len − 1."""
        keys = torch.arange(k_len, device=q_slots.device)
        distance = keys[None, :] - q_slots[:, None]  # (pos, k_pos)
        buckets = relative_bucket(distance, self.bidirectional, self.n_buckets, self.max_distance)  # (pos, k_pos)
        return F.embedding(buckets, self.W_rel).permute(2, 0, 1)[None]  # (1, n_heads, pos, k_pos)

"""Token embedding (a row lookup in W_E) and the output head (`x @ W_U + b_U`).

Legend: batch, pos, d_model, d_vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.cells.views import WeightView
from glassformer.config import Config


class Embed(nn.Module):
    """Cell 1: token id -> row of W_E."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.W_E)  # (batch, pos, d_model)


class Unembed(nn.Module):
    """Cell 11: residual -> logits. With tied embeddings it reads W_E (W_U is then W_E.T)."""

    def __init__(self, cfg: Config, embed: Embed) -> None:
        super().__init__()
        # Stored (d_vocab, d_model) so F.linear runs the head; W_U is the (d_model, d_vocab) view.
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.b_U = nn.Parameter(torch.empty(cfg.d_vocab)) if cfg.bias else None
        self._tied = [embed]  # in a list, so the shared embedding is not registered twice

    def _weight(self) -> Tensor:
        return self._tied[0].W_E if self.weight is None else self.weight

    @WeightView
    def W_U(self) -> Tensor:
        """(d_model, d_vocab)"""
        return self._weight().T

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._weight(), self.b_U)  # (batch, pos, d_vocab)

"""Token embedding (a row lookup in W_E), segment embedding, and the heads: the output head
(`x @ W_U + b_U`, optionally after BERT's dense+act+norm transform) and BERT's pooler.

Legend: batch, pos, d_model, d_vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.cells.mlp import ACTIVATIONS
from glassformer.cells.norm import Norm
from glassformer.cells.views import WeightView
from glassformer.config import Config
from glassformer.hooks import HookPoint
from glassformer.linear import linear


class Embed(nn.Module):
    """Cell 1: token id -> row of W_E."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.scale = cfg.embed_scale

    def forward(self, tokens: Tensor) -> Tensor:
        embedded = F.embedding(tokens, self.W_E)  # (batch, pos, d_model)
        return embedded if self.scale == 1.0 else embedded * self.scale


class TokenTypeEmbed(nn.Module):
    """Segment embedding (BERT's sentence A / sentence B): a row of W_token_type per position."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.W_token_type = nn.Parameter(torch.empty(cfg.n_token_types, cfg.d_model))

    def forward(self, token_type_ids: Tensor | None, tokens: Tensor) -> Tensor:
        if token_type_ids is None:  # as in Hugging Face: every token is of type 0
            return self.W_token_type[0].expand(*tokens.shape, -1)  # (batch, pos, d_model)
        return F.embedding(token_type_ids, self.W_token_type)  # (batch, pos, d_model)


class Unembed(nn.Module):
    """Cell 11: residual -> logits. With tied embeddings it reads W_E (W_U is then W_E.T); the
    residual is first multiplied by `unembed_scale` (T5: d_model**-0.5); with `final_softcap` the
    logits are squashed into (-cap, cap) by cap·tanh(logits / cap)."""

    def __init__(self, cfg: Config, embed: Embed) -> None:
        super().__init__()
        # Stored (d_vocab, d_model) so linear() runs the head; W_U is the (d_model, d_vocab) view.
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.b_U = nn.Parameter(torch.empty(cfg.d_vocab)) if cfg.bias else None
        self._tied = [embed]  # in a list, so the shared embedding is not registered twice
        if cfg.head_transform:  # BERT's MLM head: x -> norm(act(x @ W + b)) before the unembedding
            self.transform_weight = nn.Parameter(torch.empty(cfg.d_model, cfg.d_model))
            self.b_transform = nn.Parameter(torch.empty(cfg.d_model))
            self.act = ACTIVATIONS[cfg.act]
            self.ln_transform = Norm(cfg)
            self.hook_transformed = HookPoint()  # (batch, pos, d_model)
        self.head_transform = cfg.head_transform
        self.scale = cfg.unembed_scale
        self.softcap = cfg.final_softcap
        if self.softcap is not None:
            self.hook_logits_uncapped = HookPoint()  # (batch, pos, d_vocab), before cap·tanh(logits/cap)

    def _weight(self) -> Tensor:
        return self._tied[0].W_E if self.weight is None else self.weight

    @WeightView
    def W_U(self) -> Tensor:
        """(d_model, d_vocab)"""
        return self._weight().T

    def forward(self, x: Tensor) -> Tensor:
        """Logits (batch, pos, d_vocab)."""
        if self.head_transform:
            x = self.hook_transformed(self.ln_transform(self.act(linear(x, self.transform_weight, self.b_transform))))
        if self.scale != 1.0:
            x = x * self.scale
        logits = linear(x, self._weight(), self.b_U)  # (batch, pos, d_vocab)
        if self.softcap is None:
            return logits
        return self.softcap * torch.tanh(self.hook_logits_uncapped(logits) / self.softcap)  # Gemma 2


class Pooler(nn.Module):
    """BERT's pooler: `tanh(resid[:, 0] @ W_pool + b_pool)`, one summary vector per sequence."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.d_model, cfg.d_model))
        self.b_pool = nn.Parameter(torch.empty(cfg.d_model))
        self.hook_pooled = HookPoint()  # (batch, d_model)

    @WeightView
    def W_pool(self) -> Tensor:
        """(d_model, d_model), applied as x @ W_pool"""
        return self.weight.T

    def forward(self, resid: Tensor) -> Tensor:
        """resid (batch, pos, d_model), e.g. `model.encode(tokens)` -> (batch, d_model)."""
        return self.hook_pooled(torch.tanh(linear(resid[:, 0], self.weight, self.b_pool)))

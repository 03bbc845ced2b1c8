"""Worked examples small enough to check by hand."""

from __future__ import annotations

import torch
from torch import Tensor

from glassformer.config import Config
from glassformer.model import Transformer


def two_heads() -> tuple[Transformer, Tensor, list[str]]:
    """The classic two-head example: d_model=4, each head reads its own half of the residual with
    identity Q/K/V, W_O = 0.5·I, and the residual rows r1=[1,0,2,1], r2=[0,1,1,2], r3=[1,1,0,1]
    are the embeddings of tokens 0, 1, 2. Token r3 ends up at ≈ [1.376, 1.376, 0.500, 1.752].
    """
    cfg = Config(
        arch="decoder",
        n_layers=1,
        d_model=4,
        n_heads=2,
        d_vocab=3,
        n_ctx=3,
        positional="none",
        norm="none",
        attn_only=True,
        bias=False,
        tie_embeddings=True,
    )
    model = Transformer(cfg).eval()
    halves = torch.eye(4).view(4, 2, 2).transpose(0, 1)  # (n_heads, d_model, d_head): head h reads dims 2h, 2h+1
    attn = model.blocks[0].attn
    attn.W_Q = halves
    attn.W_K = halves
    attn.W_V = halves
    attn.W_O = 0.5 * halves.transpose(1, 2)  # (n_heads, d_head, d_model): writes back to its own half
    with torch.no_grad():
        model.embed.W_E.copy_(torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 2.0], [1.0, 1.0, 0.0, 1.0]]))
    return model, torch.tensor([[0, 1, 2]]), ["r1", "r2", "r3"]

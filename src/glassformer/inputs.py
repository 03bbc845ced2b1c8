"""Checks on what users pass in: a clear error naming the problem, never a stack trace from torch."""

from __future__ import annotations

import torch
from torch import Tensor

from glassformer.config import Config
from glassformer.errors import InputError


def check_tokens(tokens: object, cfg: Config, name: str = "tokens", n_ids: int | None = None) -> Tensor:
    """Token ids as `(batch, pos)` int64 in [0, n_ids) (default: the vocabulary); 1-D is one sequence."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise InputError(f"{name} must be (batch, pos) or (pos,), got shape {tuple(tokens.shape)}")
    batch, pos = tokens.shape
    if batch == 0 or pos == 0:
        raise InputError(f"{name} is empty (shape {tuple(tokens.shape)}); give at least one token")
    if pos > cfg.n_ctx:
        raise InputError(f"{name} has {pos} positions, longer than the model's n_ctx={cfg.n_ctx}")
    n_ids = cfg.d_vocab if n_ids is None else n_ids
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= n_ids:
        bad = low if low < 0 else high
        raise InputError(f"{name} holds id {bad}, outside the vocabulary [0, {n_ids})")
    return tokens.long()


def check_mask(mask: object, tokens: Tensor, name: str = "attention_mask") -> Tensor | None:
    """A Hugging Face style padding mask: `(batch, pos)` of 1 (real token) / 0 (padding) -> bool.

    Returns None when nothing is padding, so the caller can keep the fastest path.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of 1/0, got {type(mask).__name__}")
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != tokens.shape:
        raise InputError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(tokens.shape)} like the tokens")
    if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
        raise InputError(f"{name} must hold only 1 (attend) and 0 (padding)")
    valid = mask != 0  # (batch, pos) bool
    return None if bool(valid.all()) else valid.to(tokens.device)

"""`WeightView`: TransformerLens-shaped names over however the weights are stored.

Reading `attn.W_Q` gives a view `(n_heads, d_model, d_head)` that shares storage with the fused
projection, so an in-place `copy_`/`zero_` under `torch.no_grad()` changes what the model computes;
assigning `attn.W_Q = t` copies `t` in after checking its shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class WeightView:
    """Data descriptor: `get(module)` returns a storage-sharing view, or None if the weight is absent."""

    def __init__(self, get: Callable[[Any], Tensor | None]) -> None:
        self.get = get
        self.__doc__ = get.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: Any, owner: type | None = None) -> Any:
        return self if module is None else self.get(module)

    def __set__(self, module: Any, value: Tensor) -> None:
        view = self.get(module)
        if view is None:
            raise AttributeError(f"{type(module).__name__}.{self.name} does not exist in this config")
        if not isinstance(value, Tensor) or value.shape != view.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{self.name} expects shape {tuple(view.shape)}, got {shape}")
        with torch.no_grad():
            view.copy_(value)

"""Cell 8, the feed-forward network: `act(x @ W_in + b_in) @ W_out + b_out`, or gated (SwiGLU, or
GeGLU with the tanh GELU): `(silu(x @ W_gate) * (x @ W_in + b_in)) @ W_out + b_out`.

Legend: batch, pos, d_model, d_mlp.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.cells.views import WeightView
from glassformer.config import Config
from glassformer.hooks import HookPoint
from glassformer.linear import linear

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": partial(F.gelu, approximate="tanh"),
}


class MLP(nn.Module):
    """Two linear maps around a pointwise non-linearity, applied to every position alone."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.act, self.act_name = ACTIVATIONS[cfg.act], cfg.act
        self.d_mlp = cfg.d_mlp  # this process's hidden units (a share under tensor parallelism)
        self.tp = None  # set by glassformer.parallel.shard
        # Stored (out_features, in_features) for linear(); W_in/W_gate/W_out are transposed views.
        self.in_weight = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.gate_weight = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model)) if cfg.gated else None
        self.out_weight = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.empty(cfg.d_mlp)) if cfg.bias else None
        self.b_out = nn.Parameter(torch.empty(cfg.d_model)) if cfg.bias else None
        self.hook_pre = HookPoint()  # (batch, pos, d_mlp): the input of the non-linearity
        if cfg.gated:
            self.hook_pre_linear = HookPoint()  # (batch, pos, d_mlp): the ungated branch
        self.hook_post = HookPoint()  # (batch, pos, d_mlp)

    @WeightView
    def W_in(self) -> Tensor:
        """(d_model, d_mlp)"""
        return self.in_weight.T

    @WeightView
    def W_gate(self) -> Tensor | None:
        """(d_model, d_mlp), gated MLPs only"""
        return None if self.gate_weight is None else self.gate_weight.T

    @WeightView
    def W_out(self) -> Tensor:
        """(d_mlp, d_model)"""
        return self.out_weight.T

    def forward(self, x: Tensor) -> Tensor:
        if self.tp is not None:  # tensor parallel: identity forward, all-reduce of the gradient backward
            x = self.tp.enter(x)
        if self.gate_weight is None:
            pre = self.hook_pre(linear(x, self.in_weight, self.b_in))  # (batch, pos, d_mlp)
            post = self.hook_post(self.act(pre))
        else:
            pre = self.hook_pre(linear(x, self.gate_weight))  # (batch, pos, d_mlp)
            up = self.hook_pre_linear(linear(x, self.in_weight, self.b_in))  # (batch, pos, d_mlp)
            post = self.hook_post(self.act(pre) * up)
        if self.tp is None:
            return linear(post, self.out_weight, self.b_out)  # (batch, pos, d_model)
        out = self.tp.exit(linear(post, self.out_weight))  # summed over every process's hidden units
        return out if self.b_out is None else out + self.b_out

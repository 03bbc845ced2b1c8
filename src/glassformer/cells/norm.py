"""Cells 7 and 9, normalisation: LayerNorm (centre, then scale) and RMSNorm (scale only).

Fused `F.layer_norm`/`F.rms_norm` unless someone hooks `hook_scale`; then the explicit steps run.
Legend: batch, pos, d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.config import Config
from glassformer.hooks import HookPoint


class Norm(nn.Module):
    """`(x - mean) / sqrt(var + eps) * w + b` (LayerNorm), or `x / sqrt(mean(x²) + eps) * w` (RMSNorm)."""

    def __init__(self, cfg: Config, size: int | None = None, rms: bool = False) -> None:
        """Over the last `size` features (d_model unless given: q/k norms use d_head or the projection);
        `rms` makes it an RMSNorm whatever `cfg.norm` says (q/k norms always are)."""
        super().__init__()
        self.centre = cfg.norm == "layernorm" and not rms
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.empty(size or cfg.d_model))
        self.b = nn.Parameter(torch.empty(size or cfg.d_model)) if self.centre and cfg.bias else None
        self.hook_scale = HookPoint()  # (..., 1)
        self.hook_normalized = HookPoint()  # (batch, pos, d_model), or the shape of what a q/k norm reads

    def forward(self, x: Tensor) -> Tensor:
        if self.hook_scale.active:
            if self.centre:
                x = x - x.mean(-1, keepdim=True)  # (batch, pos, d_model)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())  # (batch, pos, 1)
            out = x / scale * self.w
            if self.b is not None:
                out = out + self.b
        elif self.centre:
            out = F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)  # (batch, pos, d_model)
        else:
            out = F.rms_norm(x, self.w.shape, self.w, self.eps)
        return self.hook_normalized(out)


def make_norm(cfg: Config) -> nn.Module:
    """The configured norm, or an identity when `cfg.norm == "none"`."""
    return nn.Identity() if cfg.norm == "none" else Norm(cfg)

"""One transformer block: attention, (cross-attention,) MLP, each added to the residual stream.

Pre-norm: `x = x + cell(norm(x))`. Post-norm: `x = norm(x + cell(x))`. The same block, configured,
is the encoder layer, the decoder layer (with `cross=True`) and the attention-only layer.
Legend: batch, pos, d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from glassformer.cells.attention import Attention, AttentionMask
from glassformer.cells.mlp import MLP
from glassformer.cells.moe import MoE
from glassformer.cells.norm import make_norm
from glassformer.cells.position import Rotary
from glassformer.config import Config
from glassformer.errors import InputError
from glassformer.hooks import HookPoint
from glassformer.kv_cache import LayerKV


class Block(nn.Module):
    """Residual block; `block(resid)` runs it alone on a `(batch, pos, d_model)` stream."""

    def __init__(self, cfg: Config, causal: bool, cross: bool = False, rotary: Rotary | None = None) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.pre_norm = cfg.norm_position == "pre"
        self.parallel = cfg.parallel_attn_mlp
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_pre = HookPoint()  # (batch, pos, d_model)
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal, rotary=rotary)
        self.hook_attn_out = HookPoint()  # (batch, pos, d_model)
        if not self.parallel:
            self.hook_resid_mid = HookPoint()  # (batch, pos, d_model)
        self.cross_attn = Attention(cfg, causal=False) if cross else None
        if cross:
            self.ln_cross = make_norm(cfg)
            self.hook_cross_attn_out = HookPoint()  # (batch, pos, d_model)
            self.hook_resid_mid_cross = HookPoint()  # (batch, pos, d_model)
        self.mlp = None if cfg.attn_only else MoE(cfg) if cfg.n_experts else MLP(cfg)
        if self.mlp is not None:
            self.ln2 = make_norm(cfg)
            self.hook_mlp_out = HookPoint()  # (batch, pos, d_model)
        self.hook_resid_post = HookPoint()  # (batch, pos, d_model): the next block's input

    def forward(
        self,
        resid: Tensor,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        encoder_out: Tensor | None = None,
        encoder_mask: AttentionMask | None = None,
        cache: LayerKV | None = None,
        cross_cache: LayerKV | None = None,
    ) -> Tensor:
        if resid.dim() != 3 or resid.shape[-1] != self.d_model:
            raise InputError(f"resid must be (batch, pos, d_model={self.d_model}), got {tuple(resid.shape)}")
        resid = self.hook_resid_pre(resid)
        attend = partial(self.attn, mask=mask, positions=positions, cache=cache)
        if self.parallel:  # attention and MLP both read resid_pre; their outputs are added together
            attn_out = self.drop(self.hook_attn_out(attend(self.ln1(resid))))
            mlp_out = self.drop(self.hook_mlp_out(self.mlp(self.ln2(resid))))
            return self.hook_resid_post(resid + attn_out + mlp_out)
        resid = self.hook_resid_mid(self.add(resid, self.ln1, attend, self.hook_attn_out))
        if self.cross_attn is not None:
            if encoder_out is None:
                raise InputError("a decoder block with cross-attention needs encoder_out (batch, src_pos, d_model)")
            cross = partial(self.cross_attn, mask=encoder_mask, kv_input=encoder_out, cache=cross_cache)
            resid = self.hook_resid_mid_cross(self.add(resid, self.ln_cross, cross, self.hook_cross_attn_out))
        if self.mlp is not None:
            resid = self.add(resid, self.ln2, self.mlp, self.hook_mlp_out)
        return self.hook_resid_post(resid)

    def add(self, resid: Tensor, norm: nn.Module, cell: Callable[[Tensor], Tensor], hook: HookPoint) -> Tensor:
        """One residual step: the cell reads the stream (normed first if pre-norm) and its output is added."""
        if self.pre_norm:
            return resid + self.drop(hook(cell(norm(resid))))
        return norm(resid + self.drop(hook(cell(resid))))

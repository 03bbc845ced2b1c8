"""One transformer block: attention, (cross-attention,) MLP, each added to the residual stream.

Pre-norm: `x = x + cell(norm(x))`. Post-norm: `x = norm(x + cell(x))`. Sandwich (Gemma 2/3):
`x = x + norm_post(cell(norm(x)))`. Output norm (OLMo 2): `x = x + norm_post(cell(x))`. The same
block, configured, is the encoder layer, the decoder layer (with `cross=True`), the attention-only
layer and a sliding-window layer (`window`).
Legend: batch, pos, d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from glassformer.cells import block_step
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

    def __init__(
        self, cfg: Config, causal: bool, cross: bool = False, rotary: Rotary | None = None, window: int | None = None
    ) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.post_norm = cfg.norm_position == "post"
        norm_before = cfg.norm_position != "output"  # the norm a cell reads through (Identity if none)
        norm_after = cfg.norm_position in ("sandwich", "output")  # a norm of the cell's output
        self.parallel = cfg.parallel_attn_mlp
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()  # a no-op Dropout still costs a call
        self.hook_resid_pre = HookPoint()  # (batch, pos, d_model)
        self.ln1 = make_norm(cfg) if norm_before else nn.Identity()
        self.attn = Attention(cfg, causal=causal, rotary=rotary, window=window)
        self.ln1_post = make_norm(cfg) if norm_after else None
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
            if cfg.shared_norm:  # GPT-J: the MLP reads ln1's output too
                self.ln2 = None
            else:
                self.ln2 = make_norm(cfg) if norm_before else nn.Identity()
            self.ln2_post = make_norm(cfg) if norm_after else None
            self.hook_mlp_out = HookPoint()  # (batch, pos, d_model)
        self.hook_resid_post = HookPoint()  # (batch, pos, d_model): the next block's input
        # A decoding step with none of these active may run in one C call (cells/block_step.py).
        self.hook_points = [m for m in self.modules() if isinstance(m, HookPoint)]
        self.c_step_modules = [m for m in self.modules() if not isinstance(m, HookPoint)]
        self.c_step_fits = block_step.fits(self)
        self.c_step_prepared: tuple | None = None  # (what it was built from, the C step's arguments)

    def __getstate__(self) -> dict:
        """Without the C step's prepared arguments (addresses, for this process only): a copy or a
        pickle prepares its own."""
        return {**super().__getstate__(), "c_step_prepared": None}

    def forward(
        self,
        resid: Tensor,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        encoder_out: Tensor | None = None,
        encoder_mask: AttentionMask | None = None,
        cache: LayerKV | None = None,
        cross_cache: LayerKV | None = None,
        score_bias: Tensor | None = None,
    ) -> Tensor:
        """resid (batch, pos, d_model) -> the block's output, the same shape. `score_bias` (1 or batch,
        n_heads, pos, k_pos), the stack's relative position bias, is added to the self-attention scores."""
        if resid.dim() != 3 or resid.shape[-1] != self.d_model:
            raise InputError(f"resid must be (batch, pos, d_model={self.d_model}), got {tuple(resid.shape)}")
        if self.c_step_fits and cache is not None and resid.shape[1] == 1 and score_bias is None:
            out = block_step.run(self, resid, positions, cache)
            if out is not None:
                return out
        resid = self.hook_resid_pre(resid)
        attend = partial(self.attn, mask=mask, positions=positions, cache=cache, score_bias=score_bias)
        if self.parallel:  # attention and MLP both read resid_pre; their outputs are added together
            normed = self.ln1(resid)
            attn_out = self.drop(self.hook_attn_out(attend(normed)))
            mlp_out = self.drop(self.hook_mlp_out(self.mlp(normed if self.ln2 is None else self.ln2(resid))))
            return self.hook_resid_post(resid + attn_out + mlp_out)
        resid = self.hook_resid_mid(self.add(resid, self.ln1, attend, self.hook_attn_out, self.ln1_post))
        if self.cross_attn is not None:
            if encoder_out is None:
                raise InputError("a decoder block with cross-attention needs encoder_out (batch, src_pos, d_model)")
            cross = partial(self.cross_attn, mask=encoder_mask, kv_input=encoder_out, cache=cross_cache)
            resid = self.hook_resid_mid_cross(self.add(resid, self.ln_cross, cross, self.hook_cross_attn_out))
        if self.mlp is not None:
            resid = self.add(resid, self.ln2, self.mlp, self.hook_mlp_out, self.ln2_post)
        return self.hook_resid_post(resid)

    def add(
        self,
        resid: Tensor,
        norm: nn.Module,
        cell: Callable[[Tensor], Tensor],
        hook: HookPoint,
        norm_post: nn.Module | None = None,
    ) -> Tensor:
        """One residual step: the cell reads the stream (through `norm`) and its output (through
        `norm_post`, if any) is added; post-norm normalises the sum instead."""
        if self.post_norm:
            return norm(resid + self.drop(hook(cell(resid))))
        out = cell(norm(resid))  # (batch, pos, d_model)
        return resid + self.drop(hook(out if norm_post is None else norm_post(out)))

"""Cells 3-6 and 10, attention: Q/K/V projections, scores, mask, softmax, weighted sum, W_O merge.

Fast by default, visible on request: the fused kernel (`scaled_dot_product_attention`) runs unless
someone hooks `hook_attn_scores` or `hook_pattern`, or the scores are soft-capped (Gemma 2: the
kernel cannot); the per-head `result` (n_heads times larger than the merged output) exists only
when `hook_result` is hooked. An additive score bias (T5's relative positions) joins the mask as the
kernel's float mask, or is added to the explicit scores.

Legend: batch, pos (queries), k_pos (keys), n_heads, n_kv_heads, d_head, d_model.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glassformer.cells.norm import Norm
from glassformer.cells.position import Rotary
from glassformer.cells.views import WeightView
from glassformer.config import Config
from glassformer.factored import FactoredMatrix
from glassformer.hooks import HookPoint
from glassformer.kv_cache import LayerKV
from glassformer.linear import linear


class AttentionMask:
    """Which keys a query may attend to, from key padding: built once per forward, shared by layers.

    `key_valid` is `(batch, k_pos)` bool, or None when no key is padding. `q_slots` (pos,) place the
    queries among the keys for the causal order (decoding with a KV cache); by default the queries
    are the last q_pos of the k_pos keys. A sliding window keeps, of the causal keys, the last
    `window` slots (the query's own included). A query with no visible key (a padding query under
    left padding) is allowed every key, so its row stays finite.
    """

    def __init__(self, key_valid: Tensor | None, q_slots: Tensor | None = None) -> None:
        self.key_valid, self.q_slots = key_valid, q_slots
        self._dense: dict[tuple[bool, int, int, int | None], Tensor | None] = {}
        self._additive: dict[tuple[bool, int, int, int | None, torch.dtype], Tensor | None] = {}

    def allowed(
        self, causal: bool, q_len: int, k_len: int, device: torch.device, window: int | None = None
    ) -> Tensor | None:
        """(batch or 1, 1, q_pos, k_pos) bool, or None when every key is visible to every query."""
        key = (causal, q_len, k_len, window)
        if key not in self._dense:
            mask = None
            if causal:
                q_idx = self.q_slots if self.q_slots is not None else torch.arange(k_len - q_len, k_len, device=device)
                distance = q_idx[:, None] - torch.arange(k_len, device=device)[None, :]  # (pos, k_pos)
                mask = distance >= 0 if window is None else (distance >= 0) & (distance < window)
                mask = mask[None, None]  # (1, 1, pos, k_pos)
            if self.key_valid is not None:
                keys = self.key_valid[:, None, None, :]  # (batch, 1, 1, k_pos)
                mask = keys if mask is None else mask & keys  # (batch, 1, pos, k_pos)
                mask = mask | ~mask.any(-1, keepdim=True)
            self._dense[key] = mask
        return self._dense[key]

    def additive(
        self, causal: bool, q_len: int, k_len: int, device: torch.device, dtype: torch.dtype, window: int | None = None
    ) -> Tensor | None:
        """`allowed` as the fused kernel's float mask, 0 where allowed and -inf elsewhere: converted once
        per forward for every layer (given a bool mask, the kernel converts it in each call, which costs
        more than the attention itself when decoding one token)."""
        key = (causal, q_len, k_len, window, dtype)
        if key not in self._additive:
            allowed = self.allowed(causal, q_len, k_len, device, window)
            self._additive[key] = (
                None
                if allowed is None
                else torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
            )  # (batch or 1, 1, pos, k_pos)
        return self._additive[key]


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention; self-attention, or cross-attention reading K/V from
    another sequence (the encoder output). `window`: a sliding-window layer sees only the last
    `window` keys."""

    def __init__(self, cfg: Config, causal: bool, rotary: Rotary | None = None, window: int | None = None) -> None:
        super().__init__()
        self.causal, self.window = causal, window
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q_size, self.kv_size = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
        self.scale = 1.0 / math.sqrt(cfg.d_head) if cfg.attn_scale is None else cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout
        # Q, K and V stored as one (out_features, in_features) matrix: one matmul on the hot path.
        self.qkv_weight = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, cfg.d_model))
        self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size)) if cfg.bias else None
        self.o_weight = nn.Parameter(torch.empty(cfg.d_model, self.q_size))
        self.b_O = nn.Parameter(torch.empty(cfg.d_model)) if cfg.bias else None
        self.rotary = rotary  # shared by all layers; holds only non-persistent tables
        self.tp = None  # set by glassformer.parallel.shard: this process's heads are a share of all

        self.hook_q = HookPoint()  # (batch, pos, n_heads, d_head)
        self.hook_k = HookPoint()  # (batch, k_pos, n_kv_heads, d_head)
        self.hook_v = HookPoint()  # (batch, k_pos, n_kv_heads, d_head)
        # q/k RMSNorm (Qwen3, Gemma 3: over each head's d_head; OLMo 2: over the whole projection).
        self.qk_norm_heads = cfg.qk_norm == "head"
        with_qk_norm = cfg.qk_norm != "none"
        self.q_norm = Norm(cfg, cfg.d_head if self.qk_norm_heads else self.q_size, rms=True) if with_qk_norm else None
        self.k_norm = Norm(cfg, cfg.d_head if self.qk_norm_heads else self.kv_size, rms=True) if with_qk_norm else None
        if rotary is not None:
            self.hook_rot_q = HookPoint()  # (batch, pos, n_heads, d_head), after rotation
            self.hook_rot_k = HookPoint()  # (batch, k_pos, n_kv_heads, d_head)
        self.hook_attn_scores = HookPoint()  # (batch, n_heads, pos, k_pos), scaled and masked
        if self.softcap is not None:
            self.hook_attn_scores_capped = HookPoint()  # (batch, n_heads, pos, k_pos), cap·tanh(scores/cap)
        self.hook_pattern = HookPoint()  # (batch, n_heads, pos, k_pos), softmax of the scores
        self.hook_z = HookPoint()  # (batch, pos, n_heads, d_head)
        self.hook_result = HookPoint()  # (batch, pos, n_heads, d_model), each head's write

    # TransformerLens-shaped views of the stored weights (see cells/views.py).
    def _part(self, tensor: Tensor | None, start: int, size: int) -> Tensor | None:
        return None if tensor is None else tensor[start : start + size]

    @WeightView
    def W_Q(self) -> Tensor:
        """(n_heads, d_model, d_head)"""
        return self.qkv_weight[: self.q_size].view(self.n_heads, self.d_head, -1).transpose(1, 2)

    @WeightView
    def W_K(self) -> Tensor:
        """(n_kv_heads, d_model, d_head)"""
        w = self.qkv_weight[self.q_size : self.q_size + self.kv_size]
        return w.view(self.n_kv_heads, self.d_head, -1).transpose(1, 2)

    @WeightView
    def W_V(self) -> Tensor:
        """(n_kv_heads, d_model, d_head)"""
        w = self.qkv_weight[self.q_size + self.kv_size :]
        return w.view(self.n_kv_heads, self.d_head, -1).transpose(1, 2)

    @WeightView
    def b_Q(self) -> Tensor | None:
        """(n_heads, d_head)"""
        b = self._part(self.qkv_bias, 0, self.q_size)
        return None if b is None else b.view(self.n_heads, self.d_head)

    @WeightView
    def b_K(self) -> Tensor | None:
        """(n_kv_heads, d_head)"""
        b = self._part(self.qkv_bias, self.q_size, self.kv_size)
        return None if b is None else b.view(self.n_kv_heads, self.d_head)

    @WeightView
    def b_V(self) -> Tensor | None:
        """(n_kv_heads, d_head)"""
        b = self._part(self.qkv_bias, self.q_size + self.kv_size, self.kv_size)
        return None if b is None else b.view(self.n_kv_heads, self.d_head)

    @WeightView
    def W_O(self) -> Tensor:
        """(n_heads, d_head, d_model)"""
        return self.o_weight.view(-1, self.n_heads, self.d_head).permute(1, 2, 0)

    def _per_query_head(self, w: Tensor) -> Tensor:
        """A key or value weight (n_kv_heads, ...) repeated for the query heads each one serves (n_heads, ...)."""
        group = self.n_heads // self.n_kv_heads
        return w if group == 1 else w.repeat_interleave(group, dim=0)

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's bilinear form on the residual stream, W_Q W_K^T (n_heads, d_model, d_model),
        factored: scores = x_q QK x_k^T before scaling, with biases, q/k norms and rotary positions left
        out (with rotary, the true form also depends on the distance between query and key).
        Grouped-query key heads are repeated for the query heads they serve."""
        return FactoredMatrix(self.W_Q, self._per_query_head(self.W_K).mT)

    @property
    def OV(self) -> FactoredMatrix:
        """What each head writes for what it reads, W_V W_O (n_heads, d_model, d_model), factored:
        a head's output is pattern-weighted x OV (biases left out). Grouped-query value heads are
        repeated for the query heads they serve."""
        return FactoredMatrix(self._per_query_head(self.W_V), self.W_O)

    def project(self, x: Tensor, kv_input: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Cell 3: q from x; k and v from x (self-attention) or from kv_input (cross-attention)."""
        batch, pos, _ = x.shape
        if kv_input is None:
            qkv = linear(x, self.qkv_weight, self.qkv_bias)  # (batch, pos, (n_heads + 2 n_kv_heads) d_head)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q = self.project_q(x)
            kv_bias = self._part(self.qkv_bias, self.q_size, 2 * self.kv_size)
            kv = linear(kv_input, self.qkv_weight[self.q_size :], kv_bias)  # (batch, k_pos, 2 n_kv_heads d_head)
            k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, pos, self.n_heads, self.d_head)  # (batch, pos, n_heads, d_head)
        k = k.view(batch, -1, self.n_kv_heads, self.d_head)  # (batch, k_pos, n_kv_heads, d_head)
        v = v.view(batch, -1, self.n_kv_heads, self.d_head)
        return q, k, v

    def project_q(self, x: Tensor) -> Tensor:
        """Queries alone `(batch, pos, n_heads, d_head)`: cross-attention once the encoder's K/V are cached."""
        q = linear(x, self.qkv_weight[: self.q_size], self._part(self.qkv_bias, 0, self.q_size))
        return q.view(*x.shape[:2], self.n_heads, self.d_head)

    def normalize(self, norm: Norm, x: Tensor) -> Tensor:
        """q or k `(batch, pos, heads, d_head)` through its RMSNorm: per head, or over the whole projection."""
        return norm(x) if self.qk_norm_heads else norm(x.flatten(2)).view_as(x)

    def keys_values(
        self, x: Tensor, positions: Tensor | None, kv_input: Tensor | None, cache: LayerKV | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q `(batch, pos, n_heads, d_head)` and k, v head-first `(batch, n_kv_heads, k_pos, d_head)`:
        this step's keys, or every cached slot when decoding with a KV cache."""
        if cache is not None and cache.filled:  # cross-attention: the encoder's keys were cached
            q = self.hook_q(self.project_q(x))
            return (q if self.q_norm is None else self.normalize(self.q_norm, q)), cache.k, cache.v
        q, k, v = self.project(x, kv_input)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.q_norm is not None:
            q, k = self.normalize(self.q_norm, q), self.normalize(self.k_norm, k)
        if self.rotary is not None:
            q, k = self.rotary.rotate(q, k, positions)
            q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        if cache is None:
            return q, k.transpose(1, 2), v.transpose(1, 2)
        if kv_input is not None:
            cache.store(k, v)
            return q, cache.k, cache.v
        return q, *cache.write(k, v)

    def forward(
        self,
        x: Tensor,
        mask: AttentionMask | None = None,
        positions: Tensor | None = None,
        kv_input: Tensor | None = None,
        cache: LayerKV | None = None,
        score_bias: Tensor | None = None,
    ) -> Tensor:
        """x (batch, pos, d_model) -> attention output (batch, pos, d_model). `score_bias`
        (1 or batch, n_heads, pos, k_pos) is added to the scaled scores before the mask and softmax."""
        if self.tp is not None:  # tensor parallel: identity forward, all-reduce of the gradient backward
            x = self.tp.enter(x)
            kv_input = None if kv_input is None else self.tp.enter(kv_input)
        q, k, v = self.keys_values(x, positions, kv_input, cache)
        mask = mask or AttentionMask(None)
        split_dropout = self.tp is not None and self.training and self.dropout > 0
        with self.tp.own_random_stream(x.device) if split_dropout else nullcontext():  # each process's heads
            if self.softcap is not None or self.hook_attn_scores.active or self.hook_pattern.active:
                allowed = mask.allowed(self.causal, q.shape[1], k.shape[2], q.device, self.window)
                z = self._explicit(q, k, v, allowed, score_bias)
            else:
                z = self._fused(q, k, v, mask, score_bias)
        z = self.hook_z(z)  # (batch, pos, n_heads, d_head)
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))  # (batch, pos, n_heads, d_model)
            out = result.sum(dim=2)
        elif self.tp is None:
            return linear(z.flatten(2), self.o_weight, self.b_O)  # (batch, pos, d_model)
        else:
            out = linear(z.flatten(2), self.o_weight)  # this process's heads only
        if self.tp is not None:
            out = self.tp.exit(out)  # sum over every process's heads
        return out if self.b_O is None else out + self.b_O

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, score_bias: Tensor | None) -> Tensor:
        """Cells 4-5 in one kernel; a plain causal mask needs no mask tensor at all. Other masks go in
        as a float mask (0 or -inf), with the score bias added where there is one."""
        q_len, k_len = q.shape[1], k.shape[2]
        unwindowed = self.window is None or self.window >= k_len
        is_causal = score_bias is None and self.causal and mask.key_valid is None and q_len == k_len and unwindowed
        if is_causal:
            attn_mask = None
        elif score_bias is None:
            attn_mask = mask.additive(self.causal, q_len, k_len, q.device, q.dtype, self.window)
        else:
            allowed = mask.allowed(self.causal, q_len, k_len, q.device, self.window)
            attn_mask = score_bias if allowed is None else score_bias.masked_fill(~allowed, -math.inf)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (batch, n_heads, pos, d_head)
            k,  # (batch, n_kv_heads, k_pos, d_head)
            v,
            attn_mask=attn_mask,  # (batch or 1, 1 or n_heads, pos, k_pos), or None
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (batch, n_heads, pos, d_head)
        return z.transpose(1, 2)  # (batch, pos, n_heads, d_head)

    def _explicit(
        self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, score_bias: Tensor | None
    ) -> Tensor:
        """Cells 4-5 step by step: dot product, scale, (bias,) mask, softmax, weighted sum of values."""
        if self.n_kv_heads != self.n_heads:  # each key/value head serves a group of query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (batch, n_heads, k_pos, d_head)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # Scaling q (small) rather than the scores and masking in place keeps this to one
        # (batch, n_heads, pos, k_pos) tensor before the softmax: it matters when everything is cached.
        scores = torch.einsum("bqhd,bhkd->bhqk", q * self.scale, k)  # (batch, n_heads, pos, k_pos)
        if score_bias is not None:
            scores += score_bias
        if allowed is not None:
            scores.masked_fill_(~allowed, float("-inf"))
        scores = self.hook_attn_scores(scores)
        if self.softcap is not None:  # tanh maps the masked -inf to -cap: mask again
            scores = self.softcap * torch.tanh(scores / self.softcap)  # (batch, n_heads, pos, k_pos)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, -math.inf)
            scores = self.hook_attn_scores_capped(scores)
        pattern = self.hook_pattern(scores.softmax(dim=-1))  # (batch, n_heads, pos, k_pos)
        if self.training and self.dropout:
            pattern = F.dropout(pattern, self.dropout)
        return torch.einsum("bhqk,bhkd->bqhd", pattern, v)  # (batch, pos, n_heads, d_head)

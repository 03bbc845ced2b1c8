"""Cell 8 as a mixture of experts (Mixtral, Qwen-MoE): a router scores every expert for each token,
the top-k of its softmax are run and their outputs added, weighted; a sigmoid-gated shared expert,
where the family has one, reads every token.

Routing is visible and editable. `hook_router_logits` holds the router's scores; `hook_expert_weights`
the dense weights after top-k (and renormalisation), zero for every expert a token does not use.
Each expert runs on exactly the tokens whose weight is non-zero after that hook: zeroing a weight
removes the expert's contribution, a non-zero weight routes the token to it.

Each expert is an `MLP` cell fed only the tokens routed to it (as in transformers), so its own
hooks (`experts.{e}.hook_pre`, `hook_pre_linear`, `hook_post`) see `(routed, d_expert_mlp)`: one row
per routed token, in (batch, pos) order. `hook_expert_out.{e}` is expert e's weighted write at every
position, zero where it is not used; it is built only when hooked. Router, experts and shared expert
have no biases. The routing weights are float32 whatever the model's dtype, as in transformers.

Legend: batch, pos, d_model, n_experts, top_k, tokens (batch * pos), routed, d_expert_mlp.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from glassformer.cells.mlp import MLP
from glassformer.cells.views import WeightView
from glassformer.config import Config
from glassformer.hooks import HookPoint
from glassformer.linear import linear


class MoE(nn.Module):
    """Router, top-k experts (MLP cells) and an optional gated shared expert; `(batch, pos, d_model)` in and out."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = cfg.n_experts, cfg.n_experts_per_token, cfg.norm_topk_prob
        self.router_weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))  # (out, in) for linear()
        expert_cfg = dataclasses.replace(cfg, d_mlp=cfg.d_expert_mlp, bias=False, n_experts=0)
        self.experts = nn.ModuleList(MLP(expert_cfg) for _ in range(cfg.n_experts))
        self.hook_router_logits = HookPoint()  # (batch, pos, n_experts)
        self.hook_expert_weights = HookPoint()  # (batch, pos, n_experts), float32, zero where not routed
        self.hook_expert_out = nn.ModuleList(HookPoint() for _ in range(cfg.n_experts))  # each (batch, pos, d_model)
        self.shared_expert = None
        if cfg.d_shared_expert_mlp:
            self.shared_expert = MLP(dataclasses.replace(expert_cfg, d_mlp=cfg.d_shared_expert_mlp))
            self.shared_gate_weight = nn.Parameter(torch.empty(1, cfg.d_model))
            self.hook_shared_gate = HookPoint()  # (batch, pos, 1): sigmoid(x @ W_shared_gate)
            self.hook_shared_out = HookPoint()  # (batch, pos, d_model): the gated shared expert's output
        # Per expert, every hook point that reads it: an expert no token uses still runs when one is hooked.
        self._watchers = [
            [h for h in (*expert.modules(), out) if isinstance(h, HookPoint)]
            for expert, out in zip(self.experts, self.hook_expert_out, strict=True)
        ]

    @WeightView
    def W_router(self) -> Tensor:
        """(d_model, n_experts)"""
        return self.router_weight.T

    @WeightView
    def W_shared_gate(self) -> Tensor | None:
        """(d_model, 1), with a shared expert only"""
        return None if self.shared_expert is None else self.shared_gate_weight.T

    def forward(self, x: Tensor) -> Tensor:
        logits = self.hook_router_logits(linear(x, self.router_weight))  # (batch, pos, n_experts)
        probs = logits.float().softmax(-1)  # (batch, pos, n_experts)
        top, chosen = probs.topk(self.top_k, dim=-1)  # (batch, pos, top_k)
        if self.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        weights = self.hook_expert_weights(torch.zeros_like(probs).scatter(-1, chosen, top))  # (batch, pos, n_experts)
        out = self.mix(x, weights)  # (batch, pos, d_model)
        if self.shared_expert is not None:
            gate = self.hook_shared_gate(torch.sigmoid(linear(x, self.shared_gate_weight)))  # (batch, pos, 1)
            out = out + self.hook_shared_out(gate * self.shared_expert(x))
        return out

    def mix(self, x: Tensor, weights: Tensor) -> Tensor:
        """Σ_e weights[..., e] · expert_e(x), each expert run only on the tokens with a non-zero weight."""
        flat = x.reshape(-1, x.shape[-1])  # (tokens, d_model)
        w = weights.reshape(-1, self.n_experts)  # (tokens, n_experts)
        token, expert = w.nonzero(as_tuple=True)  # (routed pairs,) each
        routed = token[expert.argsort(stable=True)].split(torch.bincount(expert, minlength=self.n_experts).tolist())
        out = torch.zeros_like(flat)  # (tokens, d_model)
        for e, tokens in enumerate(routed):  # in expert order, as transformers adds them
            if not len(tokens) and not any(h.active for h in self._watchers[e]):
                continue
            y = (self.experts[e](flat[tokens]) * w[tokens, e, None]).to(x.dtype)  # (routed, d_model)
            hook = self.hook_expert_out[e]
            if hook.active:  # expert e's write at every position: (batch, pos, d_model)
                out = out + hook(torch.zeros_like(flat).index_add_(0, tokens, y).view_as(x)).reshape_as(flat)
            else:
                out.index_add_(0, tokens, y)
        return out.view_as(x)

"""A lean GPT-2 in the style of nanoGPT: the speed reference for the forward benchmark.

Fused QKV projection, `F.scaled_dot_product_attention(is_causal=True)`, tanh GELU, pre-LN blocks and
an output head tied to the token embedding. No hooks, no checks: the least a GPT-2 forward pass can do
in eager PyTorch. Legend: B batch, T positions, C d_model, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LeanConfig:
    """GPT-2 small by default."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024
    eps: float = 1e-5


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused q|k|v projection."""

    def __init__(self, cfg: LeanConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    """Linear, tanh-approximated GELU, linear."""

    def __init__(self, cfg: LeanConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: LeanConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LeanGPT(nn.Module):
    """GPT-2: token + learned position embedding, blocks, final LayerNorm, tied head."""

    def __init__(self, cfg: LeanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def load_hf_gpt2(self, hf: nn.Module) -> LeanGPT:
        """Copy the weights of a Hugging Face `GPT2LMHeadModel` (Conv1D weights are (in, out))."""
        src = hf.transformer
        self.wte.weight.copy_(src.wte.weight)
        self.wpe.weight.copy_(src.wpe.weight)
        for ours, theirs in zip(self.h, src.h, strict=True):
            for a, b in ((ours.ln_1, theirs.ln_1), (ours.ln_2, theirs.ln_2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            for a, b in (
                (ours.attn.c_attn, theirs.attn.c_attn),
                (ours.attn.c_proj, theirs.attn.c_proj),
                (ours.mlp.c_fc, theirs.mlp.c_fc),
                (ours.mlp.c_proj, theirs.mlp.c_proj),
            ):
                a.weight.copy_(b.weight.T)
                a.bias.copy_(b.bias)
        self.ln_f.weight.copy_(src.ln_f.weight)
        self.ln_f.bias.copy_(src.ln_f.bias)
        return self

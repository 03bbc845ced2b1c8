"""The model families of issue 12 in bench/forward.py and bench/generate.py (`--model gemma3|qwen3`):
transformers models of the real small models' shapes, scaled to 100-300 M parameters, random
weights (no hub download), and glassformer's model from `gf.Transformer.from_hf` — the path a user
takes, nothing set up by hand. The peer is transformers alone: the lean model and TransformerLens
are GPT-2 only.

    .venv/bin/python bench/forward.py --model gemma3
    .venv/bin/python bench/generate.py --model qwen3 --no-tl --no-compile

FLOPs: 2 per multiply-add of every weight product a token goes through (all the matrices of the
blocks and the unembedding; not the embedding lookup) plus the attention products, QK^T and
pattern @ V, over the keys each query sees: causal, and at most the window in a sliding layer.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: every model is built from a config

import torch  # noqa: E402
from torch import nn  # noqa: E402

import glassformer as gf  # noqa: E402

# Gemma 3 270M's shape (d_model 640, 18 layers, 4 heads / 1 KV head of 256, d_mlp 2048, its 262k
# vocabulary, window 512 in five of every six layers): 268 M parameters, 168 M of them the embedding.
GEMMA3 = dict(
    hidden_size=640,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    intermediate_size=2048,
    vocab_size=262144,
    sliding_window=512,
    query_pre_attn_scalar=256,
    max_position_embeddings=32768,
)
# Qwen3-0.6B's shape (d_model 1024, 16 / 8 heads of 128, d_mlp 3072, vocabulary 151936, tied) with
# 8 of its 28 layers: 281 M parameters, 156 M of them the embedding.
QWEN3 = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
MODELS = ("gemma3", "qwen3")


def build(name: str, seed: int = 0) -> nn.Module:
    """The transformers model `name` (sdpa attention, float32, random weights, eval mode)."""
    import transformers as t

    torch.manual_seed(seed)
    if name == "gemma3":
        model = t.Gemma3ForCausalLM(t.Gemma3TextConfig(**GEMMA3, attn_implementation="sdpa"))
    elif name == "qwen3":
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**QWEN3, attn_implementation="sdpa"))
    else:
        raise ValueError(f"model {name!r} is not one of {MODELS}")
    return model.eval()


def describe(hf: nn.Module) -> str:
    """One line: the family, its size and its weights in MB."""
    params = sum(p.numel() for p in hf.parameters())
    return f"{type(hf).__name__} ({params / 1e6:.0f} M parameters, {4 * params / 1e6:.0f} MB in float32)"


def weight_matrices(model: gf.Transformer) -> int:
    """Parameters of every weight product a token goes through: the blocks' matrices and the
    unembedding (W_E again when tied), not the embedding lookup (one row per token)."""
    cfg = model.cfg
    lookups = ("embed", "pos_embed", "token_type_embed")  # tables a token reads one row of
    matrices = sum(
        p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name.split(".")[0] not in lookups
    )
    if cfg.tie_embeddings:
        matrices += cfg.d_vocab * cfg.d_model  # the unembedding reads W_E
    return matrices


def matmul_shapes(model: gf.Transformer) -> tuple[tuple[int, int, int], ...]:
    """(rows, in, out) of the model's block products for forward.py's ceiling, as for GPT-2: the
    MLP's in and out at 1024 rows, the fused q/k/v at 1024 rows, the MLP's in at 128 rows."""
    cfg = model.cfg
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head
    return (
        (1024, cfg.d_model, cfg.d_mlp),
        (1024, cfg.d_mlp, cfg.d_model),
        (1024, cfg.d_model, qkv),
        (128, cfg.d_model, cfg.d_mlp),
    )


def agreement_shapes(model: gf.Transformer) -> list[tuple[int, int]]:
    """(batch, pos) on which logits are compared before timing: 2x64, and one sequence 64 tokens
    longer than the sliding window when there is one (so the windowed layers are checked too)."""
    windows = [w for w in (model.cfg.window(i) for i in range(model.cfg.n_layers)) if w]
    return [(2, 64)] + ([(1, max(windows) + 64)] if windows else [])


def forward_flops(model: gf.Transformer, batch: int, pos: int) -> float:
    """FLOPs of one forward pass of `batch` sequences of `pos` tokens (see the module docstring)."""
    cfg = model.cfg
    matrices = weight_matrices(model)
    attention = 0.0
    for i in range(cfg.n_layers):
        window = cfg.window(i) or pos
        keys = sum(min(q + 1, window) for q in range(pos))  # keys each query sees
        attention += 2 * 2 * batch * keys * cfg.n_heads * cfg.d_head  # QK^T and pattern @ V
    return float(2 * batch * pos * matrices + attention)

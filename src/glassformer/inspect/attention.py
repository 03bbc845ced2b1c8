"""Attention pictures: every head's pattern as a heatmap, queries down, keys across."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from glassformer.checkpoints.files import atomic_write
from glassformer.inspect.inputs import TokensOrText, as_tokens, token_labels
from glassformer.model import Transformer


def patterns(model: Transformer, tokens: TokensOrText, tgt: TokensOrText | None = None) -> Tensor:
    """(n_layers, n_heads, q_pos, k_pos) self-attention patterns of the first sequence of `tokens`
    (for an encoder-decoder model, of the decoder reading `tgt`); either may be text."""
    tokens = as_tokens(model, tokens)
    if tgt is not None:
        tgt = as_tokens(model, tgt, "tgt")
    stack = "decoder." if model.cfg.arch == "encoder-decoder" else ""

    def names(name: str) -> bool:
        return name.startswith(f"{stack}blocks.") and name.endswith(".attn.hook_pattern")

    with torch.no_grad():
        args = (tokens,) if tgt is None else (tokens, tgt)
        _, cache = model.run_with_cache(*args, names_filter=names)
    return torch.stack([cache[name][0] for name in sorted(cache.keys(), key=lambda n: int(n.split(".")[-3]))])


def plot_attention(
    model: Transformer,
    tokens: TokensOrText,
    labels: list[str] | None,
    path: str | Path,
    tgt: TokensOrText | None = None,
) -> Path:
    """A PNG grid, one heatmap per layer (rows) and head (columns), its axes labelled with `labels`
    (the target's, for an encoder-decoder model's decoder); None: the tokenizer's token strings."""
    tokens = as_tokens(model, tokens)
    tgt = as_tokens(model, tgt, "tgt") if tgt is not None else None
    labels = labels if labels is not None else token_labels(model, tokens if tgt is None else tgt)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = patterns(model, tokens, tgt).float()  # (n_layers, n_heads, q_pos, k_pos)
    n_layers, n_heads, n_pos, _ = grid.shape
    size = max(2.0, min(4.0, 0.12 * n_pos))
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers), squeeze=False, dpi=90)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(grid[layer, head].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            if labels is not None and n_pos <= 48:
                ticks = range(n_pos)
                ax.set_xticks(ticks, [repr(t)[1:-1] for t in labels], rotation=90, fontsize=5)
                ax.set_yticks(ticks, [repr(t)[1:-1] for t in labels], fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.supxlabel("key position (attended to)")
    fig.supylabel("query position (attending)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path

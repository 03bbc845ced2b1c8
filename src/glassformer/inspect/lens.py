"""Logit lens: read each layer's residual stream as if it were the last one.

Every block's `hook_resid_post` (and the embeddings, `blocks.0.hook_resid_pre`) goes through the
model's own final norm and unembedding, so one sees the prediction forming layer by layer. The last
row is the model's output itself. Legend: layer, batch, pos, d_model, d_vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glassformer.inspect.inputs import TokensOrText, as_tokens, id_strings, token_labels
from glassformer.model import Transformer
from glassformer.tokenizer import TextTokenizer


@dataclass
class LogitLens:
    """Logits read from the residual stream after the embeddings and after each block."""

    layers: list[str]  # "embed", "0", "1", …
    logits: Tensor  # (n_layers + 1, batch, pos, d_vocab)
    labels: list[str] | None = None  # the first sequence's input token strings (with a tokenizer)
    tokenizer: TextTokenizer | None = None  # the model's: reads the top tokens as strings

    def top(self, position: int = -1, batch_index: int = 0) -> list[tuple[str, int, float]]:
        """(layer, most likely token, its probability) per layer, for one position of one sequence."""
        probs = self.logits[:, batch_index, position].float().softmax(-1)  # (n_layers + 1, d_vocab)
        best = probs.max(-1)
        return [(layer, int(i), float(p)) for layer, i, p in zip(self.layers, best.indices, best.values, strict=True)]

    def top_strings(self, position: int = -1, batch_index: int = 0) -> list[tuple[str, str, float]]:
        """As `top`, with each token as its string (the model's tokenizer's; the id without one)."""
        top = self.top(position, batch_index)
        names = id_strings(self.tokenizer, [token for _, token, _ in top])
        return [(layer, name, prob) for (layer, _, prob), name in zip(top, names, strict=True)]

    def render(self, position: int = -1, batch_index: int = 0, vocab: list[str] | None = None) -> str:
        """One line per layer: the top token at `position` and its probability; tokens are shown
        as `vocab[id]` when a vocabulary is given, else as the tokenizer's strings (or ids)."""
        where = f"position {position}"
        if self.labels is not None and batch_index == 0:
            where += f" ({self.labels[position]!r})"
        lines = [f"logit lens, {where}: the top token after each layer"]
        if vocab is not None:
            rows = [(layer, repr(vocab[token]), prob) for layer, token, prob in self.top(position, batch_index)]
        elif self.tokenizer is not None:
            rows = [(layer, repr(token), prob) for layer, token, prob in self.top_strings(position, batch_index)]
        else:
            rows = self.top_strings(position, batch_index)  # ids
        lines += [f"  {layer:>6}  {name:<12} p={prob:.3f}" for layer, name, prob in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def logit_lens(model: Transformer, tokens: TokensOrText, tgt: TokensOrText | None = None) -> LogitLens:
    """The lens for `tokens` (an encoder-decoder model: the decoder's stream for target `tgt`);
    either may be text. With a tokenizer, the lens knows the token strings."""
    tokens = as_tokens(model, tokens)
    tgt = as_tokens(model, tgt, "tgt") if tgt is not None else None
    labels = token_labels(model, tokens if tgt is None else tgt)  # the stream the lens reads
    stack = "decoder." if model.cfg.arch == "encoder-decoder" else ""
    root = model.decoder if stack else model
    if stack and tgt is None:
        raise ValueError("an encoder-decoder model needs the decoder tokens: logit_lens(model, src, tgt)")
    n_layers = len(root.blocks)
    names = [f"{stack}blocks.0.hook_resid_pre"] + [f"{stack}blocks.{i}.hook_resid_post" for i in range(n_layers)]
    inputs = (tokens,) if tgt is None else (tokens, tgt)
    with torch.no_grad():
        _, cache = model.run_with_cache(*inputs, names_filter=names)
        resid = torch.stack([cache[name] for name in names])  # (n_layers + 1, batch, pos, d_model)
        logits = model.unembed(root.ln_final(resid))  # (n_layers + 1, batch, pos, d_vocab)
    return LogitLens(["embed", *map(str, range(n_layers))], logits, labels, model.tokenizer)

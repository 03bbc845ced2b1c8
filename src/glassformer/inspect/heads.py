"""Head detectors: what each attention head does, scored on repeated random tokens.

The input is random tokens followed by the same tokens again, `[r_1 … r_L, r_1 … r_L]`, as in the
induction-heads literature. Each score is a mean attention mass from `hook_pattern` (TransformerLens
definitions), one number in [0, 1] per (layer, head):

- previous-token: mass on key `q - 1`, over every query after the first;
- first-token: mass on key 0, over every query after the first;
- duplicate-token: mass on earlier keys holding the query's own token (its previous occurrence),
  over the queries of the second half;
- induction: mass on the keys right after an earlier occurrence of the query's token (what came
  next last time), over the queries of the second half.

Duplicate and induction targets are found from the tokens themselves, so accidental repeats inside
the random half count too. Legend: batch, n_heads, pos (queries), k_pos (keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glassformer.inspect.inputs import TokensOrText, as_tokens
from glassformer.model import Transformer

DETECTORS = ("previous", "duplicate", "induction", "first")


def repeated_tokens(d_vocab: int, length: int, batch: int = 8, seed: int = 0, low: int = 0) -> Tensor:
    """(batch, 2 length) token ids: `length` random ids in [low, d_vocab), then the same again."""
    if length < 1 or batch < 1:
        raise ValueError(f"length={length} and batch={batch} must be positive")
    if not 0 <= low < d_vocab:
        raise ValueError(f"low={low} must lie in [0, d_vocab={d_vocab})")
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(low, d_vocab, (batch, length), generator=generator)  # (batch, length)
    return torch.cat([half, half], dim=1)  # (batch, 2 length)


def target_masks(tokens: Tensor) -> dict[str, Tensor]:
    """Per detector, (batch, pos, k_pos) bool: which keys each query should attend to."""
    batch, n_pos = tokens.shape
    q = torch.arange(n_pos)[:, None]  # (pos, 1)
    k = torch.arange(n_pos)[None, :]  # (1, k_pos)
    same = tokens[:, :, None] == tokens[:, None, :]  # (batch, pos, k_pos): same token at q and k
    earlier_same = same & (k < q)  # (batch, pos, k_pos)
    after_earlier_same = torch.zeros_like(same)  # key k follows an earlier occurrence at k - 1
    after_earlier_same[:, :, 1:] = earlier_same[:, :, :-1]
    return {
        "previous": (k == q - 1).expand(batch, -1, -1),
        "duplicate": earlier_same,
        "induction": after_earlier_same,
        "first": (k == 0).expand(n_pos, n_pos).expand(batch, -1, -1),
    }


def query_positions(n_pos: int) -> dict[str, Tensor]:
    """Per detector, (pos,) bool: the queries its score averages over."""
    every_but_first = torch.arange(n_pos) >= 1
    second_half = torch.arange(n_pos) >= n_pos // 2
    return {"previous": every_but_first, "duplicate": second_half, "induction": second_half, "first": every_but_first}


def score(pattern: Tensor, target: Tensor, queries: Tensor) -> Tensor:
    """(n_heads,) mean attention mass on the target keys: pattern (batch, n_heads, pos, k_pos),
    target (batch, pos, k_pos) bool, queries (pos,) bool."""
    mass = (pattern * target[:, None].to(pattern.dtype)).sum(-1)  # (batch, n_heads, pos)
    return mass[:, :, queries].mean(dim=(0, 2))  # (n_heads,)


@dataclass
class HeadScores:
    """Detector scores per attention layer and head; `str()` prints them as a table."""

    layers: list[str]  # "0", "1", … (single stack) or "encoder.0", "decoder.1", …
    scores: dict[str, Tensor]  # detector -> (n_layers, n_heads)
    threshold: float = 0.4  # scores at least this are marked in the table

    def __getitem__(self, detector: str) -> Tensor:
        return self.scores[detector]

    def best(self, detector: str) -> tuple[str, int, float]:
        """(layer, head, score) of the head that scores highest on `detector`."""
        table = self.scores[detector]
        flat = int(table.argmax())
        layer, head = divmod(flat, table.shape[1])
        return self.layers[layer], head, float(table[layer, head])

    def __str__(self) -> str:
        width = max(5, *(len(layer) for layer in self.layers))
        lines = [f"{'layer':>{width}}  head  " + "  ".join(f"{d:>9}" for d in DETECTORS)]
        for i, layer in enumerate(self.layers):
            for head in range(self.scores[DETECTORS[0]].shape[1]):
                cells = []
                for d in DETECTORS:
                    value = float(self.scores[d][i, head])
                    cells.append(f"{value:>8.3f}{'*' if value >= self.threshold else ' '}")
                lines.append(f"{layer:>{width}}  {head:>4}  " + "  ".join(cells))
        lines.append(f"* score >= {self.threshold}")
        return "\n".join(lines)


def detect_heads(
    model: Transformer, tokens: TokensOrText | None = None, length: int | None = None, batch: int = 8, seed: int = 0
) -> HeadScores:
    """Score every self-attention head of `model` on `tokens` (token ids or a text; default:
    `repeated_tokens` of half `length`, at most 32 and at most half the context). Encoder-decoder
    models run the tokens through both stacks (`model(tokens, tokens)`); cross-attention is not scored."""
    cfg = model.cfg
    if tokens is None:
        length = length or min(32, cfg.n_ctx // 2)
        tokens = repeated_tokens(cfg.d_vocab, length, batch, seed)
    tokens = as_tokens(model, tokens)
    tokens = tokens if tokens.dim() == 2 else tokens[None]  # (batch, pos)
    device = next(model.parameters()).device
    tokens = tokens.to(device)

    def is_self_pattern(name: str) -> bool:
        return name.endswith(".attn.hook_pattern")

    inputs = (tokens, tokens) if cfg.arch == "encoder-decoder" else (tokens,)
    with torch.no_grad():
        _, cache = model.run_with_cache(*inputs, names_filter=is_self_pattern)
    masks = {d: m.to(device) for d, m in target_masks(tokens).items()}
    queries = {d: q.to(device) for d, q in query_positions(tokens.shape[1]).items()}
    names = list(cache.keys())  # firing order: layer by layer, encoder before decoder
    layers = [name.removesuffix(".attn.hook_pattern").replace("blocks.", "") for name in names]
    scores = {
        d: torch.stack([score(cache[name].float(), masks[d], queries[d]) for name in names]).cpu() for d in DETECTORS
    }  # detector -> (n_layers, n_heads)
    return HeadScores(layers, scores)

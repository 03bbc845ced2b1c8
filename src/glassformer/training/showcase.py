"""What a finished run shows its user: generated text, attention pictures and a trace, or, for the
sequence-to-sequence tasks, how often the model gets whole sequences right."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from glassformer.inspect.attention import plot_attention
from glassformer.inspect.trace import trace
from glassformer.model import Transformer
from glassformer.tokenizer import encode_prompt
from glassformer.training.data import SyntheticData


def sample_text(model: Transformer, tokenizer: Tokenizer, prompt: str, n_tokens: int, seed: int = 0) -> str:
    """Continue `prompt` by `n_tokens` with the KV-cache decoder (temperature 0.8, top-k 40); past
    the context window, the last half-window is re-read and decoding goes on from there."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = list(prompt_ids)
    while len(ids) - len(prompt_ids) < n_tokens:
        context = ids[-(model.cfg.n_ctx // 2) :]
        count = min(model.cfg.n_ctx - len(context), n_tokens - (len(ids) - len(prompt_ids)))
        out = model.generate(
            torch.tensor([context]), count, do_sample=True, temperature=0.8, top_k=40, generator=generator
        )
        ids += out[0, len(context) :].tolist()
    return tokenizer.decode(ids)


def show_text_run(model: Transformer, tokenizer: Tokenizer, run_dir: Path, n_tokens: int = 500) -> str:
    """Write sample.txt, attention.png (patterns over the sample's first tokens) and trace.txt."""
    text = sample_text(model, tokenizer, "\n", n_tokens)
    (run_dir / "sample.txt").write_text(text)
    ids = tokenizer.encode(text).ids[: min(32, model.cfg.n_ctx)]
    labels = [tokenizer.decode([i]) for i in ids]
    tokens = torch.tensor([ids])
    plot_attention(model, tokens, labels, run_dir / "attention.png")
    (run_dir / "trace.txt").write_text(str(trace(model, tokens, position=len(ids) - 1, labels=labels)) + "\n")
    return text


@torch.no_grad()
def seq2seq_accuracy(model: Transformer, data: SyntheticData, n: int = 256, seed: int = 1) -> float:
    """Share of `n` fresh source sequences whose whole target the model decodes right (greedy)."""
    batch = data.batch("val", n, torch.Generator().manual_seed(seed))
    out = model.generate(batch["src"], data.length, decoder_start_token_id=0)[:, 1:]
    return (out == batch["targets"]).all(dim=1).float().mean().item()

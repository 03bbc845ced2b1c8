"""Text in and out: strings <-> token tensors through the model's tokenizer, and generation on text.

`TextIO` gives `Transformer` TransformerLens' helpers (`to_tokens`, `to_str_tokens`, `to_string`,
`to_single_token`); `generate_text` and `stream_text` run the token decoder on a prompt string and
hand back text, stopping at the tokenizer's EOS unless told otherwise.
Legend: batch, pos.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from glassformer.errors import InputError
from glassformer.generate import stream
from glassformer.hooks import HookedRoot
from glassformer.tokenizer import TextTokenizer

Text = str | Sequence[str]


def is_text(x: object) -> bool:
    """A string, or a non-empty list or tuple of strings (never token ids)."""
    return isinstance(x, str) or (isinstance(x, list | tuple) and bool(x) and all(isinstance(t, str) for t in x))


class TextIO:
    """Tokenizer helpers for a model with a `tokenizer` attribute (None: no text, a clear error)."""

    tokenizer: TextTokenizer | None

    def text_tokenizer(self) -> TextTokenizer:
        """The tokenizer, or an InputError saying this model has none."""
        if self.tokenizer is None:
            raise InputError(
                "this model has no tokenizer: give token ids, or open a checkpoint that has one "
                "(a GGUF file, a Hugging Face directory or a glassformer run with tokenizer.json)"
            )
        return self.tokenizer

    def to_tokens(
        self, text: Text, prepend_bos: bool | None = None, return_mask: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Token ids `(batch, pos)` of a string or a list of strings (left-padded to one length);
        `prepend_bos=None` follows the tokenizer (`add_bos_token`). `return_mask=True` also returns
        the attention mask `(batch, pos)`, 1 for real tokens, that a padded batch needs."""
        tokenizer = self.text_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"to_tokens takes a string or a non-empty list of strings, got {text!r}")
        rows = [tokenizer.encode(t, add_bos=prepend_bos) for t in texts]
        if not all(rows):
            raise InputError(f"{texts[[bool(r) for r in rows].index(False)]!r} encodes to no tokens; give some text")
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        device = self.embed.W_E.device
        tokens = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (batch, pos)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (batch, pos)
        return (tokens, mask) if return_mask else tokens

    def to_str_tokens(self, tokens: Text | Tensor | Sequence[int], prepend_bos: bool | None = None) -> Any:
        """One readable string per token: of a string (tokenized first), a `(pos,)` or `(1, pos)`
        tensor or list of ids; a `(batch, pos)` tensor gives a list per row."""
        tokenizer = self.text_tokenizer()
        if isinstance(tokens, str):
            return tokenizer.token_strings(tokenizer.encode(tokens, add_bos=prepend_bos))
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            rows = [tokenizer.token_strings(row.tolist()) for row in tokens]
            return rows[0] if len(rows) == 1 else rows
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return tokenizer.token_strings(ids)

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """The text of `(pos,)` ids, or one text per row of `(batch, pos)`."""
        tokenizer = self.text_tokenizer()
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return [tokenizer.decode(row.tolist()) for row in tokens]
        return tokenizer.decode(tokens.tolist() if isinstance(tokens, Tensor) else list(tokens))

    def to_single_token(self, text: str) -> int:
        """The id of the one token `text` is (an InputError if it is several)."""
        return self.text_tokenizer().token_id(text)


def _until_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    """The ids before the first stop id (the EOS and what padding follows it are not text)."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def _stops(tokenizer: TextTokenizer, options: dict[str, Any]) -> list[int]:
    """The stop ids `generate` uses: the caller's `eos_token_id`, else the tokenizer's EOS."""
    eos = options.setdefault("eos_token_id", tokenizer.eos_token_id)
    return [eos] if isinstance(eos, int) else list(eos or [])


def stream_text(model: HookedRoot, text: Text, max_new_tokens: int, **options: Any) -> Iterator[Any]:
    """Yield the new text as it is decoded: a string per step for one prompt, a list of strings for
    a batch. A step whose token ends inside a UTF-8 character yields "" until the character is whole."""
    tokenizer = model.text_tokenizer()
    tokens, mask = model.to_tokens(text, return_mask=True)
    stops = _stops(tokenizer, options)
    new: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    shown = [""] * tokens.shape[0]
    for step in stream(model, tokens, max_new_tokens, attention_mask=mask, **options):
        pieces = []
        for row, token in enumerate(step.tolist()):
            new[row].append(token)
            decoded = tokenizer.decode(_until_stop(new[row], stops))
            complete = decoded if not decoded.endswith("\ufffd") else shown[row]  # wait for the rest of a character
            pieces.append(complete[len(shown[row]) :])
            shown[row] = complete
        yield pieces[0] if isinstance(text, str) else pieces


def generate_text(model: HookedRoot, text: Text, max_new_tokens: int, **options: Any) -> str | list[str]:
    """The prompt followed by its continuation, as text (one string, or one per prompt of a list);
    the decoding stops at the tokenizer's EOS unless `eos_token_id` says otherwise."""
    prompts = [text] if isinstance(text, str) else list(text)
    new = ["" for _ in prompts]
    for pieces in stream_text(model, prompts, max_new_tokens, **options):
        new = [so_far + piece for so_far, piece in zip(new, pieces, strict=True)]
    out = [prompt + continuation for prompt, continuation in zip(prompts, new, strict=True)]
    return out[0] if isinstance(text, str) else out

"""What the inspection tools take: token ids or text, and the token strings that label their output.

Every entry point of glassformer.inspect that takes tokens also takes a string; `text_input` turns
either into `(batch, pos)` token ids and the readable token strings of the first sequence, so each
tool labels its output the same way. Legend: batch, pos.
"""

from __future__ import annotations

from torch import Tensor

from glassformer.model import Transformer
from glassformer.tokenizer import TextTokenizer

TokensOrText = Tensor | str


def text_input(
    model: Transformer, tokens_or_text: TokensOrText, name: str = "tokens"
) -> tuple[Tensor, list[str] | None]:
    """`(tokens, labels)`: the token ids (see `as_tokens`) and the first sequence's token strings
    when the model has a tokenizer, else None."""
    tokens = as_tokens(model, tokens_or_text, name)
    return tokens, token_labels(model, tokens)


def as_tokens(model: Transformer, tokens_or_text: TokensOrText, name: str = "tokens") -> Tensor:
    """Token ids: a string through the model's tokenizer (`model.to_tokens`, (1, pos) on the model's
    device); a tensor as it is (the model checks it)."""
    if isinstance(tokens_or_text, str):
        return model.to_tokens(tokens_or_text)
    if isinstance(tokens_or_text, Tensor):
        return tokens_or_text
    batch_hint = ""
    if isinstance(tokens_or_text, list | tuple):
        batch_hint = "; for several texts, inspect one at a time (or pass model.to_tokens(texts))"
    raise TypeError(
        f"{name} must be a torch.Tensor of token ids or one str, got {type(tokens_or_text).__name__}{batch_hint}"
    )


def token_labels(model: Transformer, tokens: Tensor, row: int = 0) -> list[str] | None:
    """The token strings of sequence `row` of `tokens` (batch, pos) or (pos,); None without a
    tokenizer, or when the row holds ids the tokenizer does not know (a vocabulary padded past it)."""
    ids = tokens if tokens.dim() == 1 else tokens[row]  # (pos,)
    if model.tokenizer is None or int(ids.max()) >= model.tokenizer.vocab_size:
        return None
    return model.to_str_tokens(ids)


def token_id(model: Transformer, token: int | str, name: str = "token") -> int:
    """A token id given as an int, or as the text of one token (`model.to_single_token`)."""
    if isinstance(token, str):
        return model.to_single_token(token)
    if isinstance(token, bool) or not isinstance(token, int):
        raise TypeError(f"{name} must be a token id (int) or the text of one token (str), got {token!r}")
    return token


def id_strings(tokenizer: TextTokenizer | None, ids: list[int]) -> list[str]:
    """Readable strings of token ids: the tokenizer's, or the id itself without one (or past its vocabulary)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.token_strings([i])[0] if i < tokenizer.vocab_size else str(i) for i in ids]

"""The tokenizer that lives beside a checkpoint: a `tokenizer.json` of the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from glassformer.errors import CheckpointError, InputError


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The checkpoint's `tokenizer.json` (Hugging Face directories and glassformer runs both have one)."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: this checkpoint has no tokenizer to turn text into tokens")
    return Tokenizer.from_file(str(path))


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; an InputError when the tokenizer cannot encode it (a character a
    character-level vocabulary has never seen) or when it encodes to no tokens at all."""
    try:
        ids = tokenizer.encode(text).ids
    except Exception as err:  # the tokenizers library raises a bare Exception
        unknown = unknown_characters(tokenizer, text)
        detail = f"characters not in its vocabulary: {unknown[:10]}" if unknown else str(err)
        raise InputError(f"the tokenizer cannot encode the prompt {text[:40]!r}: {detail}") from None
    if not ids:
        raise InputError(f"the prompt {text!r} encodes to no tokens; give some text")
    return ids


def unknown_characters(tokenizer: Tokenizer, text: str) -> list[str]:
    """The characters of `text` that are not tokens of `tokenizer`'s vocabulary, sorted."""
    return sorted(set(text) - set(tokenizer.get_vocab()))

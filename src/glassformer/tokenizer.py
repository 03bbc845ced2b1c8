"""The tokenizer that lives beside a checkpoint: a `tokenizer.json` of the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from glassformer.errors import CheckpointError


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The checkpoint's `tokenizer.json` (Hugging Face directories and glassformer runs both have one)."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: this checkpoint has no tokenizer to turn text into tokens")
    return Tokenizer.from_file(str(path))

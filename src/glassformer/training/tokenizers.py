"""Character and byte-level BPE tokenizers, both as `tokenizers` objects saved to `tokenizer.json`.

A character tokenizer maps each distinct character of the corpus to an id; text with a character
it has never seen is an error, not a silent drop. Byte-level BPE covers every string.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glassformer.errors import InputError
from glassformer.tokenizer import unknown_characters


def char_tokenizer(text: str) -> Tokenizer:
    """One token per distinct character of `text`, ids in sorted character order."""
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tokenizer.decoder = decoders.Fuse()  # join without spaces
    return tokenizer


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with `vocab_size` tokens, trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as a compact array; characters a char tokenizer lacks are an error."""
    vocab = tokenizer.get_vocab()
    if isinstance(tokenizer.decoder, decoders.Fuse):
        unknown = unknown_characters(tokenizer, text)
        if unknown:
            raise InputError(f"text holds characters the tokenizer has never seen: {unknown[:10]}")
    ids = tokenizer.encode(text).ids
    return np.asarray(ids, dtype=np.uint16 if len(vocab) <= 2**16 else np.uint32)

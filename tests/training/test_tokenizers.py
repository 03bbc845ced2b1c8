"""Tokenizers round-trip text exactly and refuse what they cannot represent."""

import pytest

import glassformer as gf
from glassformer.training.data import read_corpus
from glassformer.training.tokenizers import bpe_tokenizer, char_tokenizer, encode

SHAKESPEARE = read_corpus("tinyshakespeare")


def test_char_tokenizer_round_trips_the_whole_corpus():
    tokenizer = char_tokenizer(SHAKESPEARE)
    ids = encode(tokenizer, SHAKESPEARE)
    assert tokenizer.get_vocab_size() == 65 and len(ids) == len(SHAKESPEARE) and ids.dtype.name == "uint16"
    assert tokenizer.decode(ids.tolist()) == SHAKESPEARE
    assert tokenizer.decode(encode(tokenizer, "  two  spaces\n\n").tolist()) == "  two  spaces\n\n"


def test_char_tokenizer_refuses_unseen_characters():
    with pytest.raises(gf.InputError, match="never seen"):
        encode(char_tokenizer("abc"), "abd")


def test_bpe_round_trips_any_text():
    tokenizer = bpe_tokenizer([SHAKESPEARE[:200_000]], vocab_size=400)
    for text in (SHAKESPEARE[200_000:210_000], "naïve café — 日本語 🙂\t\r\n  trailing "):
        assert tokenizer.decode(encode(tokenizer, text).tolist()) == text
    assert len(encode(tokenizer, SHAKESPEARE[:10_000])) < 10_000 * 0.6  # merges make it shorter

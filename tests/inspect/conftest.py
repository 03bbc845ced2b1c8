"""A tiny decoder with a real tokenizer (byte-level BPE, trained here in a blink), for the text inputs."""

import pytest

import glassformer as gf
from glassformer.tokenizer import TextTokenizer
from glassformer.training.tokenizers import bpe_tokenizer

CORPUS = ["the cat sat on the mat, the dog sat on the log."] * 10


@pytest.fixture(scope="session")
def text_model():
    """A 2-layer decoder, random weights, whose `tokenizer` turns text into its tokens and back."""
    tokenizer = TextTokenizer(backend=bpe_tokenizer(CORPUS, 300))
    cfg = gf.Config(n_layers=2, d_model=16, n_heads=2, d_vocab=tokenizer.vocab_size, n_ctx=32)
    model = gf.Transformer(cfg, seed=0).eval()
    model.tokenizer = tokenizer
    return model

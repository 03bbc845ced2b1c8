"""Fixtures shared across the suite: a tiny chat model (random weights, a real tokenizer, a ChatML
template), so text and chat code run in milliseconds."""

import pytest
from tokenizers import AddedToken

import glassformer as gf
from glassformer.tokenizer import TextTokenizer
from glassformer.training.tokenizers import bpe_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["The cat sat on the mat. The dog sat on the log. Héllo wörld, 日本 🙂 12345!\n"] * 20


def chat_tokenizer() -> TextTokenizer:
    """Byte-level BPE trained on a line, with ChatML's two special tokens and its template."""
    backend = bpe_tokenizer(CORPUS, 400)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    end = backend.token_to_id("<|im_end|>")
    return TextTokenizer(backend, bos_token_id=None, eos_token_id=end, pad_token_id=end, chat_template=CHATML)


@pytest.fixture
def chat_model():
    """A 2-layer rotary decoder with random weights and the chat tokenizer above."""
    tokenizer = chat_tokenizer()
    cfg = gf.Config(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        d_vocab=tokenizer.vocab_size,
        n_ctx=512,
        positional="rotary",
        norm="rmsnorm",
        act="swiglu",
        bias=False,
    )
    model = gf.Transformer(cfg, seed=0).eval()
    model.tokenizer = tokenizer
    return model

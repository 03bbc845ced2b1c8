"""Tokens or text: one helper turns either into token ids and the token strings that label the output."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.inputs import as_tokens, id_strings, text_input, token_id, token_labels

TEXT = "the cat sat on the log"


def test_text_becomes_the_models_tokens_and_its_token_strings(text_model):
    tokens, labels = text_input(text_model, TEXT)
    assert torch.equal(tokens, text_model.to_tokens(TEXT)) and tokens.shape[0] == 1
    assert labels == text_model.to_str_tokens(tokens) and "".join(labels) == TEXT


def test_a_tensor_passes_through_labelled_by_the_tokenizer_when_there_is_one(text_model):
    tokens = text_model.to_tokens(TEXT)
    same, labels = text_input(text_model, tokens)
    assert same is tokens and labels == text_model.to_str_tokens(tokens)
    assert token_labels(text_model, tokens[0]) == labels
    bare = gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=20, n_ctx=8))
    assert text_input(bare, torch.tensor([[1, 2]]))[1] is None
    assert id_strings(None, [3, 4]) == ["3", "4"]


def test_a_model_without_a_tokenizer_refuses_text():
    bare = gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=20, n_ctx=8))
    with pytest.raises(gf.InputError, match="no tokenizer"):
        as_tokens(bare, "hello")


def test_anything_else_is_a_clear_type_error(text_model):
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor of token ids or one str, got list"):
        as_tokens(text_model, ["the cat", "the dog"])
    with pytest.raises(TypeError, match="tgt must be"):
        as_tokens(text_model, 3, "tgt")


def test_token_ids_by_number_or_by_text(text_model):
    cat = text_model.to_single_token(" cat")
    assert token_id(text_model, " cat") == cat and token_id(text_model, 7) == 7
    assert id_strings(text_model.tokenizer, [cat, 10**6]) == [" cat", "1000000"]
    with pytest.raises(gf.InputError, match="not a single token"):
        token_id(text_model, " cat sat")
    with pytest.raises(TypeError, match="target must be a token id"):
        token_id(text_model, 1.5, "target")


def test_ids_past_the_tokenizers_vocabulary_get_no_labels(text_model):
    past = torch.tensor([[1, 2, text_model.tokenizer.vocab_size]])  # a vocabulary padded past the tokenizer's
    assert token_labels(text_model, past) is None and token_labels(text_model, past[:, :2]) is not None

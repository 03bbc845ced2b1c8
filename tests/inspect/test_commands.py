"""`diagram`, `heads` and `html` subcommands, registered on a throwaway argparse parser."""

import argparse

import pytest

import glassformer as gf
from glassformer.inspect.commands import add_commands


def run(argv):
    parser = argparse.ArgumentParser(prog="glassformer")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    gf.Transformer(gf.Config(n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=16), seed=0).save(directory)
    return directory


def test_diagram_from_config_flags(capsys):
    run(["diagram", "--n-layers", "1", "--attn-only", "--d-model", "8", "--n-heads", "2"])
    out = capsys.readouterr().out
    assert out.startswith("graph TD\n")
    assert "blocks.0.attn.hook_pattern" in out and '"(n_heads=2, seqQ, seqK)"' in out
    assert "mlp" not in out and "blocks.1." not in out and "(seq, d_vocab=256)" in out


def test_diagram_of_a_checkpoint_to_a_file(checkpoint, tmp_path, capsys, monkeypatch):
    out_file = tmp_path / "model.mmd"
    monkeypatch.setenv("PATH", str(tmp_path))  # no mmdc anywhere
    run(["diagram", str(checkpoint), "--out", str(out_file), "--render", str(tmp_path / "model.svg")])
    captured = capsys.readouterr()
    text = out_file.read_text()
    assert "blocks.1.mlp.hook_post" in text and "(seq, d_mlp=64)" in text and "d_vocab=20" in text
    assert f"wrote {out_file}" in captured.out
    assert "not rendered" in captured.err and "mmdc" in captured.err  # says so, renders nothing
    assert not (tmp_path / "model.svg").exists()


def test_diagram_refuses_a_checkpoint_and_flags_together(checkpoint):
    with pytest.raises(ValueError, match="not both"):
        run(["diagram", str(checkpoint), "--n-layers", "3"])
    with pytest.raises(gf.CheckpointError, match="does not exist.*expected a GGUF file"):
        run(["diagram", str(checkpoint / "nothing")])


def test_heads_prints_the_table_of_a_checkpoint(checkpoint, capsys):
    run(["heads", str(checkpoint), "--length", "5", "--batch", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "head", "previous", "duplicate", "induction", "first"]
    assert [line.split()[:2] for line in lines[1:5]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]


def test_html_writes_a_page(tmp_path, capsys):
    out = tmp_path / "page.html"
    run(["html", "--prompt", "héllo", "--n-layers", "2", "--out", str(out)])
    text = out.read_text(encoding="utf-8")
    assert "Where each head looks" in text and "blocks.1.attn.hook_pattern" in text
    assert "token 5" in text and f"wrote {out}" in capsys.readouterr().out  # é is two bytes: 6 tokens


def test_html_of_a_checkpoint_uses_its_tokenizer(checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrs ")}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    run(["html", str(checkpoint), "--prompt", "bad cab", "--out", str(tmp_path / "p.html")])
    text = (tmp_path / "p.html").read_text()
    assert '"q":["b","a","d"," ","c","a","b"]' in text and "token 6" in text

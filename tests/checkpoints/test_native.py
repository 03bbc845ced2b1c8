"""Own checkpoint format: bit-identical round trips, atomic writes, and clear errors for bad files."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import glassformer as gf
from glassformer.checkpoints import native

CONFIGS = [
    dict(arch="decoder"),
    dict(arch="decoder", positional="rotary", norm="rmsnorm", act="swiglu", n_kv_heads=1, bias=False),
    dict(arch="encoder", norm_position="post", positional="sinusoidal"),
    dict(arch="encoder-decoder", tie_embeddings=True, attn_only=True),
]


def make(**kw):
    cfg = gf.Config(**{**dict(n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=8), **kw})
    return gf.Transformer(cfg, seed=1).eval()


def snapshot(directory):
    """Every file's name and content hash: to prove a failed load changed nothing."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kw", CONFIGS)
def test_save_load_is_bit_identical(tmp_path, kw):
    model = make(**kw)
    model.save(tmp_path)
    loaded = gf.Transformer.load(tmp_path)
    assert loaded.cfg == model.cfg
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    tokens = torch.randint(0, 20, (2, 6))
    args = (tokens, tokens) if kw["arch"] == "encoder-decoder" else (tokens,)
    with torch.no_grad():
        assert torch.equal(model(*args), loaded(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_equal_models_save_to_equal_bytes(tmp_path):
    """safetensors writes several metadata keys in hash order; glassformer's files are byte-stable."""
    model = make()
    for i in range(6):
        model.save(tmp_path / str(i))
    digests = {hashlib.sha256((tmp_path / str(i) / "model.safetensors").read_bytes()).hexdigest() for i in range(6)}
    assert len(digests) == 1


def test_load_casts_when_asked(tmp_path):
    make().save(tmp_path)
    assert gf.Transformer.load(tmp_path, dtype=torch.float64).embed.W_E.dtype == torch.float64


def rewrite(tmp_path, change):
    """Apply `change` to the saved tensors and write them back, keeping the stored metadata."""
    path = tmp_path / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "messages"),
    [
        (
            lambda t: t.update({"embed.W_E": torch.zeros(21, 16)}),
            ["embed.W_E has shape (21, 16), the config needs (20, 16)"],
        ),
        (lambda t: t.pop("blocks.1.mlp.b_out"), ["missing tensor blocks.1.mlp.b_out (16,)"]),
        (lambda t: t.update({"blocks.0.attn.extra": torch.zeros(3)}), ["unexpected tensor blocks.0.attn.extra (3,)"]),
        (lambda t: t.update({"ln_final.w": torch.ones(16, dtype=torch.int32)}), ["ln_final.w has dtype torch.int32"]),
        (
            lambda t: (t.pop("embed.W_E"), t.update({"unembed.weight": torch.zeros(1)})),
            ["2 problems", "missing tensor embed.W_E", "unembed.weight has shape (1,)"],
        ),
    ],
)
def test_mismatched_tensors_are_all_reported_and_nothing_changes(tmp_path, change, messages):
    make().save(tmp_path)
    rewrite(tmp_path, change)
    before = snapshot(tmp_path)
    with pytest.raises(gf.CheckpointError) as err:
        gf.Transformer.load(tmp_path)
    for message in messages:
        assert message in str(err.value)
    assert snapshot(tmp_path) == before


def test_truncated_file(tmp_path):
    make().save(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    before = snapshot(tmp_path)
    with pytest.raises(gf.CheckpointError, match="not a readable safetensors file"):
        gf.Transformer.load(tmp_path)
    assert snapshot(tmp_path) == before


def test_config_that_does_not_match_the_weights(tmp_path):
    make().save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "act": "relu"}))
    with pytest.raises(gf.CheckpointError, match="differs from the config stored with the weights"):
        gf.Transformer.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_mlp": 32}))
    with pytest.raises(gf.CheckpointError, match="differs"):
        gf.Transformer.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(gf.CheckpointError, match="not valid JSON"):
        gf.Transformer.load(tmp_path)


def test_pickled_weights_are_refused_unless_asked(tmp_path):
    from glassformer.checkpoints.files import read_weights

    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(gf.CheckpointError, match="refuses them unless you pass allow_pickle=True"):
        read_weights(tmp_path)
    assert torch.equal(read_weights(tmp_path, allow_pickle=True)["a"], torch.ones(2))
    torch.save({"a": object()}, tmp_path / "pytorch_model.bin")  # not loadable with weights_only
    with pytest.raises(gf.CheckpointError, match="could not be read safely"):
        read_weights(tmp_path, allow_pickle=True)


def test_missing_directory_contents(tmp_path):
    with pytest.raises(gf.CheckpointError, match="config.json is missing"):
        gf.Transformer.load(tmp_path)


def test_a_crash_while_saving_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old = make()
    old.save(tmp_path)
    before = snapshot(tmp_path)

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make(d_mlp=32).save(tmp_path)
    assert snapshot(tmp_path) == before  # no temporary file left, nothing replaced
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(gf.Transformer.load(tmp_path).embed.W_E, old.embed.W_E)

"""Attention pictures: the patterns they draw, for decoders and encoder-decoders."""

import torch

import glassformer as gf
from glassformer.inspect.attention import patterns, plot_attention


def make(arch):
    return gf.Transformer(gf.Config(arch=arch, n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=12), seed=0)


def test_patterns_are_the_cached_ones_and_causal():
    model = make("decoder")
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    grid = patterns(model, tokens)
    _, cache = model.run_with_cache(tokens)
    assert grid.shape == (2, 2, 5, 5)
    torch.testing.assert_close(grid[1], cache["pattern", 1][0])  # all hooks cached: explicit norms too
    assert torch.all(grid.triu(1) == 0)


def test_encoder_decoder_pictures_show_the_decoder(tmp_path):
    model = make("encoder-decoder")
    src, tgt = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[1, 6, 7]])
    assert patterns(model, src, tgt).shape == (2, 2, 3, 3)
    path = plot_attention(model, src, ["a", "b", "c"], tmp_path / "attention.png", tgt=tgt)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_training_leaves_the_deterministic_setting_as_it_found_it(tmp_path):
    from glassformer.training.trainer import TrainConfig, train

    before = torch.are_deterministic_algorithms_enabled()
    train(
        TrainConfig(
            out_dir=str(tmp_path),
            data="repeat",
            task_vocab=8,
            task_length=4,
            max_steps=2,
            eval_interval=2,
            eval_batches=1,
            checkpoint_interval=2,
            progress=False,
            model=dict(n_layers=1, n_heads=2, d_model=8, n_ctx=8),
        )
    )
    assert torch.are_deterministic_algorithms_enabled() == before

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


def test_text_gives_the_same_patterns_and_token_string_axes(text_model, tmp_path, monkeypatch):
    import matplotlib.axes

    text = "the cat sat on the mat"
    tokens = text_model.to_tokens(text)
    assert torch.equal(patterns(text_model, text), patterns(text_model, tokens))
    ticks = []
    original = matplotlib.axes.Axes.set_xticks

    def record(self, positions, labels=None, **kw):
        ticks.append(labels)
        return original(self, positions, labels, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", record)
    path = plot_attention(text_model, text, None, tmp_path / "attention.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    expected = [repr(t)[1:-1] for t in text_model.to_str_tokens(tokens)]
    assert ticks and all(labels == expected for labels in ticks)  # every head's axes, by token string

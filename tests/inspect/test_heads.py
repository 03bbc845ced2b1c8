"""Head detectors: exact scores on patterns we set, and real induction heads in a trained model."""

import math

import pytest
import torch
import torch.nn.functional as F

import glassformer as gf
from glassformer.inspect.heads import DETECTORS, detect_heads, repeated_tokens, target_masks
from glassformer.training.trainer import TrainConfig, train


def test_repeated_tokens_repeat_and_are_seeded():
    tokens = repeated_tokens(50, 7, batch=3, seed=1, low=1)
    assert tokens.shape == (3, 14) and torch.equal(tokens[:, :7], tokens[:, 7:])
    assert tokens.min() >= 1 and tokens.max() < 50
    assert torch.equal(tokens, repeated_tokens(50, 7, batch=3, seed=1, low=1))
    with pytest.raises(ValueError, match="low"):
        repeated_tokens(5, 3, low=5)


def test_target_masks_on_a_hand_written_sequence():
    masks = target_masks(torch.tensor([[5, 6, 7, 5, 6, 7]]))
    keys = {d: {q: m[0, q].nonzero().flatten().tolist() for q in range(6)} for d, m in masks.items()}
    assert keys["previous"][4] == [3] and keys["first"][4] == [0]
    assert keys["duplicate"] == {0: [], 1: [], 2: [], 3: [0], 4: [1], 5: [2]}  # the previous occurrence
    assert keys["induction"] == {0: [], 1: [], 2: [], 3: [1], 4: [2], 5: [3]}  # the token after it


def forced_pattern(kind):
    """A hook that makes every head of a layer attend exactly where `kind` says."""

    def hook(pattern, hook):  # (batch, n_heads, q_pos, k_pos)
        n = pattern.shape[-1]
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        if kind == "previous":
            target = (k == (q - 1).clamp(min=0)).float()
        elif kind == "first":
            target = (k == 0).float().expand(n, n)
        else:  # induction on an exact repeat of period n/2: key q - n/2 + 1 in the second half, else itself
            target = (k == torch.where(q >= n // 2, q - n // 2 + 1, q)).float()
        return target.expand_as(pattern).clone()

    return hook


@pytest.mark.parametrize("kind", ["previous", "first", "induction"])
def test_detector_reads_the_patterns_the_model_uses(kind):
    model = gf.Transformer(gf.Config(n_layers=2, d_model=16, n_heads=2, d_vocab=1000, n_ctx=32), seed=0)
    tokens = repeated_tokens(1000, 8, batch=2, seed=0)  # no accidental repeats in a vocabulary this large
    assert len(set(tokens[0, :8].tolist())) == 8
    with model.hooks([("blocks.1.attn.hook_pattern", forced_pattern(kind))]):
        scores = detect_heads(model, tokens)
    assert scores.layers == ["0", "1"]
    assert torch.allclose(scores[kind][1], torch.ones(2))
    for other in DETECTORS:
        if other != kind:
            assert scores[other][1].max() < 0.2, other
    assert scores.best(kind)[:1] == ("1",)


def test_table_prints_every_head_and_marks_high_scores():
    model = gf.Transformer(gf.Config(n_layers=2, d_model=16, n_heads=2, d_vocab=50, n_ctx=32), seed=0)
    with model.hooks([("blocks.0.attn.hook_pattern", forced_pattern("previous"))]):
        text = str(detect_heads(model, length=6))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "head", *DETECTORS]
    assert len(lines) == 2 + 4
    assert lines[1].split()[:3] == ["0", "0", "1.000*"]


def test_encoder_decoder_scores_both_stacks():
    model = gf.Transformer(gf.Config(arch="encoder-decoder", n_layers=1, d_model=8, n_heads=2, d_vocab=20, n_ctx=16))
    scores = detect_heads(model, length=4)
    assert scores.layers == ["encoder.0", "decoder.0"] and scores["induction"].shape == (2, 2)


@pytest.mark.slow
def test_a_trained_attention_only_model_grows_induction_heads(tmp_path):
    vocab, length = 64, 16
    result = train(
        TrainConfig(
            out_dir=str(tmp_path),
            data="repeat",
            task_vocab=vocab,
            task_length=length,
            batch_size=32,
            max_steps=1500,
            warmup_steps=20,
            lr=3e-3,
            weight_decay=0.0,
            eval_interval=500,
            eval_batches=2,
            checkpoint_interval=1500,
            progress=False,
            model=dict(n_layers=2, n_heads=4, d_model=64, n_ctx=2 * length, attn_only=True, positional="rotary"),
        )
    )
    model = result.model.eval()
    scores = detect_heads(model, repeated_tokens(vocab, length, batch=16, seed=1, low=1))
    print(scores)
    assert scores["induction"][1].max() >= 0.5  # an induction head in layer 1 …
    assert scores["previous"][0].max() >= 0.4  # … fed by a previous-token head in layer 0
    shorter = detect_heads(model, repeated_tokens(vocab, 10, batch=16, seed=2, low=1))
    assert shorter["induction"][1].max() >= 0.5  # it follows the tokens, not a fixed offset

    tokens = repeated_tokens(vocab, length, batch=64, seed=3, low=1)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)  # (pos,)
    first, second = loss[: length - 1].mean().item(), loss[length:].mean().item()
    print(f"loss: first half {first:.3f}, repeated half {second:.3f}")
    assert first > 0.8 * math.log(vocab - 1)  # random tokens cannot be predicted
    assert second < 0.25 * first  # the repeat can


def test_text_scores_the_same_as_its_tokens(text_model):
    text = "the cat sat on the mat the cat sat on the mat"
    by_text = detect_heads(text_model, text)
    by_tokens = detect_heads(text_model, text_model.to_tokens(text))
    for detector in by_text.scores:
        assert torch.equal(by_text[detector], by_tokens[detector]), detector

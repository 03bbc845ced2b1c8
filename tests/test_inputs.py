"""Bad input gets an error that names the problem, never a stack trace from inside torch."""

import pytest
import torch

import glassformer as gf


def make(arch="decoder"):
    cfg = gf.Config(arch=arch, n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=8)
    return gf.Transformer(cfg, seed=0).eval()


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids, got dtype torch.float32"),
        (torch.tensor([[True, False]]), TypeError, "integer token ids, got dtype torch.bool"),
        ([[1, 2]], TypeError, "torch.Tensor of token ids, got list"),
        (torch.tensor([[1, 20]]), gf.InputError, r"id 20, outside the vocabulary \[0, 20\)"),
        (torch.tensor([[-1, 2]]), gf.InputError, r"id -1, outside the vocabulary"),
        (torch.zeros(1, 9, dtype=torch.long), gf.InputError, "9 positions, longer than the model's n_ctx=8"),
        (torch.zeros(1, 0, dtype=torch.long), gf.InputError, "empty"),
        (torch.zeros(0, 3, dtype=torch.long), gf.InputError, "empty"),
        (torch.zeros(1, 2, 3, dtype=torch.long), gf.InputError, r"\(batch, pos\) or \(pos,\), got shape \(1, 2, 3\)"),
    ],
)
def test_bad_tokens(tokens, error, message):
    with pytest.raises(error, match=message):
        make()(tokens)


def test_a_single_sequence_is_a_batch_of_one():
    model = make()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([3, 4, 5])), model(torch.tensor([[3, 4, 5]])))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(1, 4), r"shape \(1, 4\), expected \(1, 3\)"),
        (torch.tensor([[1, 2, 1]]), "only 1 .* and 0"),
        ([[1, 1, 1]], "torch.Tensor of 1/0, got list"),
    ],
)
def test_bad_attention_mask(mask, message):
    with pytest.raises((gf.InputError, TypeError), match=message):
        make()(torch.tensor([[1, 2, 3]]), attention_mask=mask)


def test_bool_and_float_masks_are_accepted():
    model = make()
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        a = model(tokens, attention_mask=torch.tensor([[True, True, False]]))
        b = model(tokens, attention_mask=torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(a, b)


def test_architecture_argument_mismatches():
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(gf.InputError, match="model\\(src, tgt\\)"):
        make("encoder-decoder")(tokens)
    with pytest.raises(gf.InputError, match="tgt is for encoder-decoder"):
        make("decoder")(tokens, tokens)
    with pytest.raises(gf.InputError, match="tgt"):
        make("encoder-decoder")(tokens, torch.tensor([[1, 99]]))


def test_block_on_a_wrong_residual_shape():
    model = make()
    with pytest.raises(gf.InputError, match=r"\(batch, pos, d_model=16\), got \(2, 3, 15\)"):
        model.blocks[0](torch.zeros(2, 3, 15))


def test_weight_view_assignment_checks_shape():
    model = make()
    with pytest.raises(ValueError, match=r"W_Q expects shape \(2, 16, 8\), got \(2, 8, 16\)"):
        model.blocks[0].attn.W_Q = torch.zeros(2, 8, 16)
    with pytest.raises(AttributeError, match="W_gate does not exist"):
        model.blocks[0].mlp.W_gate = torch.zeros(16, 64)

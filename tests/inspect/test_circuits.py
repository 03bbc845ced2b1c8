"""Composition scores: a brute-force loop over head pairs with dense matrices, and TransformerLens'
`all_composition_scores` on the same weights (skipped where transformer_lens is not installed)."""

import pytest
import torch

import glassformer as gf
from glassformer.inspect.circuits import all_composition_scores, head_labels

SMALL = dict(n_layers=3, d_model=16, n_heads=4, d_vocab=20, n_ctx=8)
LLAMA_LIKE = dict(n_kv_heads=2, positional="rotary", norm="rmsnorm", act="swiglu", bias=False)  # grouped-query


def model_of(**overrides) -> gf.Transformer:
    return gf.Transformer(gf.Config(**{**SMALL, **overrides}), seed=0).eval()


def brute_force(model, kind: str) -> torch.Tensor:
    """Every (earlier head, later head) pair, one dense product at a time."""
    ov, qk = model.OV.AB.detach(), model.QK.AB.detach()  # (n_layers, n_heads, d_model, d_model)
    reader = {"Q": qk, "K": qk.mT, "V": ov}[kind]
    n_layers, n_heads = ov.shape[:2]
    scores = torch.zeros(n_layers, n_heads, n_layers, n_heads)
    for l1 in range(n_layers):
        for h1 in range(n_heads):
            for l2 in range(l1 + 1, n_layers):
                for h2 in range(n_heads):
                    left, right = ov[l1, h1], reader[l2, h2]
                    scores[l1, h1, l2, h2] = torch.linalg.matrix_norm(left @ right) / (
                        torch.linalg.matrix_norm(left) * torch.linalg.matrix_norm(right)
                    )
    return scores


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
@pytest.mark.parametrize("config", [{}, LLAMA_LIKE], ids=["gpt2", "gqa"])
def test_scores_match_a_loop_over_head_pairs(kind, config):
    model = model_of(**config)
    scores = all_composition_scores(model, kind)
    assert scores.shape == (3, 4, 3, 4)
    torch.testing.assert_close(scores, brute_force(model, kind))
    assert scores[:, :, 0].eq(0).all() and scores[1, :, 1].eq(0).all() and scores[2].eq(0).all()
    assert scores[0, :, 1:].gt(0).all() and scores.le(1 + 1e-6).all()  # Cauchy-Schwarz: at most 1


def test_a_head_that_writes_what_a_later_head_reads_scores_one():
    """OV_0 = e0 e1^T and QK_1 = e1 e2^T: the product has the norm of both, so the score is exactly 1."""
    model = model_of(n_layers=2, n_heads=1, d_head=2, bias=False)
    first, second = model.blocks[0].attn, model.blocks[1].attn
    with torch.no_grad():
        for w in (first.W_V, first.W_O, second.W_Q, second.W_K):
            w.zero_()
        first.W_V[0, 0, 0] = 1.0  # reads e0 ...
        first.W_O[0, 0, 1] = 1.0  # ... writes e1
        second.W_Q[0, 1, 0] = 1.0  # queries read e1
        second.W_K[0, 2, 0] = 1.0  # keys read e2
    assert all_composition_scores(model, "Q")[0, 0, 1, 0] == pytest.approx(1.0)
    assert all_composition_scores(model, "K")[0, 0, 1, 0] == pytest.approx(0.0)


def test_head_labels_and_errors():
    model = model_of(n_layers=2, n_heads=2)
    assert head_labels(model) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    with pytest.raises(ValueError, match="kind must be one of"):
        all_composition_scores(model, "O")
    encdec = model_of(arch="encoder-decoder", n_decoder_layers=2)
    with pytest.raises(gf.CircuitError, match="model.decoder"):
        all_composition_scores(encdec, "Q")
    assert all_composition_scores(encdec.decoder, "V").shape == (2, 4, 2, 4)
    assert head_labels(encdec.encoder)[-1] == "L2H3"


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_scores_match_transformer_lens(n_kv_heads):
    """The same attention weights in a TransformerLens HookedTransformer give the same three score tensors."""
    tl = pytest.importorskip("transformer_lens")
    model = model_of(n_kv_heads=n_kv_heads)
    cfg = tl.HookedTransformerConfig(
        n_layers=3, d_model=16, n_heads=4, d_head=4, n_ctx=8, d_vocab=20, act_fn="gelu", device="cpu",
        n_key_value_heads=None if n_kv_heads == 4 else n_kv_heads,
    )  # fmt: skip
    hooked = tl.HookedTransformer(cfg)
    with torch.no_grad():
        for ours, theirs in zip(model.blocks, hooked.blocks, strict=True):
            grouped = n_kv_heads != 4  # TransformerLens keeps a grouped model's K/V heads as _W_K/_W_V
            theirs.attn.W_Q.copy_(ours.attn.W_Q)
            theirs.attn.W_O.copy_(ours.attn.W_O)
            (theirs.attn._W_K if grouped else theirs.attn.W_K).copy_(ours.attn.W_K)
            (theirs.attn._W_V if grouped else theirs.attn.W_V).copy_(ours.attn.W_V)
    for kind in "QKV":
        torch.testing.assert_close(all_composition_scores(model, kind), hooked.all_composition_scores(kind))
    assert head_labels(model) == hooked.all_head_labels()

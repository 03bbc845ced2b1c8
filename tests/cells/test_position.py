"""Tests of positional encodings (cells/position.py): learned W_pos, the sinusoidal table, and rotary
(rotate-half layout, partial rotary, positions from the padding mask)."""

from __future__ import annotations

import math

import pytest
import torch

import glassformer as gf

BATCH, POS, N_CTX = 2, 5, 16


def make_model(**overrides) -> gf.Transformer:
    base = dict(d_model=12, n_layers=1, n_heads=2, d_head=6, d_vocab=11, n_ctx=N_CTX)
    return gf.Transformer(gf.Config(**{**base, **overrides}), seed=0).eval()


def cached_run(model: gf.Transformer, **kwargs):
    toks = torch.randint(0, model.cfg.d_vocab, (BATCH, POS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.run_with_cache(toks, **kwargs)[1]


def sinusoid(n_pos: int, d_model: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    return torch.tensor(
        [
            [(math.sin if j % 2 == 0 else math.cos)(p / 10000 ** ((j - j % 2) / d_model)) for j in range(d_model)]
            for p in range(n_pos)
        ]
    )


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """x (batch, pos, heads, d_head): x*cos + rotate_half(x)*sin on the first rotary_dim dims,
    rotate_half(x) = cat(-x2, x1), inv_freq = base^(-2i/rotary_dim)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.double()[..., None] * inv_freq  # (batch, pos, rotary_dim/2)
    cos = torch.cat([angles.cos()] * 2, -1)[:, :, None]  # (batch, pos, 1, rotary_dim)
    sin = torch.cat([angles.sin()] * 2, -1)[:, :, None]
    rot, rest = x.double()[..., :rotary_dim], x.double()[..., rotary_dim:]
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    return torch.cat([rot * cos + torch.cat([-x2, x1], -1) * sin, rest], -1).float()


def test_learned_positions():
    """Learned: W_pos is (n_ctx, d_model) and hook_pos_embed (batch, pos, d_model) = W_pos[:pos]."""
    model = make_model(positional="learned")
    assert model.pos_embed.W_pos.shape == (N_CTX, 12)
    cache = cached_run(model)
    assert cache["hook_pos_embed"].shape == (BATCH, POS, 12)
    torch.testing.assert_close(cache["hook_pos_embed"], model.pos_embed.W_pos.detach()[:POS].expand(BATCH, POS, 12))


@pytest.mark.parametrize("d_model", [12, 7])
def test_sinusoidal_positions(d_model):
    """Sinusoidal: hook_pos_embed is the fixed table of 'Attention Is All You Need' (odd d_model too)."""
    model = make_model(positional="sinusoidal", d_model=d_model, d_head=None, n_heads=1)
    cache = cached_run(model)
    assert cache["hook_pos_embed"].shape == (BATCH, POS, d_model)
    torch.testing.assert_close(cache["hook_pos_embed"], sinusoid(POS, d_model).expand(BATCH, POS, d_model))


def test_positions_count_real_tokens_under_left_padding():
    """With a padding mask, hook_pos_embed of a left-padded row starts at position 0 at the first real
    token."""
    model = make_model(positional="learned")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = cached_run(model, attention_mask=mask)
    W_pos = model.pos_embed.W_pos.detach()
    torch.testing.assert_close(cache["hook_pos_embed"][0, 2:], W_pos[:3])
    torch.testing.assert_close(cache["hook_pos_embed"][1], W_pos[:5])


@pytest.mark.parametrize("rotary_dim", [6, 4, 2])
@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_rotary_rotates_q_and_k(rotary_dim, n_kv_heads):
    """hook_rot_q/hook_rot_k have the shapes of hook_q/hook_k and equal the rotate-half rotation of
    them; dims past rotary_dim (partial rotary) are left untouched."""
    model = make_model(positional="rotary", rotary_dim=rotary_dim, n_kv_heads=n_kv_heads, rotary_base=100.0)
    cache = cached_run(model)
    positions = torch.arange(POS).expand(BATCH, POS)
    assert cache["blocks.0.attn.hook_rot_q"].shape == (BATCH, POS, 2, 6)
    assert cache["blocks.0.attn.hook_rot_k"].shape == (BATCH, POS, n_kv_heads, 6)
    for name in ("q", "k"):
        plain, rotated = cache[f"blocks.0.attn.hook_{name}"], cache[f"blocks.0.attn.hook_rot_{name}"]
        torch.testing.assert_close(rotated, rope(plain, positions, rotary_dim, 100.0))
        assert torch.equal(rotated[..., rotary_dim:], plain[..., rotary_dim:])
    assert "hook_pos_embed" not in model.hook_dict


def test_rotary_uses_positions_from_the_mask():
    """Under left padding, a row's rotary positions count its real tokens from 0."""
    model = make_model(positional="rotary")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = cached_run(model, attention_mask=mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    q, rot_q = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_rot_q"]
    torch.testing.assert_close(rot_q[:, :], rope(q, positions, 6, 10000.0))
    torch.testing.assert_close(rot_q[0, 2], q[0, 2])  # first real token: position 0, no rotation


def test_rotary_scores_depend_only_on_relative_position():
    """The defining property of rotary: the dot product of a rotated q at m and a rotated k at n
    depends on m - n only."""
    model = make_model(positional="rotary", n_heads=1, d_head=8, d_model=8)
    rotary = model.blocks[0].attn.rotary
    q, k = torch.randn(1, 1, 1, 8).expand(1, 8, 1, 8), torch.randn(1, 1, 1, 8).expand(1, 8, 1, 8)
    rq, rk = rotary(q, None)[0, :, 0], rotary(k, None)[0, :, 0]  # (pos, d_head)
    scores = rq @ rk.T  # (m, n)
    for offset in range(-3, 4):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 2)[0])

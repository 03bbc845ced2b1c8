"""Tests of positional encodings (cells/position.py): learned W_pos, the sinusoidal table, and rotary
(rotate-half layout, partial rotary, positions from the padding mask)."""

from __future__ import annotations

import math

import pytest
import torch

import glassformer as gf
from glassformer.cells.position import Rotary, signs

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


# Rotary scaling variants against transformers' own rotary (LlamaRotaryEmbedding with that rope type),
# at positions up to 4x the pre-training context. Each entry: (transformers rope_parameters, ours).
ORIGINAL, HEAD = 32, 16
LONG_FACTORS = [1.0 + 0.5 * i for i in range(HEAD // 2)]
SHORT_FACTORS = [1.0 + 0.05 * i for i in range(HEAD // 2)]
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    "dynamic": (
        {"rope_type": "dynamic", "factor": 4.0},
        {"type": "dynamic", "factor": 4.0, "original_n_ctx": ORIGINAL},
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
        {"type": "yarn", "factor": 4.0, "original_n_ctx": ORIGINAL},
    ),
    "yarn-mscale": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16.0}
        | {"mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
        {"type": "yarn", "factor": 4.0, "original_n_ctx": ORIGINAL, "beta_fast": 16.0}
        | {"mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    ),
    "llama3": (
        {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
        | {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
        {"type": "llama3", "factor": 4.0, "original_n_ctx": ORIGINAL, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),
    "longrope": (
        {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL}
        | {"short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS},
        {"type": "longrope", "original_n_ctx": ORIGINAL, "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS},
    ),
}


def hf_rotary(rope_parameters: dict, max_positions: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=4 * HEAD,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 500.0, **rope_parameters},
    )
    return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)


def scaled_rotary(scaling: dict, n_ctx: int) -> Rotary:
    cfg = gf.Config(d_model=4 * HEAD, n_layers=1, n_heads=4, d_vocab=11, n_ctx=n_ctx, positional="rotary")
    return Rotary(cfg, base=500.0, scaling=scaling)


@pytest.mark.parametrize("variant", list(SCALINGS))
@pytest.mark.parametrize("length", [ORIGINAL // 2, ORIGINAL, 4 * ORIGINAL])
def test_rotary_scaling_matches_transformers(variant, length):
    """cos and sin (attention factor included; ours carries the rotation's sign, `signs`) of every
    variant equal transformers' for a sequence of `length` positions, short or past the pre-training
    context (dynamic NTK and LongRoPE change with it)."""
    theirs, ours = SCALINGS[variant]
    n_ctx = 4 * ORIGINAL
    hf = hf_rotary(theirs, ORIGINAL if variant == "dynamic" else n_ctx)  # dynamic: transformers' max is the original
    rotary = scaled_rotary(ours, n_ctx)
    x = torch.zeros(2, length, 1, HEAD)
    positions = torch.arange(length).expand(2, length)
    with torch.no_grad():
        cos, sin = hf(x, positions)  # (batch, pos, d_head)
    for given in (positions, None):
        our_cos, our_sin = rotary.cos_sin(x, given)
        assert (our_cos.squeeze(-2) - cos).abs().max() <= 1e-5
        assert (our_sin.squeeze(-2) * signs(HEAD, interleaved=False).float() - sin).abs().max() <= 1e-5


def test_rotary_scaling_tables_are_the_unscaled_ones_when_no_scaling_is_asked_for():
    """`Rotary(cfg, base, scaling)` overrides the config's (Gemma 3's local and global layers);
    type "default" means no scaling even when the config scales."""
    cfg = gf.Config(d_model=12, n_layers=1, n_heads=2, d_vocab=11, n_ctx=N_CTX, positional="rotary")
    scaled = gf.Config(**{**cfg.to_dict(), "rotary_scaling": {"type": "linear", "factor": 2.0}})
    plain = Rotary(cfg)
    assert torch.equal(Rotary(scaled, scaling={"type": "default"}).cos, plain.cos)
    assert torch.equal(Rotary(cfg, scaling={"type": "linear", "factor": 2.0}).cos, Rotary(scaled).cos)
    torch.testing.assert_close(Rotary(cfg, base=100.0).cos[3, 1], torch.tensor(math.cos(3 / 100 ** (1 / 3))))
    with pytest.raises(ValueError, match="Rotary\\(scaling=...\\).*'factor'"):
        Rotary(cfg, scaling={"type": "linear"})


def test_interleaved_rotary_matches_gpt_j():
    """rotary_interleaved rotates neighbouring pairs (x0, x1), (x2, x3)…: transformers' GPT-J rotation."""
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    model = make_model(positional="rotary", rotary_dim=4, rotary_interleaved=True)
    cache = cached_run(model)
    sincos = gptj.create_sinusoidal_positions(N_CTX, 4)[:POS].expand(BATCH, POS, 4)  # (batch, pos, rotary_dim)
    sin, cos = sincos.chunk(2, dim=-1)
    for name in ("q", "k"):
        plain = cache[f"blocks.0.attn.hook_{name}"]
        expected = torch.cat([gptj.apply_rotary_pos_emb(plain[..., :4], sin, cos), plain[..., 4:]], dim=-1)
        torch.testing.assert_close(cache[f"blocks.0.attn.hook_rot_{name}"], expected)

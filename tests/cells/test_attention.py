"""Tests of the attention cell (cells/attention.py): hook shapes for MHA/GQA/MQA, self- and
cross-attention; weight views; and, over random configurations, the fused SDPA path == the explicit
path == the per-head result path == a naive float64 reference written here (masks, rotary, GQA)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import glassformer as gf
from glassformer.cells.attention import Attention, AttentionMask
from glassformer.cells.position import Rotary

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def make_cfg(**overrides) -> gf.Config:
    base = dict(d_model=12, n_layers=1, n_heads=4, d_head=5, d_vocab=11, n_ctx=16)
    return gf.Config(**{**base, **overrides})


@torch.no_grad()
def make_attention(cfg: gf.Config, causal: bool, seed: int = 0, window: int | None = None) -> Attention:
    """A standalone attention cell with O(1) random weights and biases."""
    rotary = Rotary(cfg) if cfg.positional == "rotary" else None
    attn = Attention(cfg, causal=causal, rotary=rotary, window=window).eval()
    gen = torch.Generator().manual_seed(seed)
    for param in attn.parameters():
        param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return attn


def capture(hook, store: dict, key: str) -> None:
    """Attach a hook that records the activation under `key` and leaves it unchanged."""
    hook.add(lambda x, _hook: store.__setitem__(key, x.detach().clone()))


def run(
    attn: Attention, x, mask=None, positions=None, kv_input=None, watch=(), score_bias=None
) -> tuple[torch.Tensor, dict]:
    """Output of the cell, with the named hook points (e.g. "hook_pattern") recorded; hooks are
    cleared afterwards so the next call starts on the fused path again."""
    store: dict[str, torch.Tensor] = {}
    for name in watch:
        capture(getattr(attn, name), store, name)
    try:
        with torch.no_grad():
            out = attn(x, mask=mask, positions=positions, kv_input=kv_input, score_bias=score_bias)
    finally:
        for name in watch:
            getattr(attn, name).clear()
    return out, store


def ref_rope(x: torch.Tensor, positions: torch.Tensor, cfg: gf.Config) -> torch.Tensor:
    """Rotate-half rotary: x (batch, pos, d_head) at positions (batch, pos); x*cos + rotate_half(x)*sin."""
    rd = cfg.rotary_dim
    inv_freq = cfg.rotary_base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    angles = positions.double()[..., None] * inv_freq  # (batch, pos, rd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    return torch.cat([rot * cos + torch.cat([-x2, x1], -1) * sin, rest], -1)


def ref_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in float64."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.detach().double()


def ref_attention(attn: Attention, cfg: gf.Config, x, kv, causal, key_valid=None, positions=None, score_bias=None):
    """Naive float64 attention from the TransformerLens weights, one query head at a time; head h
    reads key/value head h // (n_heads / n_kv_heads). With the config's q/k RMSNorm, sliding window,
    score scale, additive score bias (1, heads, q, k) and soft-cap. Returns (output, pattern (batch, heads, q, k))."""
    W_Q, W_K, W_V, W_O = (w.detach().double() for w in (attn.W_Q, attn.W_K, attn.W_V, attn.W_O))

    def bias(name: str, w: torch.Tensor) -> torch.Tensor:  # (heads, d_head); zero without biases
        b = getattr(attn, name)
        return b.detach().double() if cfg.bias else torch.zeros(w.shape[0], w.shape[2], dtype=torch.float64)

    def project(inp, W, b, norm):  # (batch, pos, heads, d_head), through the q/k norm if any
        out = torch.einsum("bpd,hde->bphe", inp, W) + b
        if cfg.qk_norm == "head":
            out = ref_norm(out, norm.w, cfg.eps)
        elif cfg.qk_norm == "projection":
            out = ref_norm(out.flatten(2), norm.w, cfg.eps).view_as(out)
        return out

    x, kv = x.double(), kv.double()
    Q = project(x, W_Q, bias("b_Q", W_Q), attn.q_norm)
    K = project(kv, W_K, bias("b_K", W_K), attn.k_norm)
    V = torch.einsum("bpd,hde->bphe", kv, W_V) + bias("b_V", W_V)
    batch, q_len, k_len = x.shape[0], x.shape[1], kv.shape[1]
    allowed = torch.ones(batch, q_len, k_len, dtype=torch.bool)
    if causal:  # queries are the last q_len of the k_len positions
        allowed &= torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        if attn.window is not None:  # and see only the last `window` keys, themselves included
            allowed &= ~torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len - attn.window)
    if key_valid is not None:
        allowed &= key_valid[:, None, :]
    allowed |= ~allowed.any(-1, keepdim=True)  # a query that sees nothing may see everything
    scale = 1 / math.sqrt(cfg.d_head) if cfg.attn_scale is None else cfg.attn_scale
    out = torch.zeros(batch, q_len, cfg.d_model, dtype=torch.float64)
    patterns = []
    for h in range(cfg.n_heads):
        g = h // cfg.n_groups
        q, k, v = Q[:, :, h], K[:, :, g], V[:, :, g]
        if cfg.positional == "rotary":
            q, k = ref_rope(q, positions, cfg), ref_rope(k, positions, cfg)
        scores = q @ k.transpose(1, 2) * scale
        if score_bias is not None:
            scores = scores + score_bias[:, h].double()
        if cfg.attn_softcap is not None:
            scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (batch, q_pos, k_pos)
        patterns.append(pattern)
        out += pattern @ v @ W_O[h]
    if cfg.bias:
        out += attn.b_O.detach().double()
    return out, torch.stack(patterns, 1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    expected = expected.to(actual.dtype)
    scale = max([1.0, *expected.abs().flatten().tolist()])
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


# ----------------------------------------------------------------------------------------------
# Group 1: shapes
# ----------------------------------------------------------------------------------------------

ALL_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result")


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_self_attention_hook_shapes(n_kv_heads, positional):
    """q/rot_q/z (batch, pos, n_heads, d_head); k/v/rot_k (batch, pos, n_kv_heads, d_head);
    scores/pattern (batch, n_heads, pos, pos); result (batch, pos, n_heads, d_model); output like x."""
    cfg = make_cfg(n_kv_heads=n_kv_heads, positional=positional, rotary_dim=4 if positional == "rotary" else None)
    attn = make_attention(cfg, causal=True)
    B, P, H, dh, D = 2, 3, 4, 5, 12
    watch = ALL_HOOKS + (("hook_rot_q", "hook_rot_k") if positional == "rotary" else ())
    out, acts = run(attn, torch.randn(B, P, D), watch=watch)
    expected = {
        "hook_q": (B, P, H, dh),
        "hook_rot_q": (B, P, H, dh),
        "hook_k": (B, P, n_kv_heads, dh),
        "hook_v": (B, P, n_kv_heads, dh),
        "hook_rot_k": (B, P, n_kv_heads, dh),
        "hook_attn_scores": (B, H, P, P),
        "hook_pattern": (B, H, P, P),
        "hook_z": (B, P, H, dh),
        "hook_result": (B, P, H, D),
    }
    assert {name: tuple(acts[name].shape) for name in watch} == {name: expected[name] for name in watch}
    assert out.shape == (B, P, D)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cross_attention_hook_shapes(n_kv_heads):
    """In cross-attention k/v span the source (k_pos = source length), q/z/result the target."""
    cfg = make_cfg(n_kv_heads=n_kv_heads)
    attn = make_attention(cfg, causal=False)
    B, P, K, H, dh, D = 2, 3, 6, 4, 5, 12
    out, acts = run(attn, torch.randn(B, P, D), kv_input=torch.randn(B, K, D), watch=ALL_HOOKS)
    assert acts["hook_q"].shape == (B, P, H, dh)
    assert acts["hook_k"].shape == acts["hook_v"].shape == (B, K, n_kv_heads, dh)
    assert acts["hook_attn_scores"].shape == acts["hook_pattern"].shape == (B, H, P, K)
    assert acts["hook_z"].shape == (B, P, H, dh)
    assert acts["hook_result"].shape == (B, P, H, D)
    assert out.shape == (B, P, D)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_weight_view_shapes(n_kv_heads):
    """W_Q (n_heads, d_model, d_head), W_K/W_V (n_kv_heads, d_model, d_head), W_O (n_heads, d_head,
    d_model), b_Q (n_heads, d_head), b_K/b_V (n_kv_heads, d_head), b_O (d_model,)."""
    attn = make_attention(make_cfg(n_kv_heads=n_kv_heads), causal=True)
    assert attn.W_Q.shape == (4, 12, 5)
    assert attn.W_K.shape == attn.W_V.shape == (n_kv_heads, 12, 5)
    assert attn.W_O.shape == (4, 5, 12)
    assert attn.b_Q.shape == (4, 5)
    assert attn.b_K.shape == attn.b_V.shape == (n_kv_heads, 5)
    assert attn.b_O.shape == (12,)


def test_hooks_see_the_projections_of_the_weights():
    """hook_q/k/v hold x @ W_Q + b_Q etc. per head, and hook_result holds z @ W_O[h] per head."""
    cfg = make_cfg(n_kv_heads=2)
    attn = make_attention(cfg, causal=True)
    x = torch.randn(2, 3, 12)
    _, acts = run(attn, x, watch=("hook_q", "hook_k", "hook_v", "hook_z", "hook_result"))
    with torch.no_grad():
        assert_close(acts["hook_q"], torch.einsum("bpd,hde->bphe", x, attn.W_Q) + attn.b_Q)
        assert_close(acts["hook_k"], torch.einsum("bpd,hde->bphe", x, attn.W_K) + attn.b_K)
        assert_close(acts["hook_v"], torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V)
        assert_close(acts["hook_result"], torch.einsum("bphe,hem->bphm", acts["hook_z"], attn.W_O))


def test_zeroing_W_O_in_place_zeroes_the_output():
    """An in-place W_O.zero_() (with b_O zeroed) through the view makes the cell's output zero."""
    attn = make_attention(make_cfg(), causal=True)
    x = torch.randn(2, 3, 12)
    assert run(attn, x)[0].abs().max() > 0
    with torch.no_grad():
        attn.W_O.zero_()
        attn.b_O.zero_()
    assert torch.equal(run(attn, x)[0], torch.zeros(2, 3, 12))


def test_weight_view_assignment_checks_shape_and_copies():
    """Assigning `attn.W_K = t` copies t in (visible in the output); a wrong shape is a ValueError."""
    attn = make_attention(make_cfg(n_kv_heads=2), causal=True)
    x = torch.randn(1, 4, 12)
    before = run(attn, x)[0]
    new = torch.randn(2, 12, 5)
    attn.W_K = new
    torch.testing.assert_close(attn.W_K, new, atol=0, rtol=0)
    assert not torch.allclose(run(attn, x)[0], before)
    with pytest.raises(ValueError, match="W_K"):
        attn.W_K = torch.randn(4, 12, 5)


# ----------------------------------------------------------------------------------------------
# Group 2: fused == explicit == result == naive reference, over random configurations
# ----------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    """(cfg, causal, window, x, kv_input or None, key_valid or None, positions or None, score_bias or None)."""
    n_heads = draw(st.integers(1, 4))
    d_head = draw(st.integers(2, 8))
    cross = draw(st.booleans())
    rotary = not cross and draw(st.booleans())
    cfg = gf.Config(
        d_model=draw(st.integers(2, 12)),
        n_layers=1,
        n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0])),
        d_head=d_head,
        d_vocab=5,
        n_ctx=16,
        positional="rotary" if rotary else "none",
        rotary_dim=draw(st.sampled_from(range(d_head - d_head % 2, 1, -2))) if rotary else None,  # full first
        bias=draw(st.booleans()),
        qk_norm=draw(st.sampled_from(["none", "head", "projection"])),
        attn_scale=draw(st.sampled_from([None, 0.3])),
        attn_softcap=draw(st.sampled_from([None, 0.7, 5.0])),
    )
    causal = not cross and draw(st.booleans())
    window = draw(st.sampled_from([None, 1, 2, 4])) if causal else None
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    batch, q_len = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    k_len = draw(st.integers(1, 6)) if cross else q_len
    x = torch.randn(batch, q_len, cfg.d_model, generator=gen)
    kv_input = torch.randn(batch, k_len, cfg.d_model, generator=gen) if cross else None
    key_valid = None
    if draw(st.booleans()):
        key_valid = torch.rand(batch, k_len, generator=gen) < 0.7
    positions = None
    if rotary:  # positions that count real tokens, as the model derives them from a padding mask
        valid = key_valid if key_valid is not None else torch.ones(batch, k_len, dtype=torch.bool)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    score_bias = torch.randn(1, n_heads, q_len, k_len, generator=gen) if draw(st.booleans()) else None
    return cfg, causal, window, x, kv_input, key_valid, positions, score_bias


@settings(max_examples=60, deadline=None)
@given(case=attention_cases(), seed=st.integers(0, 2**16))
def test_fused_explicit_result_and_reference_agree(case, seed):
    """For MHA/GQA/MQA, causal or not, self- or cross-attention, with or without key padding and
    rotary, with or without an additive score bias (T5's relative positions): the fused SDPA output,
    the explicit path (forced by hooking hook_pattern or only hook_attn_scores), the per-head result
    path and a naive float64 reference agree to float32 rounding; the explicit path's pattern equals
    the reference pattern."""
    cfg, causal, window, x, kv_input, key_valid, positions, score_bias = case
    attn = make_attention(cfg, causal, seed, window)
    mask = AttentionMask(key_valid)
    expected, expected_pattern = ref_attention(
        attn, cfg, x, x if kv_input is None else kv_input, causal, key_valid, positions, score_bias
    )
    args = dict(mask=mask, positions=positions, kv_input=kv_input, score_bias=score_bias)
    fused, _ = run(attn, x, **args)
    explicit, acts = run(attn, x, watch=("hook_pattern",), **args)
    via_scores, _ = run(attn, x, watch=("hook_attn_scores",), **args)
    with_result, _ = run(attn, x, watch=("hook_result",), **args)
    for out in (fused, explicit, via_scores, with_result):
        assert_close(out, expected)
    assert_close(acts["hook_pattern"], expected_pattern)


@settings(max_examples=40, deadline=None)
@given(case=attention_cases(), seed=st.integers(0, 2**16))
def test_pattern_is_a_masked_distribution(case, seed):
    """Each pattern row sums to one, is exactly zero on masked keys (future or padding) and finite;
    scores are -inf exactly where the pattern is masked (an additive score bias included)."""
    cfg, causal, window, x, kv_input, key_valid, positions, score_bias = case
    attn = make_attention(cfg, causal, seed, window)
    watch = ("hook_attn_scores", "hook_pattern")
    _, acts = run(attn, x, AttentionMask(key_valid), positions, kv_input, watch, score_bias)
    pattern, scores = acts["hook_pattern"], acts["hook_attn_scores"]
    assert torch.isfinite(pattern).all()
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    q_len, k_len = pattern.shape[-2:]
    allowed = torch.ones(pattern.shape[0], 1, q_len, k_len, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(q_len, k_len, dtype=torch.bool).tril()
        if window is not None:
            allowed &= ~torch.ones(q_len, k_len, dtype=torch.bool).tril(-window)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    allowed |= ~allowed.any(-1, keepdim=True)
    allowed = allowed.expand_as(pattern)
    assert (pattern[~allowed] == 0).all()
    assert torch.isneginf(scores[~allowed]).all() and torch.isfinite(scores[allowed]).all()


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_equals_multi_head_with_shared_kv(n_kv_heads, padded):
    """GQA/MQA (fused SDPA and explicit) equals plain multi-head attention whose K/V weights repeat
    each key/value head for its group of n_heads / n_kv_heads consecutive query heads."""
    cfg = make_cfg(n_kv_heads=n_kv_heads)
    gqa = make_attention(cfg, causal=True, seed=1)
    mha = make_attention(make_cfg(), causal=True, seed=2)
    group = 4 // n_kv_heads
    with torch.no_grad():
        for name in ("W_Q", "b_Q", "W_O", "b_O"):
            getattr(mha, name).copy_(getattr(gqa, name))
        for name in ("W_K", "W_V", "b_K", "b_V"):
            getattr(mha, name).copy_(getattr(gqa, name).repeat_interleave(group, dim=0))
    x = torch.randn(2, 5, 12)
    mask = AttentionMask(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool() if padded else None)
    expected, _ = run(mha, x, mask)
    assert_close(run(gqa, x, mask)[0], expected)
    assert_close(run(gqa, x, mask, watch=("hook_pattern",))[0], expected)

"""Tests of `Transformer` (model.py): hook names and shapes for every architecture, weights under
TransformerLens names, and invariants over random configurations (fused path == explicit path ==
a naive reference written here, padding, causality, encoder-decoder wiring).

The reference forward (`ref_logits`) is deliberately independent of the library's cells: it reads
only the TransformerLens-shaped weights (W_E, W_pos, W_Q, ..., W_U) and recomputes everything in
float64 with plain loops and matmuls, so it checks the wiring as well as the arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glassformer as gf

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

BATCH, SRC_LEN, TGT_LEN = 2, 5, 3  # all distinct, so a swapped dimension cannot go unnoticed

# d_model (12) != n_heads * d_head (20) and d_mlp (7) is odd: every size in a shape is telling.
BASE = dict(d_model=12, n_layers=2, n_heads=4, d_head=5, d_mlp=7, d_vocab=11, n_ctx=16)

ZOO = {
    "decoder-gpt2": dict(arch="decoder", positional="learned", norm="layernorm", act="gelu_new"),
    "decoder-llama-gqa": dict(positional="rotary", norm="rmsnorm", act="swiglu", n_kv_heads=2, bias=False, d_head=6),
    "decoder-mqa-partial-rotary": dict(positional="rotary", rotary_dim=2, n_kv_heads=1),
    "decoder-postnorm-sinusoidal": dict(norm_position="post", positional="sinusoidal", act="relu"),
    "decoder-attn-only-nonorm": dict(attn_only=True, norm="none", positional="none", tie_embeddings=True),
    "decoder-attn-only-postnorm-rms": dict(attn_only=True, norm="rmsnorm", norm_position="post"),
    "encoder-bert": dict(arch="encoder", norm_position="post", positional="learned"),
    "encoder-rotary-gqa": dict(arch="encoder", positional="rotary", n_kv_heads=2, act="silu", d_head=4),
    "encdec-marian": dict(arch="encoder-decoder", positional="sinusoidal", norm_position="post", act="silu"),
    "encdec-gqa-swiglu": dict(
        arch="encoder-decoder", n_decoder_layers=1, n_kv_heads=1, act="swiglu", norm="rmsnorm", bias=False
    ),
    "encdec-rotary-attn-only": dict(arch="encoder-decoder", positional="rotary", attn_only=True, d_head=4, norm="none"),
    "decoder-neox-parallel": dict(parallel_attn_mlp=True, positional="rotary", rotary_dim=2),
    "encoder-bert-full": dict(
        arch="encoder", norm_position="post", embed_norm=True, n_token_types=2, head_transform=True
    ),
    "encdec-bart-embed-norm": dict(arch="encoder-decoder", norm_position="post", embed_norm=True, embed_scale=2.0),
}

ATTN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result")
RESIDUAL_HOOKS = {
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_mid_cross",
    "hook_resid_post",
    "hook_attn_out",
    "hook_cross_attn_out",
    "hook_mlp_out",
    "hook_normalized",
    "hook_token_type_embed",
    "hook_transformed",
}


def make_cfg(**overrides) -> gf.Config:
    return gf.Config(**{**BASE, **overrides})


def make_model(cfg: gf.Config, seed: int = 0) -> gf.Transformer:
    return gf.Transformer(cfg, seed=seed).eval()


@torch.no_grad()
def randomize(model: gf.Transformer, seed: int) -> gf.Transformer:
    """Overwrite every parameter with O(1) random values (the library's init zeroes biases and sets
    norm gains to one, which would hide mistakes in how they are applied)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith(".w"):  # norm gains
            param.copy_(1.0 + 0.2 * noise)
        elif param.dim() == 1:  # biases
            param.copy_(0.3 * noise)
        else:
            param.copy_(0.4 * noise)
    return model


def random_tokens(cfg: gf.Config, batch: int, pos: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.d_vocab, (batch, pos), generator=gen)


def model_inputs(cfg: gf.Config, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """`(tokens,)` or, for encoder-decoder, `(src, tgt)` of the standard test sizes."""
    src = random_tokens(cfg, BATCH, SRC_LEN, seed)
    if cfg.arch == "encoder-decoder":
        return src, random_tokens(cfg, BATCH, TGT_LEN, seed + 1)
    return (src,)


def stacks(model: gf.Transformer) -> list[tuple[str, torch.nn.Module]]:
    """(hook-name prefix, module holding `blocks`) for each stack of the model."""
    if model.cfg.arch == "encoder-decoder":
        return [("encoder.", model.encoder), ("decoder.", model.decoder)]
    return [("", model)]


def explicit_forward(model: gf.Transformer, *args, **kwargs) -> torch.Tensor:
    """Logits with every attention layer forced onto the explicit (scores/pattern) path."""
    logits, _ = model.run_with_cache(*args, names_filter=lambda n: n.endswith("hook_pattern"), **kwargs)
    return logits


def result_forward(model: gf.Transformer, *args, **kwargs) -> torch.Tensor:
    """Logits with the per-head `hook_result` materialised in every attention layer."""
    logits, _ = model.run_with_cache(*args, names_filter=lambda n: n.endswith("hook_result"), **kwargs)
    return logits


def fully_hooked_forward(model: gf.Transformer, *args, **kwargs) -> torch.Tensor:
    """Logits with every hook point cached (explicit attention, explicit norms, per-head results)."""
    logits, _ = model.run_with_cache(*args, **kwargs)
    return logits


PATHS = {"fused": lambda m, *a, **k: m(*a, **k), "explicit": explicit_forward, "result": result_forward}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal to float32 rounding: `tol` relative to the scale of `expected`."""
    expected = expected.to(actual.dtype)
    scale = max([1.0, *expected.abs().flatten().tolist()])
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


# ---- the naive reference forward: float64, loops over heads, TransformerLens weights only ----


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def ref_act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return x.clamp(min=0)
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_new":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name in ("silu", "swiglu"):
        return x * torch.sigmoid(x)
    raise AssertionError(name)


def ref_sinusoid(n_pos: int, d_model: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    table = torch.empty(n_pos, d_model, dtype=torch.float64)
    for p in range(n_pos):
        for j in range(d_model):
            angle = p / 10000 ** ((j - j % 2) / d_model)
            table[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


def ref_rope(x: torch.Tensor, cfg: gf.Config) -> torch.Tensor:
    """Rotate-half rotary on x (batch, pos, d_head) at positions 0..pos-1; dims past rotary_dim pass."""
    rd = cfg.rotary_dim
    inv_freq = cfg.rotary_base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)  # (rd/2,)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq  # (pos, rd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (pos, rd)
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    return torch.cat([rot * cos + torch.cat([-x2, x1], -1) * sin, rest], -1)


def ref_norm(x: torch.Tensor, ln: torch.nn.Module, cfg: gf.Config) -> torch.Tensor:
    if cfg.norm == "none":
        return x
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    out = x / torch.sqrt((x**2).mean(-1, keepdim=True) + cfg.eps) * f64(ln.w)
    b = getattr(ln, "b", None)
    return out if b is None else out + f64(b)


def ref_attention(attn, xq, xkv, cfg: gf.Config, causal: bool, rotary: bool) -> torch.Tensor:
    """Attention with one loop iteration per query head; head h reads key/value head h // group.
    Self-attention when xkv is None."""
    xkv = xq if xkv is None else xkv
    W_Q, W_K, W_V, W_O = f64(attn.W_Q), f64(attn.W_K), f64(attn.W_V), f64(attn.W_O)
    n_heads, n_kv = W_Q.shape[0], W_K.shape[0]
    zero_q, zero_kv = torch.zeros(n_heads, cfg.d_head).double(), torch.zeros(n_kv, cfg.d_head).double()
    b_Q = f64(attn.b_Q) if cfg.bias else zero_q
    b_K = f64(attn.b_K) if cfg.bias else zero_kv
    b_V = f64(attn.b_V) if cfg.bias else zero_kv
    q_len, k_len = xq.shape[1], xkv.shape[1]
    out = torch.zeros(xq.shape[0], q_len, cfg.d_model, dtype=torch.float64)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        q = xq @ W_Q[h] + b_Q[h]  # (batch, q_pos, d_head)
        k = xkv @ W_K[g] + b_K[g]
        v = xkv @ W_V[g] + b_V[g]
        if rotary:
            q, k = ref_rope(q, cfg), ref_rope(k, cfg)
        scores = q @ k.transpose(1, 2) / math.sqrt(cfg.d_head)  # (batch, q_pos, k_pos)
        if causal:
            future = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out += (scores.softmax(-1) @ v) @ W_O[h]
    return out + f64(attn.b_O) if cfg.bias else out


def ref_mlp(mlp, x, cfg: gf.Config) -> torch.Tensor:
    linear = x @ f64(mlp.W_in) + (f64(mlp.b_in) if cfg.bias else 0.0)
    post = ref_act("silu", x @ f64(mlp.W_gate)) * linear if cfg.act == "swiglu" else ref_act(cfg.act, linear)
    return post @ f64(mlp.W_out) + (f64(mlp.b_out) if cfg.bias else 0.0)


def ref_stack(model, stack, tokens, cfg: gf.Config, causal: bool, encoder_out=None) -> torch.Tensor:
    x = f64(model.embed.W_E)[tokens] * cfg.embed_scale  # (batch, pos, d_model)
    if cfg.positional == "learned":
        x = x + f64(stack.pos_embed.W_pos)[: tokens.shape[1]]
    elif cfg.positional == "sinusoidal":
        x = x + ref_sinusoid(tokens.shape[1], cfg.d_model)
    if cfg.n_token_types:  # no token_type_ids given: every token is of type 0
        x = x + f64(stack.token_type_embed.W_token_type)[0]
    if cfg.embed_norm:
        x = ref_norm(x, stack.ln_embed, cfg)
    rotary = cfg.positional == "rotary"

    def residual(x, ln, cell):
        if cfg.norm_position == "pre":
            return x + cell(ref_norm(x, ln, cfg))
        return ref_norm(x + cell(x), ln, cfg)

    for blk in stack.blocks:
        if cfg.parallel_attn_mlp:  # attention and MLP both read the block's input
            attn_out = ref_attention(blk.attn, ref_norm(x, blk.ln1, cfg), None, cfg, causal, rotary)
            x = x + attn_out + ref_mlp(blk.mlp, ref_norm(x, blk.ln2, cfg), cfg)
            continue
        x = residual(x, getattr(blk, "ln1", None), lambda h, b=blk: ref_attention(b.attn, h, h, cfg, causal, rotary))
        if encoder_out is not None:
            x = residual(
                x,
                getattr(blk, "ln_cross", None),
                lambda h, b=blk: ref_attention(b.cross_attn, h, encoder_out, cfg, causal=False, rotary=False),
            )
        if not cfg.attn_only:
            x = residual(x, getattr(blk, "ln2", None), lambda h, b=blk: ref_mlp(b.mlp, h, cfg))
    if cfg.norm_position == "pre":
        x = ref_norm(x, getattr(stack, "ln_final", None), cfg)
    return x


def ref_logits(model: gf.Transformer, tokens: torch.Tensor, tgt: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (batch, pos, d_vocab) in float64, from the TransformerLens-shaped weights only."""
    cfg = model.cfg
    if cfg.arch == "encoder-decoder":
        encoder_out = ref_stack(model, model.encoder, tokens, cfg, causal=False)
        x = ref_stack(model, model.decoder, tgt, cfg, causal=True, encoder_out=encoder_out)
    else:
        x = ref_stack(model, model, tokens, cfg, causal=cfg.arch == "decoder")
    return x @ f64(model.unembed.W_U) + (f64(model.unembed.b_U) if cfg.bias else 0.0)


# ---- hypothesis strategies ----

HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, archs=("decoder", "encoder", "encoder-decoder")) -> gf.Config:
    """Small random configurations over the options of `Config` that shape the forward pass (all but
    BERT's head transform and pooler, which have no TransformerLens-named weights to check against)."""
    arch = draw(st.sampled_from(archs))
    n_heads = draw(st.integers(1, 4))
    d_head = draw(st.integers(2, 8))
    positional = draw(st.sampled_from(["learned", "sinusoidal", "rotary", "none"]))
    norm = draw(st.sampled_from(["layernorm", "rmsnorm", "none"]))
    norm_position = draw(st.sampled_from(["pre", "post"]))
    attn_only = draw(st.booleans())
    # parallel attention+MLP with cross-attention is covered by its own test (see
    # test_parallel_attn_mlp_encoder_decoder_keeps_cross_attention), not mixed in here.
    can_parallel = norm_position == "pre" and not attn_only and arch != "encoder-decoder"
    return gf.Config(
        arch=arch,
        d_model=draw(st.integers(4, 16)),
        n_layers=draw(st.integers(1, 2)),
        n_decoder_layers=draw(st.integers(1, 2)) if arch == "encoder-decoder" else None,
        n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([k for k in range(1, n_heads + 1) if n_heads % k == 0])),
        d_head=d_head,
        d_mlp=draw(st.integers(1, 16)),
        d_vocab=draw(st.integers(5, 20)),
        n_ctx=16,
        positional=positional,
        # full rotary first (hypothesis favours early options), then partial
        rotary_dim=draw(st.sampled_from(range(d_head - d_head % 2, 1, -2))) if positional == "rotary" else None,
        rotary_base=draw(st.sampled_from([10000.0, 50.0])),
        norm=norm,
        norm_position=norm_position,
        act=draw(st.sampled_from(["relu", "gelu", "gelu_new", "silu", "swiglu"])),
        attn_only=attn_only,
        parallel_attn_mlp=can_parallel and draw(st.booleans()),
        embed_norm=norm != "none" and draw(st.booleans()),
        embed_scale=draw(st.sampled_from([1.0, 2.5])),
        n_token_types=0 if arch == "encoder-decoder" else draw(st.sampled_from([0, 2])),
        bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
    )


# ----------------------------------------------------------------------------------------------
# Group 1: hook names and shapes, weights under TransformerLens names
# ----------------------------------------------------------------------------------------------


def expected_shape(name: str, cfg: gf.Config) -> tuple[int, ...]:
    """The documented shape of hook `name` for a run on the standard inputs (see `model_inputs`)."""
    in_decoder_stack = name.startswith(("decoder.", "unembed.")) or name == "hook_logits"
    pos = TGT_LEN if cfg.arch == "encoder-decoder" and in_decoder_stack else SRC_LEN
    k_pos = SRC_LEN if ".cross_attn." in name else pos
    leaf = name.rsplit(".", 1)[-1]
    B, D, H, KV, dh = BATCH, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    if leaf in RESIDUAL_HOOKS:
        return (B, pos, D)
    if leaf == "hook_scale":
        return (B, pos, 1)
    if leaf in ("hook_q", "hook_rot_q", "hook_z"):
        return (B, pos, H, dh)
    if leaf in ("hook_k", "hook_v", "hook_rot_k"):
        return (B, k_pos, KV, dh)
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return (B, H, pos, k_pos)
    if leaf == "hook_result":
        return (B, pos, H, D)
    if leaf in ("hook_pre", "hook_post", "hook_pre_linear"):
        return (B, pos, cfg.d_mlp)
    if leaf == "hook_logits":
        return (B, pos, cfg.d_vocab)
    raise AssertionError(f"hook point {name!r} has no documented shape")


def documented_hook_names(cfg: gf.Config) -> set[str]:
    """The hook points DESIGN.md promises for this configuration (the model may add more)."""
    names = {"hook_logits"}
    if cfg.arch == "encoder-decoder":
        layout = [("encoder.", cfg.n_layers, False), ("decoder.", cfg.n_decoder_layers, True)]
    else:
        layout = [("", cfg.n_layers, False)]
    norm = cfg.norm != "none"
    for prefix, n_layers, cross in layout:
        names.add(f"{prefix}hook_embed")
        if cfg.positional in ("learned", "sinusoidal"):
            names.add(f"{prefix}hook_pos_embed")
        if cfg.n_token_types:
            names.add(f"{prefix}hook_token_type_embed")
        if cfg.embed_norm:
            names |= {f"{prefix}ln_embed.hook_scale", f"{prefix}ln_embed.hook_normalized"}
        if norm and cfg.norm_position == "pre":
            names |= {f"{prefix}ln_final.hook_scale", f"{prefix}ln_final.hook_normalized"}
        for i in range(n_layers):
            b = f"{prefix}blocks.{i}."
            names |= {b + "hook_resid_pre", b + "hook_attn_out", b + "hook_resid_post"}
            names |= {f"{b}attn.{h}" for h in ATTN_HOOKS}
            if cfg.positional == "rotary":
                names |= {b + "attn.hook_rot_q", b + "attn.hook_rot_k"}
            if cross:
                names |= {f"{b}cross_attn.{h}" for h in ATTN_HOOKS} | {b + "hook_cross_attn_out"}
            if norm:
                names |= {b + "ln1.hook_scale", b + "ln1.hook_normalized"}
            if not cfg.attn_only:
                names |= {b + "hook_mlp_out", b + "mlp.hook_pre", b + "mlp.hook_post"}
                if not cfg.parallel_attn_mlp:
                    names.add(b + "hook_resid_mid")
                if cfg.act == "swiglu":
                    names.add(b + "mlp.hook_pre_linear")
                if norm:
                    names |= {b + "ln2.hook_scale", b + "ln2.hook_normalized"}
    return names


@pytest.fixture(params=list(ZOO), scope="module")
def zoo_run(request):
    """(cfg, model, inputs, logits, cache) of one tiny model of each architecture, fully cached."""
    cfg = make_cfg(**ZOO[request.param])
    model = make_model(cfg)
    inputs = model_inputs(cfg)
    with torch.no_grad():
        logits, cache = model.run_with_cache(*inputs)
    return cfg, model, inputs, logits, cache


def test_every_hook_point_has_its_documented_shape(zoo_run):
    """Each cached activation has the batch-first shape DESIGN.md documents for its kind of hook."""
    cfg, _, _, _, cache = zoo_run
    wrong = {n: tuple(t.shape) for n, t in cache.items() if tuple(t.shape) != expected_shape(n, cfg)}
    assert not wrong, f"hooks with wrong shapes: {wrong}"


def test_cache_holds_exactly_the_hook_points(zoo_run):
    """run_with_cache() with no filter caches every hook point once, and nothing else."""
    _, model, _, _, cache = zoo_run
    assert sorted(cache.keys()) == sorted(model.hook_dict)
    assert len(cache) == len(model.hook_dict)


def test_documented_hook_points_exist(zoo_run):
    """Every hook point DESIGN.md names for the configuration exists, under its TransformerLens name."""
    cfg, model, _, _, _ = zoo_run
    missing = documented_hook_names(cfg) - set(model.hook_dict)
    assert not missing, f"missing hook points: {sorted(missing)}"


def test_no_hook_points_for_absent_cells(zoo_run):
    """Cells the configuration leaves out have no hook points (no MLP when attn_only, no rotary hooks
    without rotary, no norm hooks with norm='none', no positional hook for rotary/none)."""
    cfg, model, _, _, _ = zoo_run
    names = list(model.hook_dict)
    if cfg.attn_only:
        assert not [n for n in names if ".mlp." in n or n.endswith("hook_mlp_out")]
    if cfg.positional != "rotary":
        assert not [n for n in names if "hook_rot_" in n]
    if cfg.positional not in ("learned", "sinusoidal"):
        assert not [n for n in names if n.endswith("hook_pos_embed")]
    if cfg.norm == "none":
        assert not [n for n in names if n.endswith(("hook_scale", "hook_normalized"))]
    if cfg.arch != "encoder-decoder":
        assert not [n for n in names if "cross" in n]
    if cfg.parallel_attn_mlp:  # attention and MLP read the same input: there is no mid-block stream
        assert not [n for n in names if n.endswith("hook_resid_mid")]


def test_logits_shape(zoo_run):
    """model(...) returns (batch, pos, d_vocab), pos being the decoder (target) length for enc-dec."""
    cfg, _, _, logits, cache = zoo_run
    pos = TGT_LEN if cfg.arch == "encoder-decoder" else SRC_LEN
    assert logits.shape == (BATCH, pos, cfg.d_vocab)
    torch.testing.assert_close(cache["hook_logits"], logits)


@pytest.mark.parametrize("name", [n for n, kw in ZOO.items() if kw.get("arch") == "encoder-decoder"])
def test_encoder_decoder_hook_names(name):
    """Encoder-decoder hooks live under `encoder.blocks.{i}.…` and `decoder.blocks.{i}.…`; only decoder
    blocks have `cross_attn`, whose keys and values span the source length."""
    cfg = make_cfg(**ZOO[name])
    model = make_model(cfg)
    with torch.no_grad():
        _, cache = model.run_with_cache(*model_inputs(cfg))
    names = set(cache.keys())
    assert all(n.startswith(("encoder.", "decoder.")) or n == "hook_logits" for n in names), sorted(names)
    assert not [n for n in names if n.startswith("encoder.") and "cross" in n]
    for i in range(cfg.n_layers):
        assert f"encoder.blocks.{i}.attn.hook_pattern" in names
    assert f"encoder.blocks.{cfg.n_layers}.hook_resid_pre" not in names
    for i in range(cfg.n_decoder_layers):
        b = f"decoder.blocks.{i}"
        assert {f"{b}.attn.hook_pattern", f"{b}.cross_attn.hook_pattern", f"{b}.hook_cross_attn_out"} <= names
        assert cache[f"{b}.cross_attn.hook_k"].shape[1] == SRC_LEN
        assert cache[f"{b}.cross_attn.hook_v"].shape[1] == SRC_LEN
        assert cache[f"{b}.cross_attn.hook_pattern"].shape[-2:] == (TGT_LEN, SRC_LEN)
        assert cache[f"{b}.attn.hook_pattern"].shape[-2:] == (TGT_LEN, TGT_LEN)
    assert f"decoder.blocks.{cfg.n_decoder_layers}.hook_resid_pre" not in names


def all_blocks(model: gf.Transformer) -> list[torch.nn.Module]:
    return [blk for _, stack in stacks(model) for blk in stack.blocks]


@pytest.mark.parametrize("name", list(ZOO))
def test_weight_shapes_under_transformerlens_names(name):
    """Weights are reachable under TransformerLens names with the shapes DESIGN.md §2 lists."""
    cfg = make_cfg(**ZOO[name])
    model = make_model(cfg)
    D, H, KV, dh, V, M = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_vocab, cfg.d_mlp
    assert model.embed.W_E.shape == (V, D)
    assert model.unembed.W_U.shape == (D, V)
    if cfg.bias:
        assert model.unembed.b_U.shape == (V,)
    for _, stack in stacks(model):
        if cfg.positional == "learned":
            assert stack.pos_embed.W_pos.shape == (cfg.n_ctx, D)
        if cfg.n_token_types:
            assert stack.token_type_embed.W_token_type.shape == (cfg.n_token_types, D)
    norms = ["ln1"] + ([] if cfg.attn_only else ["ln2"])
    for blk in all_blocks(model):
        attns = [blk.attn] + ([blk.cross_attn] if getattr(blk, "cross_attn", None) is not None else [])
        for attn in attns:
            assert attn.W_Q.shape == (H, D, dh)
            assert attn.W_K.shape == attn.W_V.shape == (KV, D, dh)
            assert attn.W_O.shape == (H, dh, D)
            if cfg.bias:
                assert attn.b_Q.shape == (H, dh)
                assert attn.b_K.shape == attn.b_V.shape == (KV, dh)
                assert attn.b_O.shape == (D,)
        if not cfg.attn_only:
            assert blk.mlp.W_in.shape == (D, M)
            assert blk.mlp.W_out.shape == (M, D)
            if cfg.act == "swiglu":
                assert blk.mlp.W_gate.shape == (D, M)
            if cfg.bias:
                assert blk.mlp.b_in.shape == (M,)
                assert blk.mlp.b_out.shape == (D,)
        if cfg.norm != "none":
            for ln in norms:
                assert getattr(blk, ln).w.shape == (D,)
                if cfg.norm == "layernorm" and cfg.bias:
                    assert getattr(blk, ln).b.shape == (D,)
    if cfg.norm != "none" and cfg.norm_position == "pre":
        for _, stack in stacks(model):
            assert stack.ln_final.w.shape == (D,)


def resolve(model: torch.nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


DECODER_WEIGHTS = [
    "embed.W_E",
    "pos_embed.W_pos",
    "blocks.0.ln1.w",
    "blocks.0.ln1.b",
    "blocks.0.attn.W_Q",
    "blocks.0.attn.W_K",
    "blocks.0.attn.W_V",
    "blocks.0.attn.b_Q",
    "blocks.0.attn.b_K",
    "blocks.0.attn.b_V",
    "blocks.0.attn.W_O",
    "blocks.0.attn.b_O",
    "blocks.1.ln2.w",
    "blocks.1.ln2.b",
    "blocks.1.mlp.W_in",
    "blocks.1.mlp.b_in",
    "blocks.1.mlp.W_gate",
    "blocks.1.mlp.W_out",
    "blocks.1.mlp.b_out",
    "ln_final.w",
    "ln_final.b",
    "unembed.W_U",
    "unembed.b_U",
]
ENCDEC_WEIGHTS = [
    "embed.W_E",
    "encoder.pos_embed.W_pos",
    "decoder.pos_embed.W_pos",
    "encoder.blocks.0.attn.W_V",
    "encoder.blocks.1.mlp.W_out",
    "encoder.ln_final.w",
    "decoder.blocks.0.attn.W_Q",
    "decoder.blocks.0.cross_attn.W_Q",
    "decoder.blocks.0.cross_attn.W_K",
    "decoder.blocks.0.cross_attn.W_V",
    "decoder.blocks.0.cross_attn.b_V",
    "decoder.blocks.0.cross_attn.W_O",
    "decoder.ln_final.b",
]


def watched_hook(path: str) -> str:
    """The activation an in-place write to `path` must change. A key bias adds the same amount to
    every score of a query, which softmax cannot see, so for b_K watch the keys themselves."""
    if path.endswith("attn.b_K"):
        return path.replace("b_K", "hook_k")
    return "hook_logits"


@pytest.mark.parametrize(
    ("arch", "path"),
    [("decoder", p) for p in DECODER_WEIGHTS] + [("encoder-decoder", p) for p in ENCDEC_WEIGHTS],
)
def test_in_place_write_through_weight_view_changes_output(arch, path):
    """An in-place copy_ into a TransformerLens-named weight under no_grad is visible when read back
    and changes what the model computes."""
    cfg = make_cfg(arch=arch, act="swiglu", positional="learned")
    model = randomize(make_model(cfg), seed=3)
    inputs = model_inputs(cfg)
    hook = watched_hook(path)
    with torch.no_grad():
        before = model.run_with_cache(*inputs, names_filter=hook)[1][hook].clone()
        weight = resolve(model, path)
        new = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7))
        weight.copy_(new)
        torch.testing.assert_close(resolve(model, path), new, atol=0, rtol=0)
        after = model.run_with_cache(*inputs, names_filter=hook)[1][hook]
    assert not torch.allclose(before, after, atol=1e-4), f"writing {path} did not change {hook}"


def test_zeroing_W_O_zeroes_attention_output():
    """`blocks[0].attn.W_O.zero_()` (and b_O) makes blocks.0.hook_attn_out exactly zero."""
    cfg = make_cfg(**ZOO["decoder-gpt2"])
    model = randomize(make_model(cfg), seed=4)
    (tokens,) = model_inputs(cfg)
    with torch.no_grad():
        assert model.run_with_cache(tokens)[1]["blocks.0.hook_attn_out"].abs().max() > 0
        model.blocks[0].attn.W_O.zero_()
        model.blocks[0].attn.b_O.zero_()
        _, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["blocks.0.hook_attn_out"], torch.zeros(BATCH, SRC_LEN, cfg.d_model))
    assert torch.equal(cache["blocks.0.attn.hook_result"], torch.zeros(BATCH, SRC_LEN, cfg.n_heads, cfg.d_model))


def test_seed_makes_weights_deterministic():
    """Transformer(cfg, seed=s) gives the same weights for the same seed and different ones otherwise."""
    cfg = make_cfg()
    a, b, c = (gf.Transformer(cfg, seed=s).state_dict() for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.W_E"], c["embed.W_E"])


# ----------------------------------------------------------------------------------------------
# Group 2: invariants over random configurations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, kw in ZOO.items() if not kw.get("head_transform")])
def test_zoo_paths_match_naive_reference(name):
    """For each architecture of the zoo (MHA/GQA/MQA, full and partial rotary, pre/post-norm, parallel
    blocks, encoder-decoder), every forward path equals the float64 naive reference."""
    cfg = make_cfg(**ZOO[name])
    model = randomize(make_model(cfg), 11)
    inputs = model_inputs(cfg, 12)
    expected = ref_logits(model, *inputs)
    with torch.no_grad():
        for path in (*PATHS.values(), fully_hooked_forward):
            assert_close(path(model, *inputs), expected)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2), src_len=st.integers(1, 6))
def test_all_paths_match_naive_reference(cfg, seed, batch, src_len):
    """Fused path, explicit attention path, per-head result path and the fully hooked run all equal
    the float64 naive reference to float32 rounding."""
    model = randomize(make_model(cfg, seed), seed)
    inputs = (random_tokens(cfg, batch, src_len, seed),)
    if cfg.arch == "encoder-decoder":
        inputs += (random_tokens(cfg, batch, 1 + seed % 5, seed + 1),)
    expected = ref_logits(model, *inputs)
    with torch.no_grad():
        for path in (*PATHS.values(), fully_hooked_forward):
            assert_close(path(model, *inputs), expected)


@HYPOTHESIS
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_caching_does_not_change_logits(cfg, seed):
    """run_with_cache (all hooks) and run_with_hooks with an identity hook return model(...)'s logits."""
    model = randomize(make_model(cfg, seed), seed)
    inputs = model_inputs(cfg, seed)
    with torch.no_grad():
        plain = model(*inputs)
        cached, _ = model.run_with_cache(*inputs)
        hooked = model.run_with_hooks(*inputs, fwd_hooks=[(lambda n: True, lambda x, hook: x)])
    assert_close(cached, plain)
    assert_close(hooked, plain)


def pad_batch(rows: list[torch.Tensor], side: str, pad_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token rows into (batch, max_len + 1) with padding on `side`, filled from `pad_id`
    (a (batch, max_len + 1) tensor of ids), and the 1/0 attention mask."""
    width = pad_id.shape[1]
    tokens, mask = pad_id.clone(), torch.zeros_like(pad_id)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        tokens[i, span], mask[i, span] = row, 1
    return tokens, mask


def real_part(x: torch.Tensor, length: int, width: int, side: str) -> torch.Tensor:
    """The real (unpadded) positions of one padded row of x (pos, ...)."""
    return x[:length] if side == "right" else x[width - length :]


@st.composite
def padded_batches(draw, cfg: gf.Config):
    """(rows, pad ids, other pad ids) for 2-3 sequences of different lengths."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lengths = draw(st.lists(st.integers(1, 5), min_size=2, max_size=3))
    rows = [torch.randint(0, cfg.d_vocab, (n,), generator=gen) for n in lengths]
    shape = (len(rows), max(lengths) + 1)  # at least one padding position in every row
    pad_a, pad_b = (torch.randint(0, cfg.d_vocab, shape, generator=gen) for _ in range(2))
    return rows, pad_a, pad_b


@HYPOTHESIS
@given(data=st.data(), cfg=configs(archs=("decoder", "encoder")), side=st.sampled_from(["left", "right"]))
def test_padded_row_equals_the_sequence_alone(data, cfg, side):
    """With an attention mask, each row's real positions give the logits of that sequence run alone,
    whatever ids sit at the padded positions; for decoders and encoders, left and right padding, and
    for learned/rotary positions too (positions count real tokens). Fused and explicit paths."""
    model = randomize(make_model(cfg), 0)
    rows, pad_a, pad_b = data.draw(padded_batches(cfg))
    width = pad_a.shape[1]
    tokens_a, mask = pad_batch(rows, side, pad_a)
    tokens_b, _ = pad_batch(rows, side, pad_b)
    with torch.no_grad():
        for name, path in PATHS.items():
            logits_a = path(model, tokens_a, attention_mask=mask)
            logits_b = path(model, tokens_b, attention_mask=mask)
            assert not logits_a.isnan().any(), name
            for i, row in enumerate(rows):
                alone = path(model, row[None])[0]
                real_a = real_part(logits_a[i], len(row), width, side)
                real_b = real_part(logits_b[i], len(row), width, side)
                assert_close(real_a, real_b)
                assert_close(real_a, alone)


@HYPOTHESIS
@given(data=st.data(), cfg=configs(archs=("encoder-decoder",)), side=st.sampled_from(["left", "right"]))
def test_encoder_decoder_padding(data, cfg, side):
    """Encoder-decoder with padded source and target: each row's real target positions give the
    logits of the unpadded (src, tgt) pair, whatever ids sit at padded positions."""
    model = randomize(make_model(cfg), 1)
    src_rows, src_pad, _ = data.draw(padded_batches(cfg))
    tgt_rows, tgt_pad, tgt_pad_b = data.draw(padded_batches(cfg))
    n = min(len(src_rows), len(tgt_rows))  # same batch size for source and target
    src_rows, src_pad = src_rows[:n], src_pad[:n]
    tgt_rows, tgt_pad, tgt_pad_b = tgt_rows[:n], tgt_pad[:n], tgt_pad_b[:n]
    src, src_mask = pad_batch(src_rows, side, src_pad)
    tgt, tgt_mask = pad_batch(tgt_rows, side, tgt_pad)
    tgt_b, _ = pad_batch(tgt_rows, side, tgt_pad_b)
    src_b = torch.where(src_mask.bool(), src, (src + 1) % cfg.d_vocab)
    width = tgt.shape[1]
    with torch.no_grad():
        for name, path in PATHS.items():
            logits = path(model, src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
            logits_b = path(model, src_b, tgt_b, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
            assert not logits.isnan().any(), name
            for i in range(n):
                alone = path(model, src_rows[i][None], tgt_rows[i][None])[0]
                real = real_part(logits[i], len(tgt_rows[i]), width, side)
                assert_close(real, real_part(logits_b[i], len(tgt_rows[i]), width, side))
                assert_close(real, alone)


@HYPOTHESIS
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_no_nan_anywhere_with_padding(cfg, seed):
    """With left, right and complete padding in one batch, no activation in any hook point (padded rows
    included) and no logit is NaN, and only attention scores may be infinite (masked to -inf)."""
    model = randomize(make_model(cfg), seed)
    tokens = random_tokens(cfg, 4, 4, seed)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    kwargs = {"attention_mask": mask}
    args: tuple[torch.Tensor, ...] = (tokens,)
    if cfg.arch == "encoder-decoder":
        args += (random_tokens(cfg, 4, 4, seed + 1),)
        kwargs["decoder_attention_mask"] = mask.flip(0)
    with torch.no_grad():
        logits, cache = model.run_with_cache(*args, **kwargs)
        fused = model(*args, **kwargs)
    assert torch.isfinite(logits).all() and torch.isfinite(fused).all()
    for name, act in cache.items():
        assert not act.isnan().any(), f"NaN in {name}"
        if not name.endswith("hook_attn_scores"):
            assert torch.isfinite(act).all(), f"inf in {name}"


@HYPOTHESIS
@given(cfg=configs(archs=("decoder", "encoder-decoder")), seed=st.integers(0, 2**16), data=st.data())
def test_decoder_is_causal(cfg, seed, data):
    """Changing the decoder token at position t changes no logit before t (and does change position t)."""
    model = randomize(make_model(cfg), seed)
    inputs = list(model_inputs(cfg, seed))
    tokens = inputs[-1]
    t = data.draw(st.integers(0, tokens.shape[1] - 1))
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % cfg.d_vocab
    with torch.no_grad():
        for name, path in PATHS.items():
            before = path(model, *inputs[:-1], tokens)
            after = path(model, *inputs[:-1], changed)
            assert_close(after[:, :t], before[:, :t])
            assert not torch.allclose(after[:, t], before[:, t], atol=1e-4), name


def test_parallel_attn_mlp_encoder_decoder_is_refused():
    """A parallel block has no place for cross-attention: Config refuses the combination instead of
    building a decoder that silently ignores the source."""
    with pytest.raises(ValueError, match="parallel_attn_mlp=True needs .* single stack"):
        make_cfg(arch="encoder-decoder", parallel_attn_mlp=True, n_layers=1)


@HYPOTHESIS
@given(cfg=configs(archs=("encoder-decoder",)), seed=st.integers(0, 2**16))
def test_decoder_reads_source_only_through_cross_attention(cfg, seed):
    """With every decoder.blocks.{i}.hook_cross_attn_out zeroed, the source tokens cannot change the
    logits; without the ablation they do."""
    model = randomize(make_model(cfg), seed)
    src, tgt = model_inputs(cfg, seed)
    other_src = (src + 1 + torch.arange(SRC_LEN)) % cfg.d_vocab
    ablate = [(lambda n: n.startswith("decoder.") and n.endswith("hook_cross_attn_out"), lambda x, hook: x * 0)]
    with torch.no_grad():
        for name, path in PATHS.items():
            with model.hooks(fwd_hooks=ablate):
                assert_close(path(model, other_src, tgt), path(model, src, tgt))
            assert not torch.allclose(path(model, other_src, tgt), path(model, src, tgt), atol=1e-4), name


@pytest.mark.parametrize("name", ["decoder-gpt2", "encdec-marian"])
def test_init_zeroes_every_bias_and_sets_unit_gains(name):
    """The GPT-2 initialisation (init_weights) gives zero biases, b_Q/b_K/b_V included, unit norm gains,
    and N(0, init_std)-sized matrices."""
    cfg = make_cfg(**ZOO[name])
    model = make_model(cfg)
    nonzero = []
    for blk in all_blocks(model):
        attns = {"attn": blk.attn, "cross_attn": getattr(blk, "cross_attn", None)}
        for attn_name, attn in attns.items():
            for bias in ("b_Q", "b_K", "b_V", "b_O") if attn is not None else ():
                if getattr(attn, bias).abs().max() > 0:
                    nonzero.append(f"{attn_name}.{bias}")
        assert torch.equal(blk.mlp.b_in, torch.zeros(cfg.d_mlp))
        assert torch.equal(blk.ln1.w, torch.ones(cfg.d_model))
    assert not nonzero, f"biases not zero after init: {sorted(set(nonzero))}"
    assert torch.equal(model.unembed.b_U, torch.zeros(cfg.d_vocab))
    assert 0 < float(model.embed.W_E.detach().std()) < 3 * cfg.init_std


# ----------------------------------------------------------------------------------------------
# QK and OV circuits (factored W_Q W_K^T and W_V W_O per head)
# ----------------------------------------------------------------------------------------------


def dense_circuits(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_heads, d_model, d_model) QK and OV from the stored matrices, not the W_* views: head h's
    rows of the fused qkv weight, its key/value head h // group, its columns of o_weight."""
    n_heads, n_kv, d_head = attn.n_heads, attn.n_kv_heads, attn.d_head
    q_size, kv_size, group = n_heads * d_head, n_kv * d_head, n_heads // n_kv
    w = attn.qkv_weight.detach()  # (q_size + 2 kv_size, d_model)
    qk, ov = [], []
    for h in range(n_heads):
        kv = h // group
        q_rows = w[h * d_head : (h + 1) * d_head]  # (d_head, d_model)
        k_rows = w[q_size + kv * d_head : q_size + (kv + 1) * d_head]
        v_rows = w[q_size + kv_size + kv * d_head : q_size + kv_size + (kv + 1) * d_head]
        o_cols = attn.o_weight.detach()[:, h * d_head : (h + 1) * d_head]  # (d_model, d_head)
        qk.append(q_rows.T @ k_rows)
        ov.append(v_rows.T @ o_cols.T)
    return torch.stack(qk), torch.stack(ov)


@pytest.mark.parametrize("name", ["decoder-gpt2", "decoder-llama-gqa", "decoder-mqa-partial-rotary", "encoder-bert"])
def test_QK_and_OV_are_the_per_head_products_of_the_stored_weights(name):
    model = randomize(make_model(make_cfg(**ZOO[name])), seed=1)
    qk, ov = model.QK, model.OV
    shape = (BASE["n_layers"], BASE["n_heads"], BASE["d_model"], BASE["d_model"])
    assert isinstance(qk, gf.FactoredMatrix) and qk.shape == shape and ov.shape == shape
    for layer, block in enumerate(model.blocks):
        dense_qk, dense_ov = dense_circuits(block.attn)
        torch.testing.assert_close(qk.AB[layer], dense_qk)
        torch.testing.assert_close(ov.AB[layer], dense_ov)
        torch.testing.assert_close(block.attn.QK.AB, dense_qk)
        torch.testing.assert_close(model.OV[layer, 3].AB, dense_ov[3])


def test_QK_gives_the_scores_and_OV_the_head_outputs():
    """Without biases or rotary: scores = x QK x^T · scale (x: ln1's output), result_h = pattern_h x OV_h."""
    model = randomize(make_model(make_cfg(bias=False, positional="learned")), seed=2)
    tokens = torch.randint(0, BASE["d_vocab"], (BATCH, SRC_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        x = cache["blocks.1.ln1.hook_normalized"]  # (batch, pos, d_model)
        scores = torch.einsum("bpm,hmn,bkn->bhpk", x, model.QK.AB[1], x) * model.blocks[1].attn.scale
        written = torch.einsum("bhpk,bkm,hmn->bphn", cache["blocks.1.attn.hook_pattern"], x, model.OV.AB[1])
    causal = torch.ones(SRC_LEN, SRC_LEN, dtype=torch.bool).tril()
    torch.testing.assert_close(cache["blocks.1.attn.hook_attn_scores"][..., causal], scores[..., causal])
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], written)


def test_encoder_decoder_circuits_are_asked_of_one_stack():
    model = make_model(make_cfg(**ZOO["encdec-gqa-swiglu"]))
    with pytest.raises(gf.CircuitError, match=r"model\.encoder\.QK or model\.decoder\.QK"):
        _ = model.QK
    with pytest.raises(gf.CircuitError, match="cross_attn.OV"):
        _ = model.OV
    d = BASE["d_model"]
    assert model.encoder.QK.shape == (BASE["n_layers"], BASE["n_heads"], d, d)
    assert model.decoder.OV.shape == (1, BASE["n_heads"], d, d)
    cross = model.decoder.blocks[0].cross_attn
    torch.testing.assert_close(cross.QK.AB, dense_circuits(cross)[0])

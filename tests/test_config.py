"""Config: derived fields, and a ValueError naming field, value and expectation for bad input."""

import pytest

import glassformer as gf

BASE = dict(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16)


def test_derived_fields_are_filled_once():
    cfg = gf.Config(**BASE, arch="encoder-decoder")
    assert (cfg.d_head, cfg.n_kv_heads, cfg.d_mlp, cfg.n_decoder_layers, cfg.rotary_dim) == (8, 4, 128, 2, 8)
    assert cfg.n_groups == 1 and not cfg.gated


def test_explicit_fields_win_over_derivation():
    cfg = gf.Config(**{**BASE, "d_model": 30}, d_head=10, n_kv_heads=2, d_mlp=64, act="swiglu")
    assert (cfg.d_head, cfg.n_kv_heads, cfg.d_mlp, cfg.n_groups, cfg.gated) == (10, 2, 64, 2, True)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"arch": "decoder-only"}, ["arch", "'decoder-only'", "'encoder-decoder'"]),
        ({"positional": "alibi"}, ["positional", "'alibi'", "'rotary'"]),
        ({"norm": "batchnorm"}, ["norm", "'batchnorm'", "'rmsnorm'"]),
        ({"norm_position": "peri"}, ["norm_position", "'pre'", "'sandwich'"]),
        ({"qk_norm": "both"}, ["qk_norm", "'head'", "'projection'"]),
        ({"sliding_window": 0}, ["sliding_window=0", "positive"]),
        ({"layer_types": ["full"] * 3}, ["layer_types", "3 entries", "n_layers=2"]),
        ({"layer_types": ["full", "sliding"]}, ["'sliding'", "sliding_window is None"]),
        ({"layer_types": ["full", "local"], "sliding_window": 4}, ["layer_types", "'local'", "'sliding'"]),
        ({"arch": "encoder", "sliding_window": 4}, ["sliding_window", "'decoder'"]),
        ({"attn_softcap": -1.0}, ["attn_softcap=-1.0", "positive"]),
        ({"attn_scale": "0.1"}, ["attn_scale='0.1'", "number"]),
        ({"arch": "encoder-decoder", "norm_position": "sandwich"}, ["'sandwich'", "single-stack"]),
        ({"act": "tanh"}, ["act", "'tanh'", "'swiglu'"]),
        ({"d_model": 30}, ["d_model=30", "n_heads=4", "d_head"]),
        ({"n_kv_heads": 3}, ["n_kv_heads=3", "n_heads=4"]),
        ({"n_layers": 0}, ["n_layers=0", "positive"]),
        ({"d_vocab": 2.5}, ["d_vocab=2.5", "integer"]),
        ({"n_ctx": True}, ["n_ctx=True", "integer"]),
        ({"positional": "rotary", "rotary_dim": 3}, ["rotary_dim=3", "even"]),
        ({"positional": "rotary", "rotary_dim": 16}, ["rotary_dim=16", "d_head=8"]),
        ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
        ({"eps": 0.0}, ["eps=0.0", "positive"]),
        ({"dropout": "0.1"}, ["dropout='0.1'", "number", "str"]),
        ({"rotary_base": None}, ["rotary_base=None", "number"]),
        ({"bias": "yes"}, ["bias='yes'", "True or False"]),
        ({"tie_embeddings": 1}, ["tie_embeddings=1", "True or False"]),
        ({"n_experts": -1}, ["n_experts=-1", "non-negative"]),
        ({"n_experts": 4, "n_experts_per_token": 5}, ["n_experts_per_token=5", "n_experts=4"]),
        ({"n_experts": 4, "n_experts_per_token": 0}, ["n_experts_per_token=0", "positive"]),
        ({"n_experts": 4, "d_expert_mlp": 0}, ["d_expert_mlp=0", "positive"]),
        ({"n_experts": 4, "attn_only": True}, ["n_experts=4", "attn_only=True"]),
        ({"d_shared_expert_mlp": 2.0}, ["d_shared_expert_mlp=2.0", "non-negative integer"]),
        ({"norm_topk_prob": 0}, ["norm_topk_prob=0", "True or False"]),
        ({"positional": "relative", "relative_buckets": 3}, ["relative_buckets=3", "at least 4"]),
        ({"positional": "relative", "relative_max_distance": 16}, ["relative_max_distance=16", "// 2"]),
        ({"relative_buckets": 0}, ["relative_buckets=0", "positive"]),
        ({"unembed_scale": 0.0}, ["unembed_scale=0.0", "positive"]),
    ],
)
def test_bad_values_name_field_value_and_expectation(changes, words):
    with pytest.raises(ValueError) as err:
        gf.Config(**{**BASE, **changes})
    for word in words:
        assert word in str(err.value)


def test_dict_round_trip_and_unknown_fields():
    cfg = gf.Config(**BASE, positional="rotary", act="swiglu", extra={"source": "test"})
    assert gf.Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields \\['n_wizards'\\]"):
        gf.Config.from_dict({**cfg.to_dict(), "n_wizards": 8})


@pytest.mark.parametrize(
    ("scaling", "words"),
    [
        ("linear", ["rotary_scaling='linear'", "'type'", "'yarn'"]),
        ({"type": "ntk"}, ["'ntk'", "'dynamic'"]),
        ({"type": "yarn", "factor": 4.0}, ["'yarn'", "lacks ['original_n_ctx']"]),
        ({"type": "linear", "factor": 2.0, "beta": 1}, ["unknown keys ['beta']"]),
        ({"type": "linear", "factor": -2.0}, ["rotary_scaling['factor']=-2.0", "positive"]),
        ({"type": "yarn", "factor": 2.0, "original_n_ctx": 8, "truncate": 1}, ["['truncate']=1", "True or False"]),
        (
            {"type": "longrope", "original_n_ctx": 8, "short_factor": [1.0] * 4, "long_factor": [1.0] * 3},
            ["['long_factor']", "rotary_dim / 2 = 4"],
        ),
    ],
)
def test_bad_rotary_scaling_names_the_key_and_expectation(scaling, words):
    with pytest.raises(ValueError) as err:
        gf.Config(**BASE, positional="rotary", rotary_scaling=scaling)
    for word in words:
        assert word in str(err.value)


def test_rotary_scaling_round_trips_through_a_dict():
    scaling = {"type": "longrope", "original_n_ctx": 8, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    cfg = gf.Config(**BASE, positional="rotary", rotary_scaling=scaling, rotary_interleaved=True)
    assert gf.Config.from_dict(cfg.to_dict()) == cfg


def test_shared_norm_needs_a_parallel_block():
    with pytest.raises(ValueError, match="shared_norm=True needs parallel_attn_mlp=True"):
        gf.Config(**BASE, shared_norm=True)


def test_expert_width_defaults_to_the_mlp_width():
    cfg = gf.Config(**BASE, d_mlp=48, n_experts=4)
    assert (cfg.d_expert_mlp, cfg.n_experts_per_token, cfg.norm_topk_prob, cfg.d_shared_expert_mlp) == (48, 2, True, 0)
    assert gf.Config(**BASE).d_expert_mlp is None  # a dense model has no experts to size

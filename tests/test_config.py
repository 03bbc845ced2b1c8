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
        ({"norm_position": "sandwich"}, ["norm_position", "'pre'"]),
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


def test_expert_width_defaults_to_the_mlp_width():
    cfg = gf.Config(**BASE, d_mlp=48, n_experts=4)
    assert (cfg.d_expert_mlp, cfg.n_experts_per_token, cfg.norm_topk_prob, cfg.d_shared_expert_mlp) == (48, 2, True, 0)
    assert gf.Config(**BASE).d_expert_mlp is None  # a dense model has no experts to size

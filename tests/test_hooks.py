"""Hook points: caching, replacing, scoping and removal, errors, and the zero-cost rule."""

import pytest
import torch

import glassformer as gf
from glassformer.cells.attention import Attention


def make(arch="decoder", **kw):
    cfg = gf.Config(arch=arch, n_layers=2, d_model=16, n_heads=4, d_vocab=23, n_ctx=12, **kw)
    return gf.Transformer(cfg, seed=0).eval()


TOKENS = torch.tensor([[1, 5, 7, 2, 9], [3, 3, 8, 0, 4]])


def active_hooks(model):
    return [name for name, hook in model.hook_dict.items() if hook.active]


def test_hook_names_are_module_paths():
    model = make()
    assert model.hook_dict["blocks.1.attn.hook_pattern"] is model.blocks[1].attn.hook_pattern
    assert model.blocks[1].attn.hook_pattern.name == "blocks.1.attn.hook_pattern"


def test_replacing_z_with_zeros_ablates_the_attention_output():
    model = make()

    def ablate(z, hook):
        return torch.zeros_like(z)

    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_attn_out")
        clean = cache["attn_out", 0]
        with model.hooks([("blocks.0.attn.hook_z", ablate)]):
            _, cache = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_attn_out")
    assert clean.abs().max() > 0
    torch.testing.assert_close(cache["attn_out", 0], model.blocks[0].attn.b_O.expand_as(clean))


def test_hook_returning_none_reads_without_changing():
    model = make()
    seen = []
    with torch.no_grad():
        plain = model(TOKENS)
        hooked = model.run_with_hooks(
            TOKENS, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, h: seen.append(h.name))]
        )
    assert seen == ["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(hooked, plain, atol=1e-6, rtol=0)


def test_predicate_selects_every_matching_hook():
    model = make()
    seen = []
    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda t, h: seen.append(h.name))])
    assert seen == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def test_hooks_are_removed_even_when_a_hook_raises():
    model = make()

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(
            TOKENS, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: None), ("blocks.1.attn.hook_q", boom)]
        )
    assert active_hooks(model) == []
    with pytest.raises(RuntimeError, match="boom"), model.hooks([("blocks.1.hook_mlp_out", boom)]):
        model(TOKENS)
    assert active_hooks(model) == []


def test_unknown_hook_name_suggests_the_closest_valid_names():
    model = make()
    with pytest.raises(gf.HookError) as err:
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_patern", lambda t, h: None)])
    assert "blocks.0.attn.hook_patern" in str(err.value) and "blocks.0.attn.hook_pattern" in str(err.value)
    with pytest.raises(gf.HookError, match="unknown hook name"):
        model.run_with_cache(TOKENS, names_filter=["blocks.7.hook_resid_pre"])
    assert active_hooks(model) == []


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda t: t[:, :-1], r"returned shape \(2, 4, 4, 4\), expected \(2, 5, 4, 4\)"),
        (lambda t: 3.0, "returned float"),
        (lambda t: t.double(), "returned a torch.float64 tensor on cpu, expected torch.float32 on cpu"),
    ],
)
def test_hook_returning_something_unusable_is_a_clear_error(returned, message):
    model = make()
    with pytest.raises(gf.HookError, match=message):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_z", lambda t, h: returned(t))])
    assert active_hooks(model) == []


def test_names_filter_forms():
    model = make()
    with torch.no_grad():
        _, everything = model.run_with_cache(TOKENS)
        _, one = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_post")
        _, listed = model.run_with_cache(TOKENS, names_filter=["hook_embed", "blocks.1.attn.hook_v"])
        _, picked = model.run_with_cache(TOKENS, names_filter=lambda n: "ln1" in n)
    assert set(everything.keys()) == set(model.hook_dict)
    assert list(one.keys()) == ["blocks.0.hook_resid_post"]
    assert set(listed.keys()) == {"hook_embed", "blocks.1.attn.hook_v"}
    assert set(picked.keys()) == {f"blocks.{i}.ln1.hook_{k}" for i in range(2) for k in ("scale", "normalized")}


def test_cache_short_keys_as_in_transformer_lens():
    model = make()
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_pre", 0] is cache["blocks.0.hook_resid_pre"]
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert ("z", 0) in cache and "blocks.0.attn.hook_z" in cache and ("z", 5) not in cache
    assert len(cache) == len(list(cache.keys()))
    with pytest.raises(KeyError, match="closest"):
        cache["blocks.0.attn.hook_zz"]


def test_cache_short_keys_in_encoder_decoder_name_the_stack():
    model = make("encoder-decoder")
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, TOKENS[:, :3])
    assert cache["pattern", 0, "decoder"].shape == (2, 4, 3, 3)
    assert cache["pattern", 0, "encoder"].shape == (2, 4, 5, 5)
    assert cache["q", 0, "cross_attn"].shape == (2, 3, 4, 4)
    with pytest.raises(KeyError, match="ambiguous"):
        cache["pattern", 0]


def test_scoped_and_permanent_hooks():
    model = make()
    doubled = lambda t, h: 2 * t  # noqa: E731
    with torch.no_grad():
        plain = model(TOKENS)
        model.add_hook("blocks.1.hook_mlp_out", doubled)
        changed = model(TOKENS)
        assert active_hooks(model) == ["blocks.1.hook_mlp_out"]
        model.reset_hooks()
        again = model(TOKENS)
    assert not torch.allclose(changed, plain)
    torch.testing.assert_close(again, plain)


def test_backward_hooks_see_and_can_change_gradients():
    model = make()
    grads = []
    logits = model.run_with_hooks(TOKENS, bwd_hooks=[("blocks.0.hook_resid_mid", lambda g, h: grads.append(g.clone()))])
    logits[:, -1].sum().backward()
    assert grads[0].shape == (2, 5, 16) and grads[0].abs().sum() > 0
    model.zero_grad()
    logits = model.run_with_hooks(TOKENS, bwd_hooks=[("blocks.0.hook_resid_mid", lambda g, h: torch.zeros_like(g))])
    logits[:, -1].sum().backward()
    # No gradient reaches layer 0's attention through the residual stream when it is zeroed at resid_mid.
    assert model.blocks[0].attn.qkv_weight.grad.abs().max() == 0
    assert active_hooks(model) == []


class Counting:
    """Counts calls of an Attention method while delegating to it."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        original = getattr(Attention, name)

        def wrapper(module, *args, **kwargs):
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(Attention, name, wrapper)


def test_unused_hooks_keep_the_fused_path(monkeypatch):
    """SDPA runs unless scores or pattern are asked for; the per-head result only when asked for."""
    model = make()
    explicit, fused = Counting(monkeypatch, "_explicit"), Counting(monkeypatch, "_fused")
    einsums = []
    real_einsum = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda eq, *ops: einsums.append(eq) or real_einsum(eq, *ops))
    with torch.no_grad():
        model(TOKENS)
        model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith(("hook_q", "hook_z", "hook_resid_post")))
        assert (explicit.calls, fused.calls, einsums) == (0, 4, [])
        model.run_with_cache(TOKENS, names_filter="blocks.1.attn.hook_pattern")
        assert (explicit.calls, fused.calls) == (1, 5)
        model.run_with_cache(TOKENS, names_filter="blocks.0.attn.hook_result")
        assert "bphd,hdm->bphm" in einsums and explicit.calls == 1


def test_norm_scale_hook_switches_to_explicit_steps_with_the_same_output():
    for norm in ("layernorm", "rmsnorm"):
        model = make(norm=norm)
        with torch.no_grad():
            plain = model(TOKENS)
            logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: "hook_scale" in n)
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
        assert cache["scale", 0].shape == (2, 5, 1)


@pytest.mark.parametrize(
    "fwd_hooks",
    [("blocks.0.attn.hook_z", lambda t, h: None), [("blocks.0.attn.hook_z",)], [(3, lambda t, h: None)], "hook_z"],
)
def test_hooks_not_given_as_a_list_of_pairs_are_a_clear_error(fwd_hooks):
    model = make()
    with pytest.raises(TypeError, match=r"fwd_hooks must be a list of \(hook name or predicate, fn\) pairs"):
        model.run_with_hooks(TOKENS, fwd_hooks=fwd_hooks)
    assert active_hooks(model) == []


def test_cache_records_only_the_positions_dtype_and_device_asked_for():
    model = make()
    with torch.no_grad():
        _, full = model.run_with_cache(TOKENS)
        _, some = model.run_with_cache(TOKENS, pos_slice=[1, 3], dtype=torch.bfloat16, device="cpu")
        _, last = model.run_with_cache(TOKENS, pos_slice=-1)
    assert all(t.dtype == torch.bfloat16 for t in some.values())
    assert some["resid_post", 1].shape == (2, 2, 16) and some["z", 0].shape == (2, 2, 4, 4)
    assert some["pattern", 0].shape == (2, 4, 2, 5)  # the queries' positions; every key kept
    assert some["scale", 1, "ln2"].shape == (2, 2, 1)
    torch.testing.assert_close(some["resid_post", 1], full["resid_post", 1][:, [1, 3]].bfloat16())
    assert last["resid_pre", 0].shape == (2, 16) and last["result", 1].shape == (2, 4, 16)
    torch.testing.assert_close(last.decompose_resid().sum(0), full["resid_post", 1][:, -1])


# Gradients: run_with_cache(backward_metric=fn) records d fn(logits) / d activation under name + "_grad".


def loss(logits):
    """A hand-written next-token loss: mean cross-entropy of each position against the next token."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), TOKENS[:, 1:])


def reference_grad(model, name, metric=loss):
    """d metric / d activation by a second route: a zero leaf added to the activation in a hook."""
    found = {}

    def add_leaf(x, hook):
        found["leaf"] = torch.zeros_like(x, requires_grad=True)
        return x + found["leaf"]

    logits = model.run_with_hooks(TOKENS, fwd_hooks=[(name, add_leaf)])
    return torch.autograd.grad(metric(logits), found["leaf"])[0]


@pytest.mark.parametrize(
    "name", ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
)
def test_backward_metric_gradients_equal_autograd_on_a_hand_written_loss(name):
    model = make()
    logits, cache = model.run_with_cache(TOKENS, backward_metric=loss)
    torch.testing.assert_close(cache[f"{name}_grad"], reference_grad(model, name), atol=1e-6, rtol=1e-5)
    assert cache[name].shape == cache[f"{name}_grad"].shape and not logits.requires_grad


def test_backward_metric_on_the_fused_path_equals_the_explicit_path():
    """Caching z alone keeps the fused attention kernel; caching the pattern too forces the explicit one."""
    model = make()
    _, fused = model.run_with_cache(TOKENS, names_filter="blocks.0.attn.hook_z", backward_metric=loss)
    names = ["blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern"]
    _, explicit = model.run_with_cache(TOKENS, names_filter=names, backward_metric=loss)
    assert list(fused.keys()) == ["blocks.0.attn.hook_z", "blocks.0.attn.hook_z_grad"]
    torch.testing.assert_close(fused["z_grad", 0], explicit["z_grad", 0], atol=1e-6, rtol=1e-5)


def test_backward_metric_leaves_parameter_grads_and_mode_alone():
    model = make().train()
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    with torch.no_grad():  # grad is switched on for the run itself
        _, cache = model.run_with_cache(TOKENS, backward_metric=loss)
    assert "blocks.0.hook_resid_pre_grad" in cache and model.training
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))
    assert all(p.grad is None for p in params[1:])


def test_backward_metric_with_frozen_weights_slices_and_short_keys():
    """Frozen weights: the first recorded activation starts the graph (upstream products may take the
    no-gradient oneDNN path); the gradients are the same. pos_slice slices gradients as activations."""
    model = make()
    _, free = model.run_with_cache(TOKENS, backward_metric=loss)
    model.requires_grad_(False)
    _, frozen = model.run_with_cache(TOKENS, names_filter=lambda n: "blocks.1" in n, backward_metric=loss)
    torch.testing.assert_close(frozen["resid_pre_grad", 1], free["resid_pre_grad", 1], atol=1e-6, rtol=1e-5)
    _, last = model.run_with_cache(
        TOKENS, names_filter="blocks.1.attn.hook_pattern", pos_slice=-1, backward_metric=loss
    )
    torch.testing.assert_close(last["pattern_grad", 1], free["pattern_grad", 1][:, :, -1], atol=1e-6, rtol=1e-5)
    assert free["blocks.1.attn.hook_z_grad"] is free["z_grad", 1]


def test_backward_metric_hooks_are_removed_when_it_raises_or_is_not_a_scalar():
    model = make()

    def boom(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_cache(TOKENS, backward_metric=boom)
    assert active_hooks(model) == []
    with pytest.raises(ValueError, match=r"scalar .* got shape \(2,\)"):
        model.run_with_cache(TOKENS, backward_metric=lambda logits: logits[:, -1, 0])
    assert active_hooks(model) == []
    assert all(p.grad is None for p in model.parameters())

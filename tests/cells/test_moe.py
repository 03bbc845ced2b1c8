"""Tests of the mixture-of-experts cell (cells/moe.py) against a hand-written, token-by-token reference:
softmax over the router's logits, top-k, optional renormalisation, the weighted sum of the chosen
SwiGLU experts, plus the sigmoid-gated shared expert; and what its hooks promise (reading, ablating and
steering the routing, each expert's write)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glassformer as gf
from glassformer.cells.moe import MoE

D_MODEL, N_EXPERTS, BATCH, POS = 8, 4, 2, 5


def make_moe(shared: int = 0, norm_topk_prob: bool = True, k: int = 2, dtype: torch.dtype = torch.float32) -> MoE:
    cfg = gf.Config(
        d_model=D_MODEL,
        n_layers=1,
        n_heads=2,
        d_vocab=5,
        n_ctx=8,
        act="swiglu",
        n_experts=N_EXPERTS,
        n_experts_per_token=k,
        d_expert_mlp=6,
        norm_topk_prob=norm_topk_prob,
        d_shared_expert_mlp=shared,
    )
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return moe.to(dtype)


def swiglu(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ mlp.W_gate) * (x @ mlp.W_in)) @ mlp.W_out


def reference(moe: MoE, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token: softmax, top-k, (renormalise,) Σ weight · expert(x) (+ gate · shared(x)).
    `weights` (batch, pos, n_experts) replaces the routing, as a hook on hook_expert_weights would."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for p in range(x.shape[1]):
            token = x[b, p]
            if weights is None:
                probs = torch.softmax(token @ moe.W_router, -1)
                top = probs.topk(moe.top_k)
                w = top.values / top.values.sum() if moe.norm_topk_prob else top.values
                chosen = dict(zip(top.indices.tolist(), w, strict=True))
            else:
                chosen = {e: weights[b, p, e] for e in weights[b, p].nonzero().flatten().tolist()}
            for e, w in chosen.items():
                out[b, p] += w * swiglu(moe.experts[e], token)
            if moe.shared_expert is not None:
                out[b, p] += torch.sigmoid(token @ moe.W_shared_gate)[0] * swiglu(moe.shared_expert, token)
    return out


def inputs() -> torch.Tensor:
    return torch.randn(BATCH, POS, D_MODEL, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shared", [0, 3])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_output_is_the_weighted_sum_of_the_chosen_experts(shared, norm_topk_prob):
    moe, x = make_moe(shared, norm_topk_prob), inputs()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_hooks_read_the_routing_with_their_documented_shapes():
    moe, x = make_moe(shared=3), inputs()
    seen = {}
    hooks = {
        "logits": moe.hook_router_logits,
        "weights": moe.hook_expert_weights,
        "gate": moe.hook_shared_gate,
        "shared": moe.hook_shared_out,
        "pre": moe.experts[1].hook_pre,
        **{f"out{e}": moe.hook_expert_out[e] for e in range(N_EXPERTS)},
    }
    for name, hook in hooks.items():
        hook.add(lambda t, _h, name=name: seen.__setitem__(name, t))
    with torch.no_grad():
        out = moe(x)
    assert seen["logits"].shape == seen["weights"].shape == (BATCH, POS, N_EXPERTS)
    torch.testing.assert_close(seen["logits"], x @ moe.W_router)
    assert seen["weights"].dtype == torch.float32
    assert ((seen["weights"] > 0).sum(-1) == 2).all()  # top-2, zeros elsewhere
    torch.testing.assert_close(seen["weights"].sum(-1), torch.ones(BATCH, POS))  # renormalised
    assert seen["gate"].shape == (BATCH, POS, 1) and seen["shared"].shape == (BATCH, POS, D_MODEL)
    routed_to_1 = int((seen["weights"][..., 1] > 0).sum())
    assert seen["pre"].shape == (routed_to_1, 6)  # one row per token routed to expert 1
    writes = sum(seen[f"out{e}"] for e in range(N_EXPERTS))
    torch.testing.assert_close(writes + seen["shared"], out)  # each expert's write, added up, is the output


def test_ablating_an_expert_through_its_weight_removes_exactly_its_contribution():
    """Zeroing expert 2's routing weight through the hook = zeroing its down-projection (by hand)."""
    moe, x = make_moe(), inputs()

    def ablate(w, _hook):
        w = w.clone()
        w[..., 2] = 0
        return w

    with torch.no_grad():
        assert (moe(x) != 0).any()
        moe.hook_expert_weights.add(ablate)
        ablated = moe(x)
        moe.hook_expert_weights.clear()
        moe.experts[2].W_out.zero_()
        torch.testing.assert_close(ablated, moe(x), atol=0, rtol=0)
        assert not torch.allclose(ablated, reference(make_moe(), x))  # expert 2 did contribute


def test_a_weight_given_to_an_unchosen_expert_routes_the_token_to_it():
    moe, x = make_moe(k=1), inputs()
    steered = torch.zeros(BATCH, POS, N_EXPERTS)
    steered[..., 3] = 0.5
    steered[0, 0, 0] = 2.0
    moe.hook_expert_weights.add(lambda w, _h: steered)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(moe, x, steered), atol=1e-5, rtol=1e-5)


def test_an_expert_no_token_uses_runs_only_when_watched():
    moe, x = make_moe(k=1), inputs()
    only_0 = torch.zeros(BATCH, POS, N_EXPERTS)
    only_0[..., 0] = 1.0
    moe.hook_expert_weights.add(lambda w, _h: only_0)
    calls = []
    moe.experts[3].hook_post.add(lambda t, _h: calls.append(tuple(t.shape)))
    with torch.no_grad():
        moe(x)
    assert calls == [(0, 6)]  # watched: it runs, on no tokens
    seen = []
    moe.hook_expert_out[2].add(lambda t, _h: seen.append(t))
    with torch.no_grad():
        moe(x)
    assert seen[0].shape == (BATCH, POS, D_MODEL) and not seen[0].any()


def test_bfloat16_keeps_float32_routing_and_the_model_dtype_out():
    moe = make_moe(shared=3, dtype=torch.bfloat16)
    weights = []
    moe.hook_expert_weights.add(lambda w, _h: weights.append(w))
    with torch.no_grad():
        out = moe(inputs().bfloat16())
    assert out.dtype == torch.bfloat16 and weights[0].dtype == torch.float32


def test_gradients_reach_the_router_and_the_chosen_experts():
    moe, x = make_moe(), inputs()
    moe(x).square().sum().backward()
    assert moe.router_weight.grad.abs().sum() > 0
    assert all(e.out_weight.grad is not None for e in moe.experts)


def test_a_model_with_experts_builds_initialises_and_runs():
    cfg = gf.Config(
        d_model=16, n_layers=2, n_heads=2, d_vocab=11, n_ctx=8, positional="rotary", norm="rmsnorm", act="swiglu",
        n_experts=3, d_expert_mlp=12, d_shared_expert_mlp=8, bias=False,
    )  # fmt: skip
    model, twin = gf.Transformer(cfg, seed=0), gf.Transformer(cfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    block = model.blocks[0]
    assert isinstance(block.mlp, MoE) and block.mlp.experts[2].W_gate.shape == (16, 12)
    assert block.mlp.W_router.shape == (16, 3) and block.mlp.W_shared_gate.shape == (16, 1)
    writes = 2 * cfg.n_layers
    assert abs(block.mlp.experts[0].W_out.std().item() - 0.02 / writes**0.5) < 0.004
    tokens = torch.randint(0, 11, (2, 6))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (2, 6, 11) and torch.isfinite(logits).all()
    assert cache["expert_weights", 1].shape == cache["router_logits", 1].shape == (2, 6, 3)  # short names

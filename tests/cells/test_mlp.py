"""Tests of the feed-forward cell (cells/mlp.py): hook and weight shapes, the documented formula
`act(x @ W_in + b_in) @ W_out + b_out` (SwiGLU: `(silu(x @ W_gate) * (x @ W_in + b_in)) @ W_out + b_out`),
and in-place writes through the weight views."""

from __future__ import annotations

import math

import pytest
import torch

import glassformer as gf
from glassformer.cells.mlp import MLP

D_MODEL, D_MLP, BATCH, POS = 6, 7, 2, 3

ACTS = {
    "relu": lambda x: x.clamp(min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x * torch.sigmoid(x),
}


def make_mlp(act: str, bias: bool = True) -> MLP:
    cfg = gf.Config(d_model=D_MODEL, n_layers=1, n_heads=2, d_mlp=D_MLP, d_vocab=5, n_ctx=8, act=act, bias=bias)
    mlp = MLP(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return mlp


def run(mlp: MLP, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every hook's activation."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [name for name in ("hook_pre", "hook_pre_linear", "hook_post") if hasattr(mlp, name)]
    for name in hooks:
        getattr(mlp, name).add(lambda t, _h, name=name: acts.__setitem__(name, t.detach().clone()))
    try:
        with torch.no_grad():
            return mlp(x), acts
    finally:
        for name in hooks:
            getattr(mlp, name).clear()


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_hook_and_weight_shapes(act):
    """hook_pre/hook_post (and SwiGLU's hook_pre_linear) are (batch, pos, d_mlp); W_in, W_gate
    (d_model, d_mlp), W_out (d_mlp, d_model), b_in (d_mlp,), b_out (d_model,); output like the input."""
    mlp = make_mlp(act)
    out, acts = run(mlp, torch.randn(BATCH, POS, D_MODEL))
    assert out.shape == (BATCH, POS, D_MODEL)
    expected = {"hook_pre", "hook_post"} | ({"hook_pre_linear"} if act == "swiglu" else set())
    assert set(acts) == expected
    assert all(t.shape == (BATCH, POS, D_MLP) for t in acts.values())
    assert mlp.W_in.shape == (D_MODEL, D_MLP) and mlp.W_out.shape == (D_MLP, D_MODEL)
    assert mlp.b_in.shape == (D_MLP,) and mlp.b_out.shape == (D_MODEL,)
    if act == "swiglu":
        assert mlp.W_gate.shape == (D_MODEL, D_MLP)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", list(ACTS))
def test_ungated_mlp_formula(act, bias):
    """hook_pre = x @ W_in + b_in, hook_post = act(hook_pre), output = hook_post @ W_out + b_out."""
    mlp = make_mlp(act, bias)
    x = torch.randn(BATCH, POS, D_MODEL)
    out, acts = run(mlp, x)
    with torch.no_grad():
        pre = x @ mlp.W_in + (mlp.b_in if bias else 0)
        torch.testing.assert_close(acts["hook_pre"], pre)
        torch.testing.assert_close(acts["hook_post"], ACTS[act](pre))
        torch.testing.assert_close(out, ACTS[act](pre) @ mlp.W_out + (mlp.b_out if bias else 0))


def test_swiglu_formula():
    """SwiGLU: hook_pre = x @ W_gate, hook_pre_linear = x @ W_in + b_in,
    hook_post = silu(hook_pre) * hook_pre_linear, output = hook_post @ W_out + b_out."""
    mlp = make_mlp("swiglu")
    x = torch.randn(BATCH, POS, D_MODEL)
    out, acts = run(mlp, x)
    with torch.no_grad():
        gate, linear = x @ mlp.W_gate, x @ mlp.W_in + mlp.b_in
        torch.testing.assert_close(acts["hook_pre"], gate)
        torch.testing.assert_close(acts["hook_pre_linear"], linear)
        torch.testing.assert_close(acts["hook_post"], ACTS["silu"](gate) * linear)
        torch.testing.assert_close(out, ACTS["silu"](gate) * linear @ mlp.W_out + mlp.b_out)


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_in_place_writes_through_views_change_the_output(act):
    """W_out.zero_() under no_grad leaves only b_out; a copy_ into W_in (or W_gate) changes hook_pre."""
    mlp = make_mlp(act)
    x = torch.randn(BATCH, POS, D_MODEL)
    _, before = run(mlp, x)
    with torch.no_grad():
        mlp.W_out.zero_()
        (mlp.W_gate if act == "swiglu" else mlp.W_in).copy_(torch.ones(D_MODEL, D_MLP))
    out, after = run(mlp, x)
    torch.testing.assert_close(out, mlp.b_out.detach().expand(BATCH, POS, D_MODEL))
    assert not torch.allclose(after["hook_pre"], before["hook_pre"])
    pre_bias = 0 if act == "swiglu" else mlp.b_in.detach()  # the gate branch has no bias
    torch.testing.assert_close(after["hook_pre"], (x.sum(-1, keepdim=True) + pre_bias).expand(BATCH, POS, D_MLP))

"""Tests of the normalisation cell (cells/norm.py): hook shapes, the LayerNorm / RMSNorm formulas, and
that the explicit path (taken when hook_scale is hooked) equals the fused one."""

from __future__ import annotations

import pytest
import torch

import glassformer as gf
from glassformer.cells.norm import Norm, make_norm

D_MODEL, BATCH, POS = 6, 2, 3


def make_norm_cell(norm: str, bias: bool = True) -> Norm:
    cfg = gf.Config(d_model=D_MODEL, n_layers=1, n_heads=2, d_vocab=5, n_ctx=8, norm=norm, bias=bias, eps=1e-3)
    cell = make_norm(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cell.w.copy_(1 + torch.randn(D_MODEL, generator=gen))
        if cell.b is not None:
            cell.b.copy_(torch.randn(D_MODEL, generator=gen))
    return cell


def run(cell: Norm, x: torch.Tensor, watch: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    acts: dict[str, torch.Tensor] = {}
    for name in watch:
        getattr(cell, name).add(lambda t, _h, name=name: acts.__setitem__(name, t.detach().clone()))
    try:
        with torch.no_grad():
            return cell(x), acts
    finally:
        for name in watch:
            getattr(cell, name).clear()


def reference(x: torch.Tensor, cell: Norm, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized, scale): LayerNorm centres then divides by sqrt(var + eps); RMSNorm divides by
    sqrt(mean(x²) + eps); both multiply by w, LayerNorm adds b."""
    x = x.double()
    if norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    scale = ((x**2).mean(-1, keepdim=True) + 1e-3).sqrt()
    out = x / scale * cell.w.detach().double()
    if cell.b is not None:
        out = out + cell.b.detach().double()
    return out.float(), scale.float()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_shapes_formula_and_paths_agree(norm, bias):
    """hook_scale is (batch, pos, 1) and hook_normalized (batch, pos, d_model); the explicit path
    (hook_scale hooked) and the fused path both equal the formula."""
    cell = make_norm_cell(norm, bias)
    x = 3 * torch.randn(BATCH, POS, D_MODEL) + 1
    expected, expected_scale = reference(x, cell, norm)
    fused, fused_acts = run(cell, x, ("hook_normalized",))
    explicit, acts = run(cell, x, ("hook_scale", "hook_normalized"))
    assert acts["hook_scale"].shape == (BATCH, POS, 1)
    assert acts["hook_normalized"].shape == fused_acts["hook_normalized"].shape == (BATCH, POS, D_MODEL)
    torch.testing.assert_close(acts["hook_scale"], expected_scale)
    torch.testing.assert_close(explicit, expected)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(acts["hook_normalized"], explicit)


def test_rmsnorm_has_no_bias_and_layernorm_without_bias_has_none():
    """RMSNorm has no b; LayerNorm has b (d_model,) only when cfg.bias."""
    assert make_norm_cell("rmsnorm").b is None
    assert make_norm_cell("layernorm", bias=False).b is None
    assert make_norm_cell("layernorm").b.shape == (D_MODEL,)


def test_norm_none_is_identity():
    """norm='none' makes the cell an identity with no hook points."""
    cfg = gf.Config(d_model=D_MODEL, n_layers=1, n_heads=2, d_vocab=5, n_ctx=8, norm="none")
    cell = make_norm(cfg)
    x = torch.randn(BATCH, POS, D_MODEL)
    assert torch.equal(cell(x), x)
    assert not [m for m in cell.modules() if isinstance(m, gf.HookPoint)]


def test_in_place_write_to_gain_changes_output():
    """ln.w.zero_() under no_grad leaves only the bias in the output."""
    cell = make_norm_cell("layernorm")
    with torch.no_grad():
        cell.w.zero_()
        out = cell(torch.randn(BATCH, POS, D_MODEL))
    torch.testing.assert_close(out, cell.b.detach().expand(BATCH, POS, D_MODEL))

"""linear(): F.linear's numbers, through oneDNN only where no gradient can be needed."""

import pytest
import torch
import torch.nn.functional as F

from glassformer import linear as linear_module
from glassformer.linear import linear

onednn = pytest.mark.skipif(not linear_module.use_onednn, reason="this torch build has no oneDNN inner product")


def ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (3, 1, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_f_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g), torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if with_bias else None
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
        x, w, b = x.transpose(0, -2), w[:40], None if b is None else b[:40]  # strided input, a weight's rows
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))


@onednn
def test_onednn_runs_with_and_without_autograd_and_its_gradients_are_f_linears():
    x, w = torch.randn(2, 4, 16, requires_grad=True), torch.nn.Parameter(torch.randn(8, 16))
    b = torch.nn.Parameter(torch.randn(8))
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in ops_run(lambda: linear(x, w))
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in ops_run(lambda: linear(x, w))
    assert "mkldnn::_linear_pointwise" in ops_run(lambda: linear(x, w, b))  # a plain script: autograd on
    linear(x, w, b).square().sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).square().sum().backward()
    for mine, expected in zip(got, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(mine, expected)


def test_in_place_weight_edits_are_seen_at_once():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    with torch.no_grad():
        before = linear(x, w)
        w[2] = 0.0
        after = linear(x, w)
    assert torch.equal(after[:, 2], torch.zeros(3)) and not torch.equal(before[:, 2], after[:, 2])


def test_the_switch_turns_onednn_off(monkeypatch):
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    monkeypatch.setattr(linear_module, "use_onednn", False)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in ops_run(lambda: linear(x, w))


@onednn
def test_compiled_code_keeps_onednn_as_one_operator():
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    compiled = torch.compile(lambda x: torch.relu(linear(x, w, b)), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), torch.relu(F.linear(x, w, b)))
        assert "glassformer::onednn_linear" in ops_run(lambda: compiled(x))


@pytest.mark.parametrize("rows", [3, 40])  # on the codes, and a float GEMM on the decoded matrix
def test_a_recorded_quantized_product_keeps_no_float_copy_of_the_weight(rows):
    """With autograd on (a plain script's forward), a low-bit product saves nothing weight-sized for
    its backward, which decodes the weight again; the gradient is the float product's."""
    from glassformer.quantized import quantize_weight

    weight = quantize_weight(torch.randn(96, 64), "int4")
    x = torch.randn(rows, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = linear(x, weight)
    assert all(shape != weight.shape for shape in saved)
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.dequantize().sum(0).expand(rows, -1), atol=1e-5, rtol=1e-5)

"""QuantizedWeight: its values against a quantizer written here, its product (compiled kernel and
PyTorch fallback) against the dense product, and its behaviour as a float tensor."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glassformer import quantized
from glassformer.errors import InputError
from glassformer.linear import linear
from glassformer.quantized import QuantizedWeight, quantize_weight

# in_features not a multiple of the group (50, 1000, 96 under 64 or 128), out_features not of 4
SHAPES = [(37, 50), (5, 1000), (64, 96), (6, 256)]
SCHEMES = [("int8", None), ("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128), ("bf16", None)]
SCHEME_IDS = [f"{s}-{g}" for s, g in SCHEMES]


@pytest.fixture(params=["kernel", "pytorch"])
def path(request, monkeypatch):
    """The compiled kernel, or the PyTorch code that runs without a C compiler."""
    if request.param == "kernel" and quantized._kernel() is None:
        pytest.skip("the quantized-product kernel did not compile on this machine")
    if request.param == "pytorch":
        monkeypatch.setattr(quantized, "KERNEL", None)
    return request.param


def weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference(w, scheme, group_size):
    """(values, scale): the dequantized matrix and each element's group scale, group by group over
    the real columns (a row's last group may be short)."""
    if scheme == "bf16":
        return w.to(torch.bfloat16).float(), None
    k = w.shape[1]
    group = group_size or k  # int8 without a group: one scale per row
    values, scales = torch.empty_like(w), torch.empty_like(w)
    for start in range(0, k, group):
        g = w[:, start : start + group]
        if scheme == "int8":
            scale = g.abs().amax(1, keepdim=True) / 127
            value = torch.round(g / scale) * scale
        else:
            low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
            scale = (high - low) / 15
            value = torch.round((g - low) / scale).clamp(0, 15) * scale + low
        values[:, start : start + group] = value
        scales[:, start : start + group] = scale.expand_as(g)
    return values, scales


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("scheme", "group_size"), SCHEMES, ids=SCHEME_IDS)
def test_dequantize_equals_the_reference_quantizer(path, shape, scheme, group_size):
    w = weight(shape)
    q = quantize_weight(w, scheme, group_size)
    expected, scale = reference(w, scheme, group_size)
    assert isinstance(q, QuantizedWeight) and q.scheme == scheme
    torch.testing.assert_close(q.dequantize(), expected, atol=1e-6, rtol=0)
    error = (q.dequantize() - w).abs()
    if scale is None:  # bf16: rounding to 8 bits of mantissa
        assert (error <= w.abs() * 2**-8).all()
    else:
        assert (error <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
def test_zero_and_constant_rows_come_back_exactly(path, scheme):
    w = weight((4, 64))
    w[0] = 0.0
    w[1] = 0.75
    q = quantize_weight(w, scheme)
    assert torch.equal(q.dequantize()[:2], w[:2])


def test_default_groups():
    assert quantize_weight(weight((3, 50)), "int8").scale.shape == (3, 1)  # per row
    assert quantize_weight(weight((3, 50)), "int4").group == 32  # llama.cpp's Q4_1 blocks
    assert quantize_weight(weight((3, 100)), "int4").scale.shape == (3, 4)


def test_int4_short_last_group_keeps_its_own_range():
    w = torch.rand(4, 50, generator=torch.Generator().manual_seed(0)) + 1.0  # all positive
    q = quantize_weight(w, "int4", 32)
    expected, scale = reference(w, "int4", 32)
    assert ((q.dequantize() - w).abs() <= scale / 2 + 1e-6).all()


def dense_product(x, values, bias):
    out = x.double() @ values.double().T
    return (out if bias is None else out + bias.double()).float()


def assert_product_close(got, expected):
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("scheme", "group_size"), SCHEMES, ids=SCHEME_IDS)
def test_product_equals_the_dense_product(path, shape, scheme, group_size):
    n, k = shape
    w = weight(shape)
    q = quantize_weight(w, scheme, group_size)
    values = reference(w, scheme, group_size)[0]
    bias = weight((n,), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 17, quantized.ROWS_FOR_GEMM + 1):  # the kernel's row dots, then a float GEMM
            x = torch.randn(rows, k, generator=g)
            for b in (bias, None):
                assert_product_close(linear(x, q, b), dense_product(x, values, b))
        for batch, pos in ((1, 1), (2, 2), (2, 3), (3, 7), (3, quantized.ROWS_FOR_GEMM // 2)):
            x = torch.randn(batch, pos, k, generator=g)
            assert_product_close(linear(x, q, bias), dense_product(x, values, bias))
            strided = x.transpose(0, 1)  # not contiguous
            assert_product_close(linear(strided, q, bias), dense_product(strided, values, bias))


def test_kernel_and_fallback_give_the_same_products(monkeypatch):
    if quantized._kernel() is None:
        pytest.skip("the quantized-product kernel did not compile on this machine")
    q = quantize_weight(weight((37, 200)), "int4", 64)
    x = weight((3, 200), seed=1)
    with torch.no_grad():
        compiled = (linear(x, q), q.dequantize())
        monkeypatch.setattr(quantized, "KERNEL", None)
        fallback = (linear(x, q), q.dequantize())
    torch.testing.assert_close(compiled[0], fallback[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[1], fallback[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
def test_reads_as_a_float_tensor(path, scheme, monkeypatch):
    w = weight((37, 50))
    q = quantize_weight(w, scheme)
    values = q.dequantize()
    assert q.shape == (37, 50) and q.dtype == torch.float32 and not q.requires_grad
    head = q[:3]
    assert type(head) is torch.Tensor and torch.equal(head, values[:3])
    assert torch.equal(q[5, 7:9], values[5, 7:9])
    y = weight((37, 3), seed=1)
    torch.testing.assert_close(q.T @ y, values.T @ y)
    torch.testing.assert_close(q * 2, values * 2)
    assert torch.equal(q.sum(1), values.sum(1))
    decoded = []
    rows = QuantizedWeight.rows
    monkeypatch.setattr(QuantizedWeight, "rows", lambda self, index: decoded.append(index) or rows(self, index))
    idx = torch.tensor([[0, 36, 5], [5, 5, 1]])
    looked_up = F.embedding(idx, q)
    assert len(decoded) == 1  # only the rows asked for are decoded
    assert looked_up.shape == (2, 3, 50)
    torch.testing.assert_close(looked_up, values[idx], atol=1e-6, rtol=0)  # the kernel's decoding may fuse a*b+c


@pytest.mark.parametrize(("scheme", "group_size"), SCHEMES, ids=SCHEME_IDS)
def test_deepcopy_and_parameter_keep_it_quantized(scheme, group_size):
    q = quantize_weight(weight((37, 50)), scheme, group_size)
    copied = copy.deepcopy(q)
    assert isinstance(copied, QuantizedWeight) and (copied.scheme, copied.group) == (scheme, q.group)
    assert torch.equal(copied.dequantize(), q.dequantize())
    assert copied.codes.data_ptr() != q.codes.data_ptr()  # its own storage
    param = nn.Parameter(q, requires_grad=False)
    assert isinstance(param, QuantizedWeight) and not param.requires_grad
    assert torch.equal(param.dequantize(), q.dequantize())
    assert isinstance(param.detach(), QuantizedWeight) and isinstance(q.clone(), QuantizedWeight)


@pytest.mark.parametrize(("scheme", "group_size"), SCHEMES, ids=SCHEME_IDS)
def test_in_place_copy_requantizes(path, scheme, group_size):
    q = quantize_weight(weight((37, 50)), scheme, group_size)
    new = weight((37, 50), seed=3) * 3
    with torch.no_grad():
        returned = q.copy_(new)
    assert returned is q and isinstance(q, QuantizedWeight) and q.scheme == scheme
    expected = quantize_weight(new, scheme, group_size).dequantize()
    torch.testing.assert_close(q.dequantize(), expected, atol=1e-6, rtol=0)
    x = weight((2, 50), seed=4)
    with torch.no_grad():
        assert_product_close(linear(x, q), dense_product(x, expected, None))
        q.mul_(0.5)
    torch.testing.assert_close(q.dequantize(), expected * 0.5, atol=1e-6, rtol=0)


def test_bf16_with_a_group_size_multiplies_right_after_an_in_place_edit():
    q = quantize_weight(weight((8, 96)), "bf16", 64)
    new = weight((8, 96), seed=1)
    x = weight((1, 96), seed=2)
    with torch.no_grad():
        q.copy_(new)
        assert_product_close(linear(x, q), dense_product(x, new.to(torch.bfloat16).float(), None))


def test_indexed_in_place_writes_are_stored():
    q = quantize_weight(weight((8, 64)), "int8")
    with torch.no_grad():
        q[2] = 0.0
        q[:, 0] = 0.0
    assert torch.equal(q.dequantize()[2], torch.zeros(64))
    assert torch.equal(q.dequantize()[:, 0], torch.zeros(8))


@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
def test_gradients_reach_the_activations_and_bias(path, scheme, rows):
    q = quantize_weight(weight((37, 50)), scheme)
    values = q.dequantize()
    x = weight((rows, 2, 50), seed=1).requires_grad_()
    b = weight((37,), seed=2).requires_grad_()
    linear(x, q, b).square().sum().backward()
    got = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    F.linear(x, values, b).square().sum().backward()
    torch.testing.assert_close(got[0], x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], b.grad, atol=1e-4, rtol=1e-4)
    assert q.grad is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((weight((4, 64)), "int3"), "unknown quantization scheme 'int3'"),
        ((weight((4, 64)), "int4", 48), "group_size must be a positive multiple of 32, got 48"),
        ((weight((4, 64)), "int8", 0), "group_size must be a positive multiple of 32, got 0"),
        ((weight((64,)), "int8"), r"only a 2-D float weight matrix can be quantized, got \(64,\)"),
        ((torch.ones(4, 64, dtype=torch.int64), "int8"), "only a 2-D float weight matrix.*torch.int64"),
    ],
    ids=["scheme", "group-48", "group-0", "1-D", "integer"],
)
def test_bad_input_is_refused(args, message):
    with pytest.raises(InputError, match=message):
        quantize_weight(*args)


def test_a_kernel_that_cannot_be_built_leaves_pytorch_running_the_products(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASSFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.warns(UserWarning, match="did not build"):
        assert quantized._library() is None
    monkeypatch.setenv("GLASSFORMER_CACHE", "/proc/no-such-place")  # cannot even be created
    with pytest.warns(UserWarning, match="did not build"):
        assert quantized._library() is None


def test_the_kernel_is_built_into_the_cache_directory(monkeypatch, tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("GLASSFORMER_CACHE", str(tmp_path))
    assert quantized._library() is not None
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1 and not list(tmp_path.glob("tmp*"))

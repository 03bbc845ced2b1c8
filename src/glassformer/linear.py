"""The one matrix product behind every weight: `F.linear`, run by oneDNN on CPU, or by the low-bit
kernel when the weight is a `QuantizedWeight`.

oneDNN's float32 inner product reads the ordinary (out_features, in_features) weight as it is, so
there is no packed copy to fall out of step when a weight is edited in place, and on the CPU
measured for bench/RESULTS.md it is 1.3-2.3x faster than the MKL sgemm behind `F.linear` (the
unembedding and one-row decoding gain most). With autograd on (a plain script's `model(tokens)`, or
training) the same forward runs, and the backward is two ordinary products. A quantized weight never
needs a gradient itself; when the activations do (attribution patching, `backward_metric`), the
product's backward uses the weight's float values. Under `torch.compile` the oneDNN call is an
opaque operator, which the compiler leaves as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from glassformer.quantized import QuantizedWeight

# Set to False to run every product through F.linear (e.g. to compare the two).
use_onednn: bool = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("glassformer::onednn_linear", mutates_args=())
def _onednn_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`_onednn` as an operator torch.compile keeps whole (it cannot lower the oneDNN call itself)."""
    return _onednn(x, weight, bias)


@_onednn_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _OneDNNProduct(torch.autograd.Function):
    """The oneDNN forward where autograd is recording; its backward is the usual pair of products."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _onednn(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (tokens, out_features)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # (..., in_features)
        grad_w = rows.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None  # (out, in)
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out_features,)
        return grad_x, grad_w, grad_b


class _QuantizedProduct(torch.autograd.Function):
    """The low-bit product, with a backward to the activations (and bias) through the float weight,
    decoded again there: a forward with autograd on (a plain script's `model(tokens)`) keeps no float
    copy of the weight for it."""

    @staticmethod
    def forward(x: Tensor, weight: QuantizedWeight, bias: Tensor | None) -> Tensor:
        return _quantized(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.weight, ctx.has_bias = inputs[1], inputs[2] is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, Tensor | None]:
        grad_x = grad @ ctx.weight.dequantize().to(grad.dtype)  # (..., in_features)
        return grad_x, None, grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None


def _quantized(x: Tensor, weight: QuantizedWeight, bias: Tensor | None) -> Tensor:
    """The kernel on the codes, or (a prefill's many rows, another device, no kernel) a float GEMM on
    the decoded matrix, which is freed right after."""
    if weight.runs_on_codes(x):
        return weight.product(x, bias)
    return linear(x, weight.dequantize().to(x.dtype), bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias`, as `F.linear`; (..., in_features) -> (..., out_features)."""
    if isinstance(weight, QuantizedWeight):
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _QuantizedProduct.apply(x, weight, bias)
        return _quantized(x, weight, bias)
    if not (use_onednn and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias) if torch.is_grad_enabled() else _onednn_op(x, weight, bias)
    tracked = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and tracked:
        return _OneDNNProduct.apply(x, weight, bias)
    # The eager call skips the operator's dispatch cost (measurable at decoding's ~50 calls per token).
    return _onednn(x, weight, bias)

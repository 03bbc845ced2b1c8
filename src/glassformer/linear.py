"""The one matrix product behind every weight: `F.linear`, run by oneDNN on CPU when no gradient
can be needed.

oneDNN's float32 inner product reads the ordinary (out_features, in_features) weight as it is, so
there is no packed copy to fall out of step when a weight is edited in place, and on the CPU
measured for bench/RESULTS.md it is 1.3-2.3x faster than the MKL sgemm behind `F.linear` (the
unembedding and one-row decoding gain most). It has no backward: whenever autograd could need one,
`F.linear` runs. Under `torch.compile` it is called as an opaque operator, which the compiler
leaves as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias`, as `F.linear`; (..., in_features) -> (..., out_features)."""
    if (
        use_onednn
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
    ):
        # The eager call skips the operator's dispatch cost (measurable at decoding's ~50 calls per token).
        return _onednn_op(x, weight, bias) if torch.compiler.is_compiling() else _onednn(x, weight, bias)
    return F.linear(x, weight, bias)

"""The one matrix product behind every weight: `F.linear`, run by oneDNN on CPU when no gradient
can be needed.

oneDNN's float32 inner product reads the ordinary (out_features, in_features) weight as it is, so
there is no packed copy to fall out of step when a weight is edited in place, and on the CPU
measured for bench/RESULTS.md it is 1.3-2.3x faster than the MKL sgemm behind `F.linear` (the
unembedding and one-row decoding gain most). It has no backward: whenever autograd could need one,
and under `torch.compile` (which lowers `F.linear` itself), `F.linear` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Set to False to run every product through F.linear (e.g. to compare the two).
use_onednn: bool = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)

"""`quantize(model, "int8" | "int4" | "bf16")`: every weight matrix of the model's products stored in low
bits, in place. Activations, norms, biases and hooks stay float32; `glassformer.quantized` holds the
weight type and its kernel.

The token embedding (and the unembedding, tied to it or not) gets int8 when the layers get int4, as
llama.cpp's Q4 files keep it (SmolLM2's Q4_1 file stores it as Q8_0): those matrices carry every
token in and out, and 4 bits there cost more quality than anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from glassformer.errors import InputError
from glassformer.quantized import BITS, quantize_weight

# The weight matrices that `linear` multiplies by, by the name a cell gives them: attention's fused
# QKV and output, the MLP's (and every expert's) in/gate/out. Routers and poolers stay float (tiny).
PRODUCT_WEIGHTS = ("qkv_weight", "o_weight", "in_weight", "gate_weight", "out_weight")
EMBEDDINGS = ("embed.W_E", "unembed.weight")


def product_weights(model: nn.Module) -> list[str]:
    """Names of the model's product weight matrices (layers first, then the embeddings it has)."""
    names = [n for n, p in model.named_parameters() if n.rpartition(".")[2] in PRODUCT_WEIGHTS and p.dim() == 2]
    params = dict(model.named_parameters())
    return names + [n for n in EMBEDDINGS if n in params]


def quantize(
    model: nn.Module, scheme: str = "int8", group_size: int | str = 32, embeddings: str | None = None
) -> nn.Module:
    """Store every product weight of `model` as `scheme` ("int8": a scale per `group_size` columns,
    or per row with `group_size="row"`; "int4": a scale and min per group; "bf16"), in place; returns
    `model`. `embeddings` sets the token embedding's (and unembedding's) scheme: int8 under int4.

    Groups of 32 by default, as llama.cpp's Q8_0/Q4_1: on the shipped SmolLM2 one int8 scale per row
    cost 0.66 % perplexity, one per 32 columns 0.41 % (bench/RESULTS.md, "Low-bit weights")."""
    if group_size == "row":
        if scheme != "int8":
            raise InputError(f'group_size="row" is int8\'s per-row scale; {scheme} takes a group size')
        group_size = None
    if scheme not in BITS:
        raise InputError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(BITS)}")
    embeddings = embeddings or ("int8" if scheme == "int4" else scheme)
    if embeddings not in BITS:
        raise InputError(f"unknown embeddings scheme {embeddings!r}; choose one of {sorted(BITS)}")
    plan = {
        name: (embeddings, None) if name in EMBEDDINGS else (scheme, None if scheme == "bf16" else group_size)
        for name in product_weights(model)
    }
    return apply(model, plan)


def apply(model: nn.Module, plan: Mapping[str, tuple[str, int | None]]) -> nn.Module:
    """Replace each named weight by its quantized form, `plan[name] = (scheme, group_size)`; one
    matrix at a time, so the float matrix is freed before the next is converted."""
    if getattr(model, "tp", None) is not None:
        raise InputError("quantize a model before sharding it across processes, not after")
    for name, (scheme, group_size) in plan.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(quantize_weight(weight, scheme, group_size), requires_grad=False))
    return model

"""Composition scores: how much each attention head's output is read by each later head
(Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits").

For a head i whose OV circuit writes into the residual stream and a head j of a later layer, as
TransformerLens' `all_composition_scores` defines them (row-vector convention, `x @ OV`):

- Q-composition: ‖OV_i QK_j‖_F / (‖OV_i‖_F ‖QK_j‖_F), head i's output read by j's queries;
- K-composition: the same with QK_j^T, read by j's keys;
- V-composition: the same with OV_j, read by j's values.

Legend: n_layers, n_heads (of one stack's self-attention), d_model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glassformer.factored import composition_scores
from glassformer.model import Circuits

KINDS = ("Q", "K", "V")


def all_composition_scores(model: Circuits, kind: str) -> Tensor:
    """(n_layers, n_heads, n_layers, n_heads): the `kind` ("Q", "K" or "V") composition of head
    (l1, h1) into head (l2, h2), filled where l1 < l2 and zero elsewhere, as in TransformerLens.
    `model` is a decoder or encoder model, or one stack of an encoder-decoder (`model.decoder`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (the composition's reading side), got {kind!r}")
    ov = model.OV  # (n_layers, n_heads, d_model, d_model), factored
    reader = ov if kind == "V" else model.QK if kind == "Q" else model.QK.T
    with torch.no_grad():
        scores = composition_scores(ov, reader)  # (n_layers, n_heads, n_layers, n_heads)
    layers = torch.arange(scores.shape[0], device=scores.device)
    later = layers[:, None, None, None] < layers[None, None, :, None]  # (n_layers, 1, n_layers, 1)
    return torch.where(later, scores, torch.zeros_like(scores))


def head_labels(model: Circuits) -> list[str]:
    """A label "L{layer}H{head}" for every self-attention head, layer by layer: the flattened order
    of `all_composition_scores`' (n_layers, n_heads) axes."""
    n_layers, n_heads = model.QK.shape[:2]
    return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]

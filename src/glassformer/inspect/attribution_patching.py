"""Attribution patching: activation patching estimated from one gradient (Syed, Rager & Conmy 2023;
Nanda, "Attribution patching: activation patching at industrial scale").

Activation patching (patching.py) reruns the corrupted input once per component, each time with that
component's clean activation written in. To first order, writing in the clean activation moves the
metric by

    (clean_act - corrupted_act) · d metric / d act        (the gradient taken at the corrupted run)

so one forward and backward pass of the corrupted input and one forward pass of the clean input
estimate every component at once. Direction and unit are patching.py's: each value is the metric of
the corrupted run with one component's clean activation written in, entry for entry comparable with
`patch_heads` and `patch_residual` (and with `restored_fraction`). The estimate is exact where the
metric is linear in the activation (e.g. heads' z in one attention-only layer with no norm).

Legend: batch, pos, n_heads, d_head, d_model, d_mlp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glassformer.inspect.inputs import token_labels
from glassformer.inspect.patching import (
    Inputs,
    Metric,
    layer_names,
    metric_value,
    restored_fraction,
    same_length,
)
from glassformer.model import Transformer

# over -> (hook in each block, the result's axes after the layer axis, the axes of
# (clean - corrupted) * grad summed away: batch always, d_head / d_model, and pos for whole heads)
GRIDS: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {
    "heads": ("attn.hook_z", ("head",), (0, 1, 3)),
    "head_positions": ("attn.hook_z", ("pos", "head"), (0, 3)),
    "resid_pre": ("hook_resid_pre", ("pos",), (0, 2)),
    "resid_mid": ("hook_resid_mid", ("pos",), (0, 2)),
    "resid_post": ("hook_resid_post", ("pos",), (0, 2)),
    "attn_out": ("hook_attn_out", ("pos",), (0, 2)),
    "mlp_out": ("hook_mlp_out", ("pos",), (0, 2)),
    "neurons": ("mlp.hook_post", ("pos", "neuron"), (0,)),
}


@dataclass
class PatchEstimate:
    """Attribution patching's estimate of the metric after patching each component, with labels."""

    values: Tensor  # (n_layers, n_heads), (n_layers, pos, n_heads), (n_layers, pos) or (n_layers, pos, d_mlp)
    axes: list[str]  # "layer", then "head", "pos" or "neuron": what each axis of `values` runs over
    labels: list[list[str]]  # per axis: "L0", …; "H0", …; the token strings (or "0", … without a tokenizer); "N0", …
    clean: float  # the metric of the clean run
    corrupted: float  # the metric of the corrupted run, the one patched

    def restored(self) -> Tensor:
        """`restored_fraction`: 1 where patching is estimated to restore the clean metric, 0 where nothing."""
        return restored_fraction(self.values, self.clean, self.corrupted)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` components whose patch moves the metric most, labelled ("L1H3", "L0N7 @2 ' cat'")."""
        effects = (self.values - self.corrupted).flatten()  # (n_components,)
        order = effects.abs().argsort(descending=True)[:k].tolist()
        return [(self._label(i), effects[i].item()) for i in order]

    def _label(self, flat: int) -> str:
        index = dict(zip(self.axes, torch.unravel_index(torch.tensor(flat), self.values.shape), strict=True))
        name = "".join(
            self.labels[self.axes.index(a)][int(index[a])] for a in ("layer", "head", "neuron") if a in index
        )
        if "pos" not in index:
            return name
        pos = int(index["pos"])
        token = self.labels[self.axes.index("pos")][pos]
        return f"{name} @{pos}" + ("" if token == str(pos) else f" {token!r}")

    def __str__(self) -> str:
        lines = [f"metric: clean {self.clean:+.4f}, corrupted {self.corrupted:+.4f}; largest estimated effects:"]
        return "\n".join(lines + [f"  {label:<24} {effect:+.4f}" for label, effect in self.top()])


def attribution_patching(
    model: Transformer, clean: Inputs, corrupted: Inputs, metric: Metric, over: str = "heads", stack: str = ""
) -> PatchEstimate:
    """Estimate, for every component of the grid `over`, the metric of the corrupted run with that
    component's clean activation written in (what `patch_heads`/`patch_residual` measure one run each).

    `over`: "heads" (each head's z at all positions, as `patch_heads`), "head_positions" (one head at
    one position, as `patch_heads(per_position=True)`), "resid_pre", "resid_mid", "resid_post",
    "attn_out", "mlp_out" (one layer's activation at one position, as `patch_residual(hook=...)`), or
    "neurons" (`mlp.hook_post`, one neuron at one position). `metric` must return a scalar tensor
    (e.g. `logit_diff`). `stack` is "" or, in an encoder-decoder model, "encoder." / "decoder.".
    """
    if over not in GRIDS:
        raise ValueError(f"over={over!r}: expected one of {sorted(GRIDS)}")
    hook, axes, summed = GRIDS[over]
    clean, corrupted = same_length(model, clean, corrupted)
    names = layer_names(model, stack, hook)
    with torch.no_grad():
        clean_logits, source = model.run_with_cache(*clean, names_filter=names)
    logits, base = model.run_with_cache(*corrupted, names_filter=names, backward_metric=metric)
    effects = torch.stack([((source[n] - base[n]) * base[f"{n}_grad"]).sum(summed) for n in names])  # (n_layers, *axes)
    corrupted_value = metric_value(metric, logits)
    tokens = clean[0] if stack == "encoder." else clean[-1]  # (batch, pos) of the patched stack
    labels = [[f"L{layer}" for layer in range(len(names))]]
    labels += [_axis_labels(model, tokens, axis, size) for axis, size in zip(axes, effects.shape[1:], strict=True)]
    return PatchEstimate(
        corrupted_value + effects, ["layer", *axes], labels, metric_value(metric, clean_logits), corrupted_value
    )


def _axis_labels(model: Transformer, tokens: Tensor, axis: str, size: int) -> list[str]:
    """Labels along one axis: "H0", … for heads, "N0", … for neurons, the first sequence's token
    strings (or "0", … without a tokenizer) for positions."""
    if axis == "pos":
        return token_labels(model, tokens) or [str(pos) for pos in range(size)]
    return [f"{axis[0].upper()}{i}" for i in range(size)]
